"""SDK retries against a real gRPC server on a socket: UNAVAILABLE is retried with backoff, `retry=None`
is one call, other codes are never retried. The server is a scripted Generation/Tokenize answering a
given sequence of status codes, so the attempts and their timing are observed where they arrive."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest

from longbow.services.client.sdk import (
    DEFAULT_RETRY,
    AsyncLongbowClient,
    LongbowClient,
    LongbowError,
    RetryPolicy,
)
from longbow.v1 import generation_pb2 as gen_pb


class ScriptedServer:
    """Answers Tokenize with the next code of `codes` (OK after the script runs out) and records when
    each call arrived."""

    def __init__(self, codes: list[grpc.StatusCode]):
        self.codes, self.arrivals, self._lock = list(codes), [], threading.Lock()
        handler = grpc.method_handlers_generic_handler("longbow.v1.Generation", {
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                self._tokenize, request_deserializer=gen_pb.TokenizeRequest.FromString,
                response_serializer=gen_pb.TokenizeResponse.SerializeToString),
        })
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _tokenize(self, request, context):
        with self._lock:
            self.arrivals.append(time.monotonic())
            code = self.codes.pop(0) if self.codes else grpc.StatusCode.OK
        if code != grpc.StatusCode.OK:
            context.abort(code, f"scripted {code.name}")
        return gen_pb.TokenizeResponse(token_ids=[len(request.text)])

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]

    def close(self) -> None:
        self.server.stop(0)


@pytest.fixture
def scripted():
    servers = []

    def make(codes):
        servers.append(ScriptedServer(codes))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
FAST = RetryPolicy(attempts=4, initial_backoff_s=0.05, max_backoff_s=0.2)


def test_backoff_schedule_with_a_fixed_jitter():
    """The waits, with the jitter pinned at its two ends (a fake random source, no clock)."""
    policy = RetryPolicy(attempts=6, initial_backoff_s=0.1, max_backoff_s=0.5)
    assert list(policy.delays(lambda: 0.5)) == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])  # x1.0
    assert list(policy.delays(lambda: 0.0)) == pytest.approx([0.05, 0.1, 0.2, 0.25, 0.25])  # x0.5
    assert list(RetryPolicy(attempts=1).delays(lambda: 0.5)) == []
    assert len(list(DEFAULT_RETRY.delays())) == DEFAULT_RETRY.attempts - 1 == 3
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(attempts=0)


def test_unavailable_is_retried_with_backoff_until_ok(scripted):
    server = scripted([UNAVAILABLE, UNAVAILABLE])
    with LongbowClient(server.address, timeout_s=10, retry=FAST) as client:
        assert client.tokenize("abc") == [3]
    assert len(server.arrivals) == 3
    # each wait is at least half its nominal delay (jitter in [0.5, 1.5)): 0.05 s, then 0.1 s
    gaps = server.gaps()
    assert gaps[0] >= 0.5 * 0.05 and gaps[1] >= 0.5 * 0.1, gaps


def test_async_client_retries_the_same_way(scripted):
    server = scripted([UNAVAILABLE, UNAVAILABLE])

    async def call():
        async with AsyncLongbowClient(server.address, timeout_s=10, retry=FAST) as client:
            return await client.tokenize("abcd")

    assert asyncio.run(call()) == [4]
    assert len(server.arrivals) == 3 and server.gaps()[1] >= 0.5 * 0.1


def test_default_client_retries_three_times(scripted):
    server = scripted([UNAVAILABLE] * 3)
    with LongbowClient(server.address, timeout_s=10) as client:  # DEFAULT_RETRY: 4 attempts
        assert client.tokenize("ab") == [2]
    assert len(server.arrivals) == 4


def test_attempts_are_bounded(scripted):
    server = scripted([UNAVAILABLE] * 10)
    with LongbowClient(server.address, timeout_s=10, retry=RetryPolicy(attempts=3, initial_backoff_s=0.01)) as client:
        with pytest.raises(LongbowError) as err:
            client.tokenize("x")
    assert err.value.code == UNAVAILABLE and len(server.arrivals) == 3


@pytest.mark.parametrize("retry", [None, RetryPolicy(attempts=1)], ids=["None", "attempts=1"])
def test_no_retry_is_one_call(scripted, retry):
    server = scripted([UNAVAILABLE])
    with LongbowClient(server.address, timeout_s=10, retry=retry) as client:
        with pytest.raises(LongbowError) as err:
            client.tokenize("x")
    assert err.value.code == UNAVAILABLE and len(server.arrivals) == 1


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL])
def test_other_codes_are_not_retried(scripted, code):
    server = scripted([code])
    with LongbowClient(server.address, timeout_s=10, retry=FAST) as client:
        with pytest.raises(LongbowError) as err:
            client.tokenize("x")
    assert err.value.code == code and len(server.arrivals) == 1
