"""The gateway's life inside a pod: readiness that means "can serve", liveness, and drain on SIGTERM.

Health (grpc.health.v1) is the contract with Kubernetes (k8s/base/gateway-deployment.yaml):
- the API services (`longbow.v1.Generation`, ...) and "" are SERVING only after the engine has run a real
  step (a one-token warm-up), and go back to NOT_SERVING when queued work sees no step for
  `gateway.stall_timeout_s` (a stuck or dead engine thread) or when the gateway drains;
- `longbow.v1.Liveness` stays SERVING through a drain and a short stall; it fails only when the engine is
  gone for good (its thread stopped) or stalled for twice the stall timeout, so kubelet restarts the pod.
Drain: health flips at once, new calls get UNAVAILABLE (retriable), calls in flight get
`gateway.shutdown_timeout_s` to finish, then end with UNAVAILABLE; their KV is freed as they end.
Kubelet probes reach health on a plaintext port of its own (`gateway.health_port`): probes speak neither
TLS nor bearer tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from longbow.services.config import GatewayConfig
from longbow.services.engine.engine import AsyncLLMEngine
from longbow.services.engine.types import Request, SamplingParams

log = logging.getLogger(__name__)

LIVENESS_SERVICE = "longbow.v1.Liveness"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_DRAINING = "server draining: retry on another replica"


class Lifecycle:
    """Owns the health statuses and the drain of one gateway. `api_services` flip together; ""
    follows them (the overall status clients check by default)."""

    def __init__(self, health_servicer: health.aio.HealthServicer, engine: AsyncLLMEngine,
                 config: GatewayConfig, api_services: list[str]):
        self.health, self.engine, self.config = health_servicer, engine, config
        self.api_services = ["", *api_services]
        self.ready = False
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._deadline = asyncio.Event()  # set when the drain timeout ends the calls still in flight
        self._drain_started = asyncio.Event()
        self._warmed = asyncio.Event()
        self._watchdog: asyncio.Task | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None

    # ---- readiness -----------------------------------------------------------------------------
    async def start(self, host: str) -> None:
        """Publish NOT_SERVING, open the probe port, then warm up and watch the engine in the background."""
        for name in self.api_services:
            await self.health.set(name, _NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, _SERVING)
        if self.config.health_port is not None:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{host}:{self.config.health_port}")
            await self._health_server.start()
        self._watchdog = asyncio.create_task(self._watch(), name="longbow-readiness")

    async def wait_warmed_up(self) -> None:
        """Returns once the warm-up step has finished (or failed)."""
        await self._warmed.wait()

    async def _set_ready(self, ready: bool) -> None:
        ready = ready and not self.draining
        if ready != self.ready:
            self.ready = ready
            log.info("readiness=%s", "SERVING" if ready else "NOT_SERVING")
            for name in self.api_services:
                await self.health.set(name, _SERVING if ready else _NOT_SERVING)

    async def _watch(self) -> None:
        try:
            await self._warm_up()
        except Exception as exc:  # the engine cannot serve at all: stay NOT_SERVING, let liveness fail
            log.error("engine warm-up failed: %s", exc)
            await self.health.set(LIVENESS_SERVICE, _NOT_SERVING)
            return
        finally:
            self._warmed.set()
        await self._set_ready(True)  # the engine has just stepped
        watch = StepWatch(self.config.stall_timeout_s)
        period = min(1.0, self.config.stall_timeout_s / 4)
        probe: concurrent.futures.Future | None = None
        while not self.draining:
            if probe is None:
                probe = self.engine.call_soon(_progress)
                watch.sent(time.monotonic())
            # NOTE: a bounded wait on the probe, not a sleep: it returns as soon as the engine answers
            # (asyncio.wait neither raises the probe's error nor cancels it on timeout).
            await asyncio.wait({asyncio.wrap_future(probe)}, timeout=period)
            if probe.done():
                if probe.exception() is not None:  # the engine was shut down: nothing will serve again
                    log.error("engine stopped: %s", probe.exception())
                    await self.health.set(LIVENESS_SERVICE, _NOT_SERVING)
                    await self._set_ready(False)
                    return
                watch.answered(time.monotonic(), *probe.result())
                probe = None
                await self._pace(period)
            now = time.monotonic()
            await self._set_ready(not watch.stalled(now))
            await self.health.set(LIVENESS_SERVICE, _NOT_SERVING if watch.stalled(now, factor=2) else _SERVING)

    async def _warm_up(self) -> None:
        # One real step through the same door every request uses: the model is loaded, the executor
        # (in-process worker or Ray shards) runs, and sampling works.
        request = Request("lifecycle-warm-up", [0], SamplingParams(max_tokens=1))
        await self.engine.generate(request)

    async def _pace(self, period: float) -> None:
        # Between answered probes the loop waits for the next period or the drain, whichever is first.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drain_started.wait(), period)

    # ---- drain ---------------------------------------------------------------------------------
    async def drain(self, server: grpc.aio.Server) -> None:
        """Flip health, refuse new calls, let calls in flight finish up to the timeout, then end them with
        UNAVAILABLE and stop the server. Returns when nothing is left in flight."""
        timeout = self.config.shutdown_timeout_s
        self.draining = True
        self._drain_started.set()
        for name in self.api_services:
            await self.health.set(name, _NOT_SERVING)
        self.ready = False
        log.info("draining: %d calls in flight, timeout %.1f s", self.inflight, timeout)
        # stop() sends GOAWAY (clients reconnect elsewhere) and lets running calls go on for its grace;
        # our own deadline below ends them first, with UNAVAILABLE rather than a bare cancel.
        stopping = asyncio.create_task(server.stop(timeout + 5.0))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        if self.inflight:
            log.warning("drain timeout: ending %d calls with UNAVAILABLE", self.inflight)
            self._deadline.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 5.0)
        await stopping
        log.info("drained")

    async def close(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watchdog
        if self._health_server:
            await self._health_server.stop(0)

    # ---- call tracking (the interceptor) -------------------------------------------------------
    def _enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def _until_deadline(self) -> None:
        await self._deadline.wait()


def _progress(engine) -> tuple[int, bool]:
    """On the engine thread: (steps run so far, whether work is queued or running)."""
    return engine.steps, engine.has_unfinished()


class StepWatch:
    """Decides "stalled" from probe answers: work was waiting and neither a step nor an answer came
    within the stall timeout. Pure bookkeeping on times, so it is tested without an engine."""

    def __init__(self, stall_timeout_s: float):
        self.stall_timeout_s = stall_timeout_s
        self.last_progress = time.monotonic()
        self.last_steps = -1
        self.pending_since: float | None = None

    def sent(self, now: float) -> None:
        self.pending_since = now

    def answered(self, now: float, steps: int, busy: bool) -> None:
        self.pending_since = None
        if steps != self.last_steps or not busy:
            self.last_progress = now
        self.last_steps = steps

    def stalled(self, now: float, factor: float = 1.0) -> bool:
        limit = self.stall_timeout_s * factor
        unanswered = self.pending_since is not None and now - self.pending_since > limit
        return unanswered or now - self.last_progress > limit


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Counts calls in flight for the drain, refuses new ones while draining and ends the ones left
    at the drain deadline with UNAVAILABLE. Health and reflection pass untouched."""

    def __init__(self, lifecycle: Lifecycle):
        self.lifecycle = lifecycle

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        lifecycle = self.lifecycle
        if handler is None or details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, lifecycle), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _stream(handler.unary_stream, lifecycle), handler.request_deserializer, handler.response_serializer)
        return handler


def _unary(behavior, lifecycle: Lifecycle):
    async def wrapped(request, context):
        if lifecycle.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _DRAINING)
        lifecycle._enter()
        call = asyncio.ensure_future(behavior(request, context))
        deadline = asyncio.ensure_future(lifecycle._until_deadline())
        try:
            done, _ = await asyncio.wait({call, deadline}, return_when=asyncio.FIRST_COMPLETED)
            if call in done:
                return call.result()
        finally:
            # The drain deadline or the client (cancel, deadline) ended this call: the handler must stop
            # too, so its request leaves the engine and frees its KV.
            deadline.cancel()
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await call
            lifecycle._leave()
        await context.abort(grpc.StatusCode.UNAVAILABLE, _DRAINING)

    return wrapped


def _stream(behavior, lifecycle: Lifecycle):
    async def wrapped(request, context):
        if lifecycle.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _DRAINING)
        lifecycle._enter()
        responses = behavior(request, context)
        cut = False
        item: asyncio.Future | None = None
        try:
            deadline = asyncio.ensure_future(lifecycle._until_deadline())
            try:
                while True:
                    item = asyncio.ensure_future(anext(responses))
                    done, _ = await asyncio.wait({item, deadline}, return_when=asyncio.FIRST_COMPLETED)
                    if item not in done:
                        cut = True
                        break
                    try:
                        response = item.result()
                    except StopAsyncIteration:
                        break
                    yield response
            finally:
                # The drain deadline, or the client cancelling this call, may leave a step of the handler
                # running: stop it first (aclose() refuses a running generator), then close the handler
                # so its cleanup aborts the engine request and frees its KV.
                deadline.cancel()
                if item is not None and not item.done():
                    item.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                        await item
                await responses.aclose()
        finally:
            lifecycle._leave()
        if cut:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _DRAINING)

    return wrapped
