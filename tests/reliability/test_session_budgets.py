"""Issue 16's session reproduction, scaled down, over a real gateway socket with the real model: sessions
asking for an idle timeout of 4294967295 s hold most of a small KV cache, then a Generate needs more than
is left. Idle sessions are evicted least-recently-used and the Generate completes (the evicted session's
next call is NOT_FOUND saying why); sessions in use keep their KV and the Generate fails at once with
RESOURCE_EXHAUSTED, never waiting to its deadline."""

from __future__ import annotations

import time

import grpc
import pytest

from longbow.services.client.sdk import LongbowClient, LongbowError
from longbow.services.config import EngineConfig, SessionsConfig
from tests.conftest import RunningGateway

pytestmark = pytest.mark.slow

FOREVER = 4294967295
DEADLINE_S = 60.0
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau"


def _ids(tokenizer, n: int) -> list[int]:
    return tokenizer((WORDS + " ") * (n // 10 + 2), add_special_tokens=False).input_ids[:n]


@pytest.fixture(params=["idle", "in_use"])
def held_cache(request, loaded_model, tokenizer):
    """A 64-block cache (1,024 tokens); sessions may hold 90% of it; three 240-token sessions hold 45 blocks.
    'idle': a session untouched for 0 s may be evicted; 'in_use': none may (evict_idle_after_s = 1 h)."""
    idle_after = 0.0 if request.param == "idle" else 3600.0
    sessions = SessionsConfig(max_kv_fraction=0.9, evict_idle_after_s=idle_after, max_idle_timeout_s=FOREVER)
    engine = EngineConfig(token_budget=128, block_size=16, num_blocks=64)
    gateway = RunningGateway(loaded_model, tokenizer, engine_config=engine, sections={"sessions": sessions})
    client = LongbowClient(gateway.address, timeout_s=DEADLINE_S, retry=None)
    text = tokenizer.decode(_ids(tokenizer, 240))
    opened = [client.open_session(text, idle_timeout_s=FOREVER) for _ in range(3)]
    try:
        yield request.param, gateway, client, opened
    finally:
        client.close()
        gateway.close()


def test_generate_beside_sessions_holding_most_of_the_cache(held_cache, tokenizer):
    kind, gateway, client, opened = held_cache
    before = gateway.engine_stats()
    assert before["kv_blocks_used"] == 45  # 3 x 15 blocks: 19 free for requests
    prompt = _ids(tokenizer, 400)  # 25 blocks: more than is free, less than the cache
    started = time.monotonic()
    if kind == "in_use":
        with pytest.raises(LongbowError) as err:
            client.generate(token_ids=prompt, max_tokens=8, min_tokens=8)
        elapsed = time.monotonic() - started
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "edit sessions" in err.value.message
        # refused before the engine ran a step for it: no token could have been generated
        after = gateway.engine_stats()
        assert after["steps"] == before["steps"] and after["kv_blocks_used"] == 45
        assert elapsed < DEADLINE_S / 4, elapsed
        for session_id in opened:  # the sessions are untouched
            assert client.predict(session_id, 0, max_tokens=1) is not None
        return
    result = client.generate(token_ids=prompt, max_tokens=8, min_tokens=8)
    assert result.completion_tokens == 8 and result.finish_reason == "length"
    with pytest.raises(LongbowError) as err:  # the least recently used session was evicted
        client.predict(opened[0], 0, max_tokens=1)
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "evicted to free KV" in err.value.message
    for session_id in opened[1:]:  # only as many as the request needed
        assert client.predict(session_id, 0, max_tokens=1) is not None
        client.close_session(session_id)
    assert gateway.wait_until_idle()["kv_blocks_used"] == 0
