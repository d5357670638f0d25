"""SDK calls for PIE edit sessions. Mixed into `LongbowClient` / `AsyncLongbowClient` (sdk.py), which provide
`self._channel` and `self._call(method, request)` (retries, auth, errors as LongbowError)."""

from __future__ import annotations

import functools

from longbow.v1 import sessions_pb2_grpc


class SessionCalls:
    @functools.cached_property
    def _sessions_stub(self):
        return sessions_pb2_grpc.SessionsStub(self._channel)


class AsyncSessionCalls:
    @functools.cached_property
    def _sessions_stub(self):
        return sessions_pb2_grpc.SessionsStub(self._channel)
