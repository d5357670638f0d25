"""Load over a real gateway socket with the real model: more streams than `gateway.max_inflight` (the
excess is shed at once with RESOURCE_EXHAUSTED, the rest complete, nothing acknowledged is lost), and many
streams with half of them cancelled (their KV is freed while the rest run; the cache returns to its
baseline when the rest finish)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from longbow.services.client.sdk import LongbowClient, LongbowError
from tests.conftest import RunningGateway

pytestmark = pytest.mark.slow

HELD_TOKENS = 150  # long enough that held streams are still generating while the excess is answered
BOUND_S = 30.0  # bounded polls: generous on a loaded 2-core machine, never a hang



@pytest.fixture
def small_gateway(loaded_model, tokenizer):
    running = RunningGateway(loaded_model, tokenizer, max_inflight=4)
    yield running
    running.close()


def _open_held(client: LongbowClient, n: int) -> list:
    """n streams, each past its first token: certainly in flight (holding a slot and KV)."""
    streams = []
    for i in range(n):
        stream = client.generate_stream(f"Stream {i}: tell a long story.", max_tokens=HELD_TOKENS,
                                        min_tokens=HELD_TOKENS)
        first = next(stream)
        assert first.finish_reason is None
        streams.append((stream, len(first.token_ids)))
    return streams


def _drain(stream, received: int) -> tuple[int, str | None]:
    reason = None
    for chunk in stream:
        received += len(chunk.token_ids)
        reason = chunk.finish_reason or reason
    return received, reason


def test_excess_streams_are_shed_at_once_and_the_rest_complete(small_gateway):
    with LongbowClient(small_gateway.address, timeout_s=120, retry=None) as client:
        held = _open_held(client, 4)  # every generation slot taken

        def extra(i: int) -> tuple[str, float]:
            began = time.monotonic()
            try:
                client.generate(f"extra {i}", max_tokens=4)
                return "served", time.monotonic() - began
            except LongbowError as err:
                return err.code.name, time.monotonic() - began

        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(extra, range(12)))
        during = small_gateway.engine_stats()
        # all 12 answered while the 4 held streams were still generating: shed, not queued behind them
        assert [code for code, _ in outcomes] == ["RESOURCE_EXHAUSTED"] * 12
        assert during["running"] == 4, during
        finished = [_drain(stream, received) for stream, received in held]
    # nothing acknowledged is lost: every admitted stream got every token it asked for
    assert finished == [(HELD_TOKENS, "length")] * 4
    assert small_gateway.wait_for_stats(lambda s: s["kv_blocks_used"] == 0, "KV freed", BOUND_S)["running"] == 0
    print(f"shed 12 in max {max(t for _, t in outcomes):.3f} s while 4 streams of {HELD_TOKENS} tokens ran")


def test_cancelling_half_the_streams_frees_their_kv_under_load(loaded_model, tokenizer):
    gateway = RunningGateway(loaded_model, tokenizer)
    try:
        assert gateway.engine_stats()["kv_blocks_used"] == 0  # the baseline
        with LongbowClient(gateway.address, timeout_s=120, retry=None) as client:
            streams = _open_held(client, 8)
            loaded = gateway.engine_stats()
            assert loaded["running"] == 8 and loaded["kv_blocks_used"] > 0
            for stream, _ in streams[:4]:
                stream.close()  # the client stops reading: the call is cancelled
            # the cancelled four leave the engine, and their KV with them, while the other four still run
            during = gateway.wait_for_stats(lambda s: s["running"] == 4, "cancelled streams aborted", BOUND_S)
            assert during["kv_blocks_used"] < loaded["kv_blocks_used"]
            finished = [_drain(stream, received) for stream, received in streams[4:]]
        assert finished == [(HELD_TOKENS, "length")] * 4
        assert gateway.wait_until_idle()["kv_blocks_used"] == 0
    finally:
        gateway.close()

