"""The gateway over a real socket with the real model: generation, cancellation, deadlines, auth,
health, reflection, bad input, and a client not written with grpcio."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from longbow.v1 import generation_pb2 as gen_pb
from longbow.services.client.sdk import LongbowClient, LongbowError
from tests.conftest import RunningGateway

pytestmark = pytest.mark.slow


@pytest.fixture
def client(gateway):
    with LongbowClient(gateway.address, timeout_s=60) as c:
        yield c


def test_generate_unary_and_stream_agree(client, gateway):
    unary = client.generate("The capital of France is", max_tokens=12, min_tokens=12)
    assert unary.completion_tokens == 12 and len(unary.token_ids) == 12
    assert unary.finish_reason == "length" and unary.ttft_s > 0
    chunks = list(client.generate_stream("The capital of France is", max_tokens=12, min_tokens=12))
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == unary.token_ids
    assert chunks[-1].finish_reason == "length"
    last = chunks[-1]
    assert (last.prompt_tokens, last.completion_tokens) == (unary.prompt_tokens, 12) and last.request_id
    assert gateway.wait_until_idle()["kv_blocks_used"] == 0


def test_chat_logprobs_and_stop_string(client):
    result = client.generate(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, logprobs=True)
    assert len(result.logprobs) == len(result.token_ids) and all(lp <= 0 for lp in result.logprobs)
    free = client.generate("One, two, three, four, five,", max_tokens=10, min_tokens=10)
    stop = free.text.split()[1]
    cut = client.generate("One, two, three, four, five,", max_tokens=10, stop=[stop])
    assert cut.text == free.text[: free.text.index(stop)] and cut.finish_reason == "stop"


def test_score_and_tokenize(client):
    ids = client.tokenize("Paris is the capital of France.")
    scored_ids, logprobs = client.score(token_ids=ids)
    assert scored_ids == ids and len(logprobs) == len(ids) - 1 and all(lp <= 0 for lp in logprobs)
    text_ids, _ = client.score("Paris is the capital of France.")
    assert text_ids == ids


# NOTE: a request of 3,000 forced tokens (min_tokens) runs one engine step per token after its prompt:
# minutes on this CPU (~13 tokens/s), and still > 30 s at 100 tokens/s. The tests below wait at most
# ABORT_BOUND_S for its KV and then check that the engine ran fewer steps than the request needed, so
# they pass only if the abort freed it: never because the request finished by itself, on any machine.
LONG_TOKENS = 3000
ABORT_BOUND_S = 20.0


def _assert_aborted_in_time(gateway, steps_before: int) -> None:
    stats = gateway.wait_until_idle(timeout=ABORT_BOUND_S)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0, stats
    assert stats["steps"] - steps_before < LONG_TOKENS, "the request ran to the end: it was never aborted"


def test_cancelled_stream_frees_kv(client, gateway):
    steps_before = gateway.engine_stats()["steps"]
    stream = client.generate_stream("Write a very long story.", max_tokens=LONG_TOKENS, min_tokens=LONG_TOKENS)
    received = [next(stream) for _ in range(3)]
    assert all(c.finish_reason is None for c in received)  # still generating when cancelled
    stream.close()  # the client stops reading: the call is cancelled
    _assert_aborted_in_time(gateway, steps_before)


def test_deadline_exceeded_frees_kv(gateway):
    steps_before = gateway.engine_stats()["steps"]
    with LongbowClient(gateway.address, timeout_s=0.3) as short:
        with pytest.raises(LongbowError) as err:
            short.generate("Tell me everything.", max_tokens=LONG_TOKENS, min_tokens=LONG_TOKENS)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_aborted_in_time(gateway, steps_before)


def test_full_gateway_answers_resource_exhausted(loaded_model, tokenizer):
    import time

    full = RunningGateway(loaded_model, tokenizer, max_inflight=1)
    try:
        with LongbowClient(full.address, timeout_s=60) as client:
            stream = client.generate_stream("Keep going.", max_tokens=LONG_TOKENS, min_tokens=LONG_TOKENS)
            next(stream)  # the one generation slot is taken (the request cannot finish within the test)
            with pytest.raises(LongbowError) as err:
                client.generate("one more", max_tokens=2)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in err.value.message
            stream.close()
            assert full.wait_until_idle(timeout=ABORT_BOUND_S)["kv_blocks_used"] == 0
            # the slot is released as the cancelled call unwinds: poll (bounded) until a call gets it
            deadline = time.monotonic() + ABORT_BOUND_S
            while True:
                try:
                    assert client.generate("one more", max_tokens=2).completion_tokens >= 1
                    break
                except LongbowError as busy:
                    assert busy.code == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                    time.sleep(0.05)  # polling interval of the bounded wait
    finally:
        full.close()


@pytest.mark.parametrize(
    "kwargs, code",
    [
        (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(token_ids=[1, 2, 10**8]), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="hi", temperature=-2.0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="hi", top_p=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="word " * 9000, max_tokens=10), grpc.StatusCode.INVALID_ARGUMENT),  # beyond context
        (dict(messages=[{"role": "wizard", "content": "x"}]), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="hi", stop=[""]), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_requests_get_clear_status_and_server_keeps_serving(client, kwargs, code):
    with pytest.raises(LongbowError) as err:
        client.generate(**kwargs)
    assert err.value.code == code and err.value.message
    assert client.generate("ok", max_tokens=2).completion_tokens >= 1


def test_invalid_utf8_bytes_are_invalid_argument(gateway):
    # A string field carrying invalid UTF-8, sent as raw bytes (no grpcio serializer can produce it).
    broken = b"\x0a\x03\xff\xfe\xfd"  # field 1 (prompt), length 3, invalid UTF-8
    with grpc.insecure_channel(gateway.address) as channel:
        call = channel.unary_unary("/longbow.v1.Generation/Generate", request_serializer=None,
                                   response_deserializer=gen_pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            call(broken, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection(gateway):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", "longbow.v1.Generation"]:
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"longbow.v1.Generation", "longbow.v1.Retrieval", "longbow.v1.CodeAssist", "longbow.v1.Sessions",
            "longbow.v1.ServerInfoService", "grpc.health.v1.Health"} <= services


def test_server_info(client, gateway):
    info = client.server_info()
    assert info.max_context_tokens == 8192 and info.token_budget == 128
    assert "longbow.v1.Generation" in info.implemented_services


def test_auth_required_when_token_configured(loaded_model, tokenizer):
    secured = RunningGateway(loaded_model, tokenizer, auth_token="s3cret")
    try:
        with LongbowClient(secured.address, retry=None) as anonymous:
            with pytest.raises(LongbowError) as err:
                anonymous.generate("hi", max_tokens=2)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with LongbowClient(secured.address, token="wrong") as wrong:
            with pytest.raises(LongbowError) as err:
                wrong.generate("hi", max_tokens=2)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with LongbowClient(secured.address, token="s3cret") as good:
            assert good.generate("hi", max_tokens=2).completion_tokens >= 1
    finally:
        secured.close()


def test_metrics_endpoint_counts_requests(client, gateway):
    import urllib.request

    client.generate("metrics please", max_tokens=2)
    body = urllib.request.urlopen(f"http://127.0.0.1:{gateway.gateway.metrics_port}/metrics", timeout=10).read().decode()
    assert 'longbow_requests_total{code="OK",method="/longbow.v1.Generation/Generate"}' in body
    assert "longbow_time_to_first_token_seconds_count" in body


def test_grpclib_client_talks_to_the_server(gateway):
    """A client built on grpclib (pure-Python HTTP/2), not grpcio."""
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    async def call():
        host, port = gateway.address.split(":")
        channel = Channel(host, int(port))
        try:
            async with channel.request("/longbow.v1.Generation/Generate", Cardinality.UNARY_UNARY,
                                       gen_pb.GenerateRequest, gen_pb.GenerateResponse, timeout=60) as stream:
                request = gen_pb.GenerateRequest(prompt="Hello from grpclib", sampling=gen_pb.SamplingOptions(max_tokens=4))
                await stream.send_message(request, end=True)
                return await stream.recv_message()
        finally:
            channel.close()

    response = asyncio.run(call())
    assert len(response.token_ids) >= 1 and response.usage.prompt_tokens > 0


def test_tls_when_certificates_are_given(loaded_model, tokenizer, tmp_path):
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    secured = RunningGateway(loaded_model, tokenizer, tls_cert=str(cert), tls_key=str(key))
    try:
        with LongbowClient(secured.address, root_certificates=cert.read_bytes()) as tls_client:
            assert tls_client.generate("hello over TLS", max_tokens=2).completion_tokens >= 1
        with LongbowClient(secured.address, retry=None, timeout_s=5) as plaintext:
            with pytest.raises(LongbowError) as err:
                plaintext.generate("no TLS", max_tokens=2)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        secured.close()
