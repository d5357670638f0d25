"""The gateway in a pod's life, over real sockets with the real model: readiness only after the engine has
stepped and back to NOT_SERVING while it is stuck; liveness fails once the engine is gone; SIGTERM drains
a real `longbow serve` process (health flips at once, new calls UNAVAILABLE, short streams finish, long
ones end with UNAVAILABLE at the drain timeout, exit 0)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from longbow.v1 import generation_pb2 as gen_pb, generation_pb2_grpc

pytestmark = pytest.mark.slow

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(port: int, service: str) -> int | None:
    """The health status on 127.0.0.1:port, or None while nothing answers there."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            return None


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)  # polling period of a bounded wait on an external process/socket
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_readiness_follows_the_engine(loaded_model, tokenizer):
    from longbow.services.config import EngineConfig, GatewayConfig, LongbowConfig, RagConfig
    from longbow.services.engine.engine import AsyncLLMEngine, LLMEngine
    from longbow.services.gateway.server import start_gateway

    health_port = _free_port()
    data = tempfile.TemporaryDirectory(prefix="longbow-lifecycle-")
    config = LongbowConfig(engine=EngineConfig(token_budget=128, num_blocks=256),
                           gateway=GatewayConfig(port=0, metrics_port=None, health_port=health_port, stall_timeout_s=1.0),
                           rag=RagConfig(data_dir=data.name))
    engine = AsyncLLMEngine(LLMEngine(config, loaded_model))
    gate = threading.Event()
    engine.call_soon(lambda e: gate.wait(60))  # the engine thread is stuck before the gateway starts
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    started = asyncio.run_coroutine_threadsafe(start_gateway(config, engine, tokenizer), loop)
    try:
        # The probe port answers while the engine has not stepped: NOT_SERVING, but alive.
        _wait_for(lambda: _status(health_port, "") is not None, 60, "the health port")
        assert _status(health_port, "longbow.v1.Generation") == NOT_SERVING
        assert _status(health_port, "") == NOT_SERVING
        assert _status(health_port, "longbow.v1.Liveness") == SERVING
        gate.set()
        gateway = started.result(60)
        _wait_for(lambda: _status(health_port, "longbow.v1.Generation") == SERVING, 10, "SERVING after a step")
        assert engine.engine.steps >= 1

        stuck = threading.Event()
        engine.call_soon(lambda e: stuck.wait(60))  # a step that never returns, as far as the gateway sees
        _wait_for(lambda: _status(health_port, "longbow.v1.Generation") == NOT_SERVING, 10, "NOT_SERVING when stuck")
        stuck.set()
        _wait_for(lambda: _status(health_port, "longbow.v1.Generation") == SERVING, 10, "SERVING once unstuck")

        engine.shutdown()  # the engine is gone for good: liveness fails, kubelet restarts the pod
        _wait_for(lambda: _status(health_port, "longbow.v1.Liveness") == NOT_SERVING, 10, "liveness NOT_SERVING")
        assert _status(health_port, "longbow.v1.Generation") == NOT_SERVING
        asyncio.run_coroutine_threadsafe(gateway.stop(0), loop).result(30)
    finally:
        gate.set()
        engine.shutdown()
        loop.call_soon_threadsafe(loop.stop)
        data.cleanup()


def _stream(channel, max_tokens: int):
    stub = generation_pb2_grpc.GenerationStub(channel)
    request = gen_pb.GenerateRequest(prompt="Write a long story about a lighthouse.",
                                     sampling=gen_pb.SamplingOptions(max_tokens=max_tokens, min_tokens=max_tokens))
    return stub.GenerateStream(request, timeout=120)


def test_sigterm_drains_a_real_process(tmp_path):
    port, health_port = _free_port(), _free_port()
    (tmp_path / "longbow.toml").write_text(f"""
[engine]
token_budget = 64
[gateway]
port = {port}
health_port = {health_port}
shutdown_timeout_s = 8.0
[rag]
data_dir = "{tmp_path / 'rag'}"
""")
    process = subprocess.Popen([sys.executable, "-m", "longbow.services.cli", "--config", str(tmp_path / "longbow.toml"),
                                "serve", "--no-metrics"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: process.poll() is not None or _status(health_port, "longbow.v1.Generation") == SERVING,
                  180, "the gateway to become ready")
        assert process.poll() is None, process.stdout.read()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as short_channel, \
                grpc.insecure_channel(f"127.0.0.1:{port}") as long_channel:
            short, long = _stream(short_channel, 8), _stream(long_channel, 4000)
            first_short, first_long = next(short), next(long)  # both streams are producing
            assert first_short.text is not None and first_long.text is not None
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _wait_for(lambda: _status(health_port, "longbow.v1.Generation") == NOT_SERVING, 5, "NOT_SERVING on SIGTERM")
            with grpc.insecure_channel(f"127.0.0.1:{port}") as fresh:
                with pytest.raises(grpc.RpcError) as refused:
                    next(_stream(fresh, 4))
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(short)  # the short stream finishes normally inside the drain timeout
            assert rest[-1].finish_reason == gen_pb.FINISH_REASON_LENGTH
            with pytest.raises(grpc.RpcError) as cut:
                list(long)
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value.details()
            assert 7.0 < time.monotonic() - sent < 20.0  # cut at the drain timeout (8 s), not before
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
