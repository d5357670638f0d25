"""Fuzzing the gateway over its real socket with the real model: random prompts, chats, token ids and
sampling options, invalid UTF-8 inside string fields, and raw random bytes as request bodies.

Property: every call ends OK or with a status that names the caller's mistake or a limit (_EXPECTED),
never INTERNAL / UNKNOWN (a server bug) or UNAVAILABLE (a failed engine step); and afterwards the gateway
still serves a normal request and the engine holds no KV. Each call has a short deadline so a fuzzed
max_tokens cannot make the run slow: DEADLINE_EXCEEDED is an accepted answer.

The examples come from a fixed seed (FUZZ_SEED, printed; set LONGBOW_FUZZ_SEED to explore others), and
the properties are not only "no server bug": a stated share of generated requests must be answered OK
(past validation, through the model), requests built only from valid values must never be refused,
and broken bodies get exactly INVALID_ARGUMENT.
"""

from __future__ import annotations

import os
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, event, given, note, seed, settings
from hypothesis import strategies as st

from longbow.v1 import generation_pb2 as gen_pb
from longbow.services.client.sdk import LongbowClient, LongbowError
from tests.conftest import RunningGateway

pytestmark = pytest.mark.slow

# NOTE: Generation has no NOT_FOUND or UNIMPLEMENTED answer to give: a fuzzed body meeting one is a bug.
_EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ_SEED = int(os.environ.get("LONGBOW_FUZZ_SEED", "19"))
# Shares of answers asserted below, with the fixed seed (measured on a loaded 2-core machine: see
# docs/testing.md); DEADLINE_EXCEEDED on a slow machine is what keeps them below the measured values.
MIN_OK_SHARE_GENERATE = 0.5
MIN_OK_SHARE_SCORE_TOKENIZE = 0.5
_DEADLINE_S = 3.0
_METHODS = ("Generate", "GenerateStream", "Score", "Tokenize")
_VOCAB = 49152  # SmolLM2; the strategies straddle it


def _fuzz_settings(examples: int):
    print(f"hypothesis seed {FUZZ_SEED} (LONGBOW_FUZZ_SEED)")  # shown with a failure's captured output

    def apply(test):
        return seed(FUZZ_SEED)(settings(max_examples=examples, deadline=None, database=None,
                                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(test))
    return apply


def _share(codes: Counter, code: grpc.StatusCode) -> float:
    return codes[code] / max(1, sum(codes.values()))


# ---- strategies ---------------------------------------------------------------------------------
# NOTE: drawing every field from its full range makes ~90% of requests fail the first check (NaN
# temperature, a 4-billion max_tokens) and none reach the model. So each request draws a few fields
# from their wild range and the rest from a plausible one: most requests then generate, and every
# wild value still meets otherwise valid requests.
_U32 = st.integers(0, 2**32 - 1)
_FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)  # negatives, subnormals, NaN, inf
_CHAR = st.characters(codec="utf-8")  # any code point but surrogates (protobuf cannot encode those)
_TEXT = st.text(_CHAR, max_size=40)  # control chars, NUL, combining marks, emoji...
_TOKEN = st.one_of(st.integers(0, _VOCAB - 1), st.integers(_VOCAB - 2, _VOCAB + 2), _U32)
_VALID_TOKENS = st.lists(st.integers(0, _VOCAB - 1), min_size=1, max_size=12)
_CHAT_ROLE = st.sampled_from(["system", "user", "assistant"])
# field -> (plausible, wild)
_FIELDS = {
    "max_tokens": (st.integers(1, 8), _U32),
    "min_tokens": (st.integers(0, 4), _U32),
    "temperature": (st.one_of(st.just(0.0), st.floats(0, 2, width=32)), _FLOAT32),
    "top_p": (st.floats(0, 1, width=32), _FLOAT32),
    "top_k": (st.integers(0, 100), _U32),
    "seed": (st.none(), st.integers(0, 2**64 - 1)),
    "stop": (st.lists(st.text(_CHAR, min_size=1, max_size=6), max_size=2),
             st.lists(_TEXT, max_size=3)),
    "stop_token_ids": (st.lists(st.integers(0, _VOCAB - 1), max_size=2), st.lists(_TOKEN, max_size=3)),
    "prompt": (st.text(_CHAR, min_size=1, max_size=40), _TEXT),
    "role": (_CHAT_ROLE, st.one_of(_CHAT_ROLE, _TEXT)),
    "token_ids": (_VALID_TOKENS, st.lists(_TOKEN, max_size=12)),
    "request_id": (st.just(""), _TEXT),
    "input": (st.sampled_from(["prompt", "chat", "token_ids"]),
              st.sampled_from(["prompt", "chat", "token_ids", None])),  # None: no input at all
    "has_sampling": (st.just(True), st.booleans()),  # no SamplingOptions: the server's default 128 tokens
}


@st.composite
def generate_requests(draw, with_validity: bool = False):
    """A GenerateRequest; with_validity: (request, valid) where valid means every field was drawn from
    its plausible range and min_tokens <= max_tokens, so the server has no reason to refuse it."""
    wild = draw(st.sets(st.sampled_from(sorted(_FIELDS)), max_size=3))
    field = {name: draw(pair[name in wild]) for name, pair in _FIELDS.items()}
    request = gen_pb.GenerateRequest(request_id=field["request_id"])
    valid = not wild and field["min_tokens"] <= field["max_tokens"]
    if field["input"] == "prompt":
        request.prompt = field["prompt"]
    elif field["input"] == "chat":
        contents = draw(st.lists(_TEXT, min_size="input" not in wild, max_size=3))
        request.chat.SetInParent()  # an empty chat is still a chosen oneof
        request.chat.messages.extend(gen_pb.ChatMessage(role=field["role"], content=c) for c in contents)
    elif field["input"] == "token_ids":
        request.token_ids.SetInParent()
        request.token_ids.ids.extend(field["token_ids"])
    if field["has_sampling"]:
        request.sampling.CopyFrom(gen_pb.SamplingOptions(
            max_tokens=field["max_tokens"], min_tokens=field["min_tokens"], temperature=field["temperature"],
            top_p=field["top_p"], top_k=field["top_k"], seed=field["seed"], stop=field["stop"],
            stop_token_ids=field["stop_token_ids"], logprobs=draw(st.booleans()),
            ignore_eos=draw(st.booleans())))
    return (request, valid) if with_validity else request


@st.composite
def score_or_tokenize_requests(draw) -> tuple[str, bytes]:
    if draw(st.booleans()):
        request = gen_pb.TokenizeRequest(text=draw(_TEXT), chat=draw(st.booleans()))
        return "Tokenize", request.SerializeToString()
    if draw(st.booleans()):
        return "Score", gen_pb.ScoreRequest(text=draw(_TEXT)).SerializeToString()
    ids = gen_pb.TokenIds(ids=draw(st.lists(_TOKEN, max_size=12)))
    return "Score", gen_pb.ScoreRequest(token_ids=ids).SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(path: tuple[int, ...], payload: bytes) -> bytes:
    """Wire bytes of `payload` as the string/bytes field at `path` (field numbers, outermost first)."""
    for number in reversed(path):
        payload = _varint(number << 3 | 2) + _varint(len(payload)) + payload
    return payload


# Where a GenerateRequest holds strings: prompt, request_id, chat.messages[].role/content, sampling.stop[].
_STRING_FIELDS = [(1,), (5,), (2, 1, 1), (2, 1, 2), (4, 7)]
# Never valid UTF-8: a stray 0xFF, a truncated sequence, an encoded surrogate, an overlong '/'.
_NEVER_UTF8 = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
_BROKEN_UTF8 = st.tuples(st.binary(max_size=8), _NEVER_UTF8, st.binary(max_size=8)).map(b"".join)


# ---- calls ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def channel(gateway):
    with grpc.insecure_channel(gateway.address) as opened:
        yield opened


def _status(channel: grpc.Channel, method: str, body: bytes,
            deadline_s: float = _DEADLINE_S) -> tuple[grpc.StatusCode, str]:
    """Sends raw request bytes (no serializer) and drains the answer; returns the final status."""
    path = f"/longbow.v1.Generation/{method}"
    try:
        if method == "GenerateStream":
            for _ in channel.unary_stream(path)(body, timeout=deadline_s):
                pass
        else:
            channel.unary_unary(path)(body, timeout=deadline_s)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def _assert_expected(channel: grpc.Channel, method: str, body: bytes) -> grpc.StatusCode:
    code, details = _status(channel, method, body)
    note(f"{method} {body!r} -> {code.name}: {details}")
    event(f"{method} -> {code.name}")  # --hypothesis-show-statistics: how many calls got how deep
    assert code in _EXPECTED, f"{method} answered {code.name} ({details}) to {body!r}"
    return code


def _assert_still_serving(gateway) -> None:
    stats = gateway.wait_until_idle()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    with LongbowClient(gateway.address, timeout_s=60) as client:
        assert client.generate("Hello", max_tokens=2).completion_tokens >= 1


# ---- properties -----------------------------------------------------------------------------------
def test_fuzzed_generate_requests(channel, gateway):
    codes = Counter()

    @_fuzz_settings(examples=45)
    @given(drawn=generate_requests(with_validity=True), method=st.sampled_from(["Generate", "GenerateStream"]))
    def check(drawn, method):
        request, valid = drawn
        code = _assert_expected(channel, method, request.SerializeToString())
        codes[code] += 1
        if valid:  # a request of valid values is answered, or runs out of its short deadline
            assert code in {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}, (code, request)

    check()
    print(f"seed {FUZZ_SEED}: {dict((c.name, n) for c, n in codes.items())}")
    assert _share(codes, grpc.StatusCode.OK) >= MIN_OK_SHARE_GENERATE, codes
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > 0, codes  # and wild values met validation
    _assert_still_serving(gateway)


def test_fuzzed_score_and_tokenize_requests(channel, gateway):
    codes = Counter()

    @_fuzz_settings(examples=10)
    @given(call=score_or_tokenize_requests())
    def check(call):
        codes[_assert_expected(channel, *call)] += 1

    check()
    print(f"seed {FUZZ_SEED}: {dict((c.name, n) for c, n in codes.items())}")
    assert _share(codes, grpc.StatusCode.OK) >= MIN_OK_SHARE_SCORE_TOKENIZE, codes
    _assert_still_serving(gateway)


def test_invalid_utf8_in_any_string_field_is_invalid_argument(channel, gateway):
    @_fuzz_settings(examples=10)
    @given(base=generate_requests(), path=st.sampled_from(_STRING_FIELDS), broken=_BROKEN_UTF8,
           method=st.sampled_from(["Generate", "GenerateStream"]))
    def check(base, path, broken, method):
        body = base.SerializeToString() + _length_delimited(path, broken)  # appended: the last value wins
        assert _assert_expected(channel, method, body) == grpc.StatusCode.INVALID_ARGUMENT

    check()
    _assert_still_serving(gateway)


def test_random_bytes_as_request_body(channel, gateway):
    @_fuzz_settings(examples=25)
    @given(body=st.binary(max_size=200), method=st.sampled_from(_METHODS))
    def check(body, method):
        # random bytes either parse to some request (then any expected answer) or are INVALID_ARGUMENT
        _assert_expected(channel, method, body)

    check()
    _assert_still_serving(gateway)


# ---- regressions: bugs the fuzz above found (now fixed) ---------------------------------------------
_TINY_TEMPERATURE = gen_pb.GenerateRequest(
    prompt="Hello", sampling=gen_pb.SamplingOptions(max_tokens=2, temperature=1e-45))


def test_tiny_temperature_is_not_an_engine_failure(channel):
    for method in ("Generate", "GenerateStream"):
        code, details = _status(channel, method, _TINY_TEMPERATURE.SerializeToString())
        acceptable = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
        assert code in acceptable, f"{method}: {code.name}: {details}"


def test_a_bad_request_does_not_fail_other_requests_in_flight(channel, gateway):
    with LongbowClient(gateway.address, timeout_s=60, retry=None) as client:
        victim = client.generate_stream("Tell me a long story.", max_tokens=64, min_tokens=64)
        first = next(victim)
        _status(channel, "Generate", _TINY_TEMPERATURE.SerializeToString())
        rest = list(victim)  # raised LongbowError(UNAVAILABLE) before the fix
    assert len(first.token_ids) + sum(len(chunk.token_ids) for chunk in rest) == 64


def test_calls_cancelled_while_queued_leave_no_request_behind(loaded_model, tokenizer):
    # Its own gateway: requests left behind must not slow the other tests.
    running = RunningGateway(loaded_model, tokenizer)
    try:
        with LongbowClient(running.address, timeout_s=60, retry=None) as client:
            busy = client.generate_stream("word " * 300, max_tokens=200, min_tokens=200)  # long engine steps
            next(busy)
            with grpc.insecure_channel(running.address) as raw:
                body = gen_pb.GenerateRequest(prompt="Hello " * 100, sampling=gen_pb.SamplingOptions(
                    max_tokens=1000, min_tokens=1000)).SerializeToString()
                for attempt in range(30):  # deadlines of 2-20 ms land while the 'add' is queued
                    _status(raw, "Generate", body, deadline_s=0.002 + 0.002 * (attempt % 10))
            busy.close()
        stats = running.wait_until_idle(timeout=5)
        assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0, stats
        with LongbowClient(running.address, timeout_s=5, retry=None) as client:
            assert client.generate("Hello", max_tokens=2).completion_tokens >= 1
    finally:
        running.close()
