"""Edit-session RPCs (PIE): decode, run one SessionManager job on the engine thread, encode.

The SessionManager lives on the engine thread (its KV is the engine's). Every call is a KV job
(`AsyncLLMEngine.run_job`, engine/jobs.py) keyed by its session id, so one session's calls run in the order
they arrived while their model passes share the engine's steps with every other stream (an 8k-token open
costs other streams a few tokens per step, not a stall). A drift re-encode is queued behind the reply so
ApplyEdits answers first.
Clients are told apart by the `x-client-id` metadata, else by their peer address (per-client limits).
Budgets and eviction live in the SessionManager (services/text/sessions.py); an evicted or expired session's
next call is NOT_FOUND saying why, through the one error interceptor (errors.py).
Sessions live in one replica: their ids carry the replica id (`gateway.replica_id`, else the host name, the
pod name in Kubernetes), and a call naming another replica's session is FAILED_PRECONDITION naming both
replicas before the manager is asked (docs/kubernetes.md, session affinity).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from longbow.v1 import sessions_pb2 as pb
from longbow.v1 import sessions_pb2_grpc
from longbow.services.engine.errors import InvalidRequestError
from longbow.services.engine.jobs import immediate
from longbow.services.engine.pie import UpdateMode
from longbow.services.config import GatewayConfig
from longbow.services.text.sessions import SessionManager, TextEdit, replica_of
from longbow.services.gateway.errors import WrongReplicaError
from longbow.services.gateway.runtime import GatewayRuntime

log = logging.getLogger(__name__)

_MODES = {pb.UPDATE_MODE_UNSPECIFIED: UpdateMode.PIE, pb.UPDATE_MODE_PIE: UpdateMode.PIE,
          pb.UPDATE_MODE_FULL: UpdateMode.FULL, pb.UPDATE_MODE_CONFLICT: UpdateMode.CONFLICT}
EXPIRY_PERIOD_S = 5.0


class SessionsServicer(sessions_pb2_grpc.SessionsServicer):
    def __init__(self, runtime: GatewayRuntime):
        self.engine, self.metrics = runtime.engine, runtime.metrics
        self.replica = replica_id(runtime.config.gateway)
        self.manager = SessionManager(runtime.engine.engine, runtime.tokenizer, runtime.config.sessions,
                                      id_prefix=self.replica)
        self._expiry = runtime.loop.create_task(self._expire_forever())

    async def OpenSession(self, request, context):
        mode = _MODES.get(request.update_mode)
        if mode is None:
            raise InvalidRequestError(f"unknown update_mode {request.update_mode}")
        session = await self.engine.run_job(
            self.manager.open_job(request.text, _client(context), float(request.idle_timeout_s), mode))
        self.metrics.sessions_open.set(len(self.manager.sessions))
        return pb.OpenSessionResponse(session_id=session.session_id, tokens=len(session.document.token_ids))

    async def ApplyEdits(self, request, context):
        self._check_replica(request.session_id)
        edits = [TextEdit(e.start, e.end, e.text) for e in request.edits]
        outcome = await self.engine.run_job(self.manager.apply_edits_job(request.session_id, edits),
                                            key=request.session_id)
        self.metrics.session_update_seconds.observe(outcome.seconds)
        if outcome.reencode_due:
            # Queued under the session's key now, before the reply leaves: the client's next call on this
            # session runs after it (same key, FIFO) and sees exact KV again. The reply does not wait.
            done = self.engine.submit_job(self.manager.reencode_job(request.session_id), key=request.session_id)
            done.add_done_callback(self._reencoded)
        return pb.ApplyEditsResponse(tokens=outcome.tokens, tokens_encoded=outcome.tokens_encoded,
                                     update_seconds=outcome.seconds, reencode_scheduled=outcome.reencode_due)

    async def Predict(self, request, context):
        self._check_replica(request.session_id)
        text = await self.engine.run_job(
            self.manager.predict_job(request.session_id, request.cursor, request.max_tokens), key=request.session_id)
        return pb.PredictResponse(text=text)

    async def CloseSession(self, request, context):
        self._check_replica(request.session_id)
        await self.engine.run_job(immediate(self.manager.close, request.session_id), key=request.session_id)
        self.metrics.sessions_open.set(len(self.manager.sessions))
        return pb.CloseSessionResponse()

    def _check_replica(self, session_id: str) -> None:
        owner = replica_of(session_id)
        if owner is not None and owner != self.replica:
            raise WrongReplicaError(
                f"session {session_id!r} lives on replica {owner!r}, this is replica {self.replica!r}: edit sessions "
                f"are replica-local, so send its calls to {owner!r} (session affinity), or open a new session here")

    async def close(self) -> None:
        self._expiry.cancel()
        with contextlib.suppress(Exception):
            await self._call(SessionManager.close_all)

    async def _call(self, method, *args):
        return await self.engine.call(lambda engine: method(self.manager, *args))

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_PERIOD_S)  # read each round: tests shorten it
            try:
                await self._call(SessionManager.expire)
                self.metrics.sessions_open.set(len(self.manager.sessions))
            except Exception:  # one failed round must not end expiry for good, nor pass unseen
                log.exception("session expiry round failed; next round in %g s", EXPIRY_PERIOD_S)

    def _reencoded(self, future) -> None:  # on the engine thread
        if future.cancelled():
            return
        if future.exception() is not None:
            log.warning("background session re-encode failed: %s", future.exception())
        elif future.result():
            self.metrics.session_reencodes.inc()


def replica_id(config: GatewayConfig) -> str:
    """This replica's name in session ids: gateway.replica_id (LONGBOW_REPLICA_ID), else the host name."""
    return config.replica_id or socket.gethostname()


def _client(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-client-id":
            return value
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0]  # ipv4:127.0.0.1:5555 -> ipv4:127.0.0.1


def create_servicer(runtime: GatewayRuntime) -> SessionsServicer:
    return SessionsServicer(runtime)
