"""`LM.token_logprobs_many` on the real engine: several scoring requests submitted together (the engine
batches them) return what each returns alone, in order, for the synchronous and the gateway's engine."""

from __future__ import annotations

import asyncio
import threading

import pytest

SEQUENCES = [list(range(1000, 1000 + n)) for n in (2, 40, 17, 90)] + [[5, 6, 7] * 30]


@pytest.mark.slow
def test_engine_lm_scores_many_like_one_at_a_time(engine_lm, monkeypatch):
    import longbow.services.text.lm as lm_module

    monkeypatch.setattr(lm_module, "SCORE_GROUP", 2)  # several groups, one of them partial
    alone = [engine_lm.token_logprobs(ids) for ids in SEQUENCES]
    together = engine_lm.token_logprobs_many(SEQUENCES)
    assert [len(x) for x in together] == [len(ids) - 1 for ids in SEQUENCES]
    for a, b in zip(alone, together):
        assert b == pytest.approx(a, abs=2e-3)  # batch composition changes fp32 summation order only
    assert engine_lm.engine.stats()["kv_blocks_used"] == 0


@pytest.mark.slow
def test_async_engine_lm_scores_many_like_one_at_a_time(loaded_model, tokenizer, engine_lm):
    from longbow.services.config import EngineConfig, LongbowConfig
    from longbow.services.engine.engine import AsyncLLMEngine, LLMEngine
    from longbow.services.text.lm import AsyncEngineLM

    config = LongbowConfig(engine=EngineConfig(token_budget=128, block_size=16, num_blocks=256))
    engine = AsyncLLMEngine(LLMEngine(config, loaded_model))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        together = AsyncEngineLM(engine, tokenizer, loop).token_logprobs_many(SEQUENCES)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        engine.shutdown()
    for ids, values in zip(SEQUENCES, together):
        assert values == pytest.approx(engine_lm.token_logprobs(ids), abs=2e-3)
