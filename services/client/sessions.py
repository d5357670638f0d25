"""SDK calls for PIE edit sessions. Mixed into `LongbowClient` / `AsyncLongbowClient` (sdk.py), which
provide `self._session_channel` and `self._call(method, request)` (retries, auth, errors as LongbowError).
A session lives in the replica that opened it, so its calls go over the channel pinned to one replica
(sdk.py); a call that reaches another replica anyway is FAILED_PRECONDITION naming both.

    sid = client.open_session(source_text)
    client.apply_edits(sid, [Edit(10, 14, "name")])
    client.predict(sid, cursor=len(new_text))          # the rest of the line
    client.close_session(sid)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from longbow.v1 import sessions_pb2 as pb
from longbow.v1 import sessions_pb2_grpc

MODES = {"pie": pb.UPDATE_MODE_PIE, "full": pb.UPDATE_MODE_FULL, "conflict": pb.UPDATE_MODE_CONFLICT}


@dataclass(frozen=True)
class Edit:
    """Replace characters [start, end) of the current text with `text` (insert: start == end)."""

    start: int
    end: int
    text: str


@dataclass(frozen=True)
class EditResult:
    tokens: int
    tokens_encoded: int
    update_seconds: float
    reencode_scheduled: bool


def _open_request(text: str, idle_timeout_s: int, mode: str) -> pb.OpenSessionRequest:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}")
    return pb.OpenSessionRequest(text=text, idle_timeout_s=idle_timeout_s, update_mode=MODES[mode])


def _edits_request(session_id: str, edits: list[Edit]) -> pb.ApplyEditsRequest:
    return pb.ApplyEditsRequest(session_id=session_id,
                                edits=[pb.Edit(start=e.start, end=e.end, text=e.text) for e in edits])


def _edit_result(r: pb.ApplyEditsResponse) -> EditResult:
    return EditResult(r.tokens, r.tokens_encoded, r.update_seconds, r.reencode_scheduled)


class SessionCalls:
    @functools.cached_property
    def _sessions_stub(self):
        return sessions_pb2_grpc.SessionsStub(self._session_channel)

    def open_session(self, text: str, *, idle_timeout_s: int = 0, mode: str = "pie") -> str:
        """Encode a document once and keep its KV; returns the session id."""
        return self._call(self._sessions_stub.OpenSession, _open_request(text, idle_timeout_s, mode)).session_id

    def apply_edits(self, session_id: str, edits: list[Edit]) -> EditResult:
        return _edit_result(self._call(self._sessions_stub.ApplyEdits, _edits_request(session_id, edits)))

    def predict(self, session_id: str, cursor: int, max_tokens: int = 0) -> str:
        """Greedy continuation at `cursor` (characters); max_tokens 0: to the end of the line."""
        request = pb.PredictRequest(session_id=session_id, cursor=cursor, max_tokens=max_tokens)
        return self._call(self._sessions_stub.Predict, request).text

    def close_session(self, session_id: str) -> None:
        self._call(self._sessions_stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))


class AsyncSessionCalls:
    @functools.cached_property
    def _sessions_stub(self):
        return sessions_pb2_grpc.SessionsStub(self._session_channel)

    async def open_session(self, text: str, *, idle_timeout_s: int = 0, mode: str = "pie") -> str:
        request = _open_request(text, idle_timeout_s, mode)
        return (await self._call(self._sessions_stub.OpenSession, request)).session_id

    async def apply_edits(self, session_id: str, edits: list[Edit]) -> EditResult:
        return _edit_result(await self._call(self._sessions_stub.ApplyEdits, _edits_request(session_id, edits)))

    async def predict(self, session_id: str, cursor: int, max_tokens: int = 0) -> str:
        request = pb.PredictRequest(session_id=session_id, cursor=cursor, max_tokens=max_tokens)
        return (await self._call(self._sessions_stub.Predict, request)).text

    async def close_session(self, session_id: str) -> None:
        await self._call(self._sessions_stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))
