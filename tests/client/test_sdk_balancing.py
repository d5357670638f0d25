"""The SDK over several replicas and restarting ones, against real gRPC servers on sockets (scripted
Generation and Sessions services, so where each call lands and what each attempt answered is observed):
multi-address targets get round_robin (both servers get calls) while session calls stay on one replica;
a stream answered UNAVAILABLE before its first chunk is retried, never after it."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import pytest

from longbow.services.client.sdk import AsyncLongbowClient, LongbowClient, LongbowError, RetryPolicy, balancing_policy
from longbow.v1 import generation_pb2 as gen_pb
from longbow.v1 import sessions_pb2 as sessions_pb

FAST_RETRY = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)


class ScriptedReplica:
    """One server: Tokenize answers its name's length; GenerateStream plays the next script entry, a list
    of chunk texts then an optional status to end with (OK once the script runs out: one chunk "ok");
    OpenSession mints ids naming this replica. Records every call it served."""

    def __init__(self, name: str, streams: list[tuple[list[str], grpc.StatusCode | None]] = ()):
        self.name, self.streams, self.calls, self._lock = name, list(streams), [], threading.Lock()
        generation = grpc.method_handlers_generic_handler("longbow.v1.Generation", {
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                self._tokenize, gen_pb.TokenizeRequest.FromString, gen_pb.TokenizeResponse.SerializeToString),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self._stream, gen_pb.GenerateRequest.FromString, gen_pb.GenerateChunk.SerializeToString),
        })
        sessions = grpc.method_handlers_generic_handler("longbow.v1.Sessions", {
            "OpenSession": grpc.unary_unary_rpc_method_handler(
                self._open, sessions_pb.OpenSessionRequest.FromString,
                sessions_pb.OpenSessionResponse.SerializeToString),
        })
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[generation, sessions])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _record(self, method: str) -> None:
        with self._lock:
            self.calls.append(method)

    def _tokenize(self, request, context):
        self._record("Tokenize")
        return gen_pb.TokenizeResponse(token_ids=[len(self.name)])

    def _stream(self, request, context):
        self._record("GenerateStream")
        with self._lock:
            texts, end = self.streams.pop(0) if self.streams else (["ok"], None)
        for text in texts:
            yield gen_pb.GenerateChunk(text=text)
        if end is not None:
            context.abort(end, f"scripted {end.name}")

    def _open(self, request, context):
        self._record("OpenSession")
        return sessions_pb.OpenSessionResponse(session_id=f"{self.name}/s{len(self.calls)}")

    def count(self, method: str) -> int:
        return self.calls.count(method)


@pytest.fixture
def replicas():
    started = []

    def make(*names, streams=()):
        for name in names:
            started.append(ScriptedReplica(name, streams))
        return started[-len(names):]

    yield make
    for replica in started:
        replica.server.stop(0)


def _two_addresses(a: ScriptedReplica, b: ScriptedReplica) -> str:
    return f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"


def test_policy_follows_the_target_scheme():
    assert balancing_policy("dns:///longbow-gateway-headless.longbow:50051") == "round_robin"
    assert balancing_policy("ipv4:10.0.0.1:50051,10.0.0.2:50051") == "round_robin"
    assert balancing_policy("localhost:50051") is None  # one address: gRPC's default (pick_first)
    assert balancing_policy("dns:///x:1", load_balancing="pick_first") == "pick_first"


def test_round_robin_reaches_both_replicas_and_sessions_stay_on_one(replicas):
    a, b = replicas("replica-a", "replica-b")
    with LongbowClient(_two_addresses(a, b), timeout_s=10) as client:
        for _ in range(20):
            client.tokenize("x")
        sessions = [client.open_session("text") for _ in range(6)]
    assert a.count("Tokenize") > 0 and b.count("Tokenize") > 0, (a.calls, b.calls)
    assert a.count("Tokenize") + b.count("Tokenize") == 20
    owners = {session.split("/")[0] for session in sessions}
    assert len(owners) == 1, sessions  # every session call of this client reached one replica


def test_pick_first_on_request_sticks_to_one_replica(replicas):
    a, b = replicas("replica-a", "replica-b")
    with LongbowClient(_two_addresses(a, b), timeout_s=10, load_balancing="pick_first") as client:
        for _ in range(10):
            client.tokenize("x")
    assert sorted([a.count("Tokenize"), b.count("Tokenize")]) == [0, 10]


def test_dns_target_gets_round_robin_and_resolves(replicas):
    (a,) = replicas("replica-a")
    with LongbowClient(f"dns:///localhost:{a.port}", timeout_s=10) as client:
        assert client.tokenize("x") == [len("replica-a")]


def test_a_stream_refused_before_output_is_retried(replicas):
    unavailable = grpc.StatusCode.UNAVAILABLE
    (a,) = replicas("replica-a", streams=[([], unavailable), ([], unavailable), (["he", "llo"], None)])
    with LongbowClient(f"127.0.0.1:{a.port}", timeout_s=10, retry=FAST_RETRY) as client:
        assert [c.text for c in client.generate_stream("hi")] == ["he", "llo"]
    assert a.count("GenerateStream") == 3


def test_a_stream_cut_after_output_is_never_retried(replicas):
    (a,) = replicas("replica-a", streams=[(["he"], grpc.StatusCode.UNAVAILABLE)])
    seen = []
    with LongbowClient(f"127.0.0.1:{a.port}", timeout_s=10, retry=FAST_RETRY) as client:
        with pytest.raises(LongbowError) as cut:
            for chunk in client.generate_stream("hi"):
                seen.append(chunk.text)
    assert cut.value.code == grpc.StatusCode.UNAVAILABLE
    assert seen == ["he"] and a.count("GenerateStream") == 1  # no second attempt, no repeated "he"


def test_stream_retries_stop_at_the_policy_and_skip_other_codes(replicas):
    (a,) = replicas("replica-a", streams=[([], grpc.StatusCode.UNAVAILABLE)] * 5)
    with LongbowClient(f"127.0.0.1:{a.port}", timeout_s=10, retry=FAST_RETRY) as client:
        with pytest.raises(LongbowError) as refused:
            list(client.generate_stream("hi"))
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and a.count("GenerateStream") == 4
    (b,) = replicas("replica-b", streams=[([], grpc.StatusCode.INVALID_ARGUMENT)])
    with LongbowClient(f"127.0.0.1:{b.port}", timeout_s=10, retry=FAST_RETRY) as client:
        with pytest.raises(LongbowError) as invalid:
            list(client.generate_stream("hi"))
    assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT and b.count("GenerateStream") == 1


def test_async_streams_retry_only_before_output(replicas):
    unavailable = grpc.StatusCode.UNAVAILABLE
    (a,) = replicas("replica-a", streams=[([], unavailable), (["x"], None), (["y"], unavailable)])

    async def run():
        async with AsyncLongbowClient(f"127.0.0.1:{a.port}", timeout_s=10, retry=FAST_RETRY) as client:
            first = [c.text async for c in client.generate_stream("hi")]
            seen = []
            with pytest.raises(LongbowError) as cut:
                async for chunk in client.generate_stream("hi"):
                    seen.append(chunk.text)
            return first, seen, cut.value.code

    first, seen, code = asyncio.run(run())
    assert first == ["x"] and seen == ["y"] and code == grpc.StatusCode.UNAVAILABLE
    assert a.count("GenerateStream") == 3
