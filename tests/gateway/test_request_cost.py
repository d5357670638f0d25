"""What one request may cost the gateway (issue 16, item 4), over its real socket with the real model:
bodies of unauthenticated calls are never parsed, reflection needs the token while health stays open,
the receive limit is sized to the largest valid request, tokenizing a large prompt does not stall other
RPCs, and clients' request ids cannot collide with each other's or the server's."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from longbow.services.client.sdk import LongbowClient, LongbowError
from longbow.services.config import LongbowConfig
from longbow.services.gateway.errors import ErrorInterceptor
from longbow.services.gateway.limits import receive_limit_bytes
from longbow.v1 import generation_pb2 as gen_pb
from tests.conftest import RunningGateway

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def authed(loaded_model, tokenizer):
    running = RunningGateway(loaded_model, tokenizer, auth_token=TOKEN)
    yield running
    running.close()


def _list_services(address: str, metadata=()) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            metadata=metadata, timeout=10)
        return [s.name for reply in replies for s in reply.list_services_response.service]


def test_reflection_needs_the_token_and_health_stays_open(authed):
    with pytest.raises(grpc.RpcError) as error:
        _list_services(authed.address)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "longbow.v1.Generation" in _list_services(authed.address, (("authorization", f"Bearer {TOKEN}"),))
    with grpc.insecure_channel(authed.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_unauthenticated_bodies_are_refused_before_parsing(authed):
    # Garbage that cannot parse: answered UNAUTHENTICATED (not INVALID_ARGUMENT), so it was never parsed.
    with grpc.insecure_channel(authed.address) as channel:
        call = channel.unary_unary("/longbow.v1.Generation/Tokenize")
        with pytest.raises(grpc.RpcError) as error:
            call(b"\xff" * 1_000_000, timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with LongbowClient(authed.address, token=TOKEN) as client:
        assert client.tokenize("hello") == client.tokenize("hello") != []


def test_unauthenticated_handler_never_calls_the_real_deserializer():
    parsed = []
    handler = grpc.unary_unary_rpc_method_handler(lambda r, c: r, lambda data: parsed.append(data) or data, None)

    class Details:
        method = "/longbow.v1.Generation/Tokenize"
        invocation_metadata = (("authorization", "Bearer wrong"),)

    async def continuation(details):
        return handler

    import asyncio

    refused = asyncio.run(ErrorInterceptor(TOKEN).intercept_service(continuation, Details()))
    assert refused.request_deserializer(b"x" * 100) is None and parsed == []
    Details.invocation_metadata = (("authorization", f"Bearer {TOKEN}"),)
    allowed = asyncio.run(ErrorInterceptor(TOKEN).intercept_service(continuation, Details()))
    allowed.request_deserializer(b"ok")
    assert parsed == [b"ok"]


def test_receive_limit_is_sized_to_the_largest_valid_request(gateway):
    limit = receive_limit_bytes(LongbowConfig())
    assert 4_000_000 < limit <= 6 * 1024 * 1024  # 4 bytes x 1M characters + 1 MiB, not 64 MB
    request = gen_pb.TokenizeRequest(text="a" * (limit + 1)).SerializeToString()
    with grpc.insecure_channel(gateway.address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            channel.unary_unary("/longbow.v1.Generation/Tokenize")(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with LongbowClient(gateway.address) as client:  # a prompt at the character limit still gets through
        with pytest.raises(LongbowError) as too_long:
            client.tokenize("a" * (LongbowConfig().gateway.max_prompt_chars + 1))
    assert too_long.value.code == grpc.StatusCode.INVALID_ARGUMENT  # the gateway's own check, past the limit


def test_tokenizing_a_large_prompt_does_not_stall_other_rpcs(gateway):
    text = "word " * 200_000  # 1M characters: the largest valid prompt
    done = threading.Event()
    seconds: list[float] = []

    def tokenize():
        with LongbowClient(gateway.address, timeout_s=120) as client:
            started = time.perf_counter()
            assert len(client.tokenize(text)) >= 200_000
            seconds.append(time.perf_counter() - started)
        done.set()

    gaps = []
    with LongbowClient(gateway.address, timeout_s=30) as client:
        client.server_info()  # connected before timing
        worker = threading.Thread(target=tokenize)
        worker.start()
        while not done.is_set():
            started = time.perf_counter()
            client.server_info()
            gaps.append(time.perf_counter() - started)
        worker.join(120)
    assert seconds and seconds[0] > 0.3, "the tokenize call was too quick to show anything"
    # NOTE: on the event loop every ping during the call waited for all of it (1.7 s measured, issue 16).
    assert len(gaps) >= 3 and max(gaps) < min(0.5, seconds[0] / 2), (max(gaps), seconds[0])


def test_client_request_ids_cannot_collide(gateway):
    ids = ["same", "same", "gw-0", "gw-1", "score-0", ""]
    results: dict[int, str] = {}

    def generate(index: int, request_id: str):
        with LongbowClient(gateway.address, timeout_s=120) as client:
            results[index] = client.generate("Count: one, two,", max_tokens=3, request_id=request_id).request_id

    threads = [threading.Thread(target=generate, args=(i, r)) for i, r in enumerate(ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert [results.get(i) for i in range(5)] == ids[:5]  # each client's id echoed back
    assert results[5].startswith("gw-") and results[5] not in ids[:5]
    assert gateway.wait_until_idle()["kv_blocks_used"] == 0
