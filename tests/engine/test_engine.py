"""The engine on the real model: bad input, sampling, abort, async streaming, attention rows."""

from __future__ import annotations

import asyncio

import pytest
import torch

from longbow.services.config import EngineConfig, LongbowConfig
from longbow.services.engine.engine import AsyncLLMEngine, LLMEngine
from longbow.services.engine.errors import (
    CapacityError,
    InvalidRequestError,
    PromptTooLongError,
    UnknownRequestError,
)
from longbow.services.engine.kv_cache import NoCacheAttention
from longbow.services.engine.types import FinishReason, Request, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(loaded_model):
    config = LongbowConfig(engine=EngineConfig(token_budget=64, block_size=8, num_blocks=128, max_queue=4))
    return LLMEngine(config, loaded_model)


@pytest.fixture
def prompt(tokenizer):
    return tokenizer("Once upon a time, in a small village by the sea,").input_ids


@pytest.mark.parametrize(
    "ids, params, error",
    [
        ([], SamplingParams(), InvalidRequestError),
        ([1, 2, -5], SamplingParams(), InvalidRequestError),
        ([1, 2, 10**9], SamplingParams(), InvalidRequestError),
        ([1, 2], SamplingParams(temperature=-1.0), InvalidRequestError),
        ([1, 2], SamplingParams(temperature=float("nan")), InvalidRequestError),
        ([1, 2], SamplingParams(top_p=0.0), InvalidRequestError),
        ([1, 2], SamplingParams(top_k=-3), InvalidRequestError),
        ([1, 2], SamplingParams(max_tokens=-1), InvalidRequestError),
        ([1, 2], SamplingParams(max_tokens=2, min_tokens=5), InvalidRequestError),
        ([1, 2], SamplingParams(stop_token_ids=(10**7,)), InvalidRequestError),
        ([1] * 9000, SamplingParams(), PromptTooLongError),  # beyond the 8k context
        ([1] * 1000, SamplingParams(max_tokens=100), PromptTooLongError),  # beyond 128 * 8 KV slots
    ],
)
def test_bad_input_raises_clear_error_and_leaves_nothing_allocated(engine, ids, params, error):
    with pytest.raises(error):
        engine.add_request(Request("bad", ids, params))
    assert not engine.has_unfinished()
    assert engine.stats()["kv_blocks_used"] == 0
    assert "bad" not in engine.executor.sampler.params


def test_duplicate_id_unknown_id_and_full_queue(engine, prompt):
    engine.add_request(Request("a", prompt))
    with pytest.raises(InvalidRequestError):
        engine.add_request(Request("a", prompt))
    with pytest.raises(UnknownRequestError):
        engine.abort("nope")
    for i in range(3):
        engine.add_request(Request(f"q{i}", prompt))
    with pytest.raises(CapacityError):
        engine.add_request(Request("overflow", prompt))


def test_abort_mid_generation_frees_kv(engine, prompt):
    engine.add_request(Request("a", prompt, SamplingParams(max_tokens=50, min_tokens=50)))
    for _ in range(3):
        engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    event = engine.abort("a")
    assert event.reason == FinishReason.ABORT
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished()
    assert "a" in engine.executor.sampler.params  # told with the next plan, not through a side door
    engine.add_request(Request("b", prompt, SamplingParams(max_tokens=1)))
    engine.step()
    assert "a" not in engine.executor.sampler.params and "b" in engine.executor.sampler.params


def test_same_seed_same_output_regardless_of_batch(engine, prompt, tokenizer):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    [alone] = engine.generate([prompt], params)
    other = tokenizer("A completely different prompt about databases").input_ids
    batched = engine.generate([other, prompt, other], [SamplingParams(max_tokens=15), params, params])
    assert batched[1].token_ids == alone.token_ids
    [reseeded] = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=99))
    assert reseeded.token_ids != alone.token_ids


def test_top_k_one_equals_greedy(engine, prompt):
    [greedy] = engine.generate([prompt], SamplingParams(max_tokens=12, min_tokens=12))
    [top1] = engine.generate([prompt], SamplingParams(max_tokens=12, min_tokens=12, temperature=1.3, top_k=1, seed=5))
    assert top1.token_ids == greedy.token_ids


def test_stop_token_ids_and_logprobs_entropy(engine, prompt, loaded_model):
    [free] = engine.generate([prompt], SamplingParams(max_tokens=8, min_tokens=8))
    stop_at = free.token_ids[3]
    [stopped] = engine.generate([prompt], SamplingParams(max_tokens=8, stop_token_ids=(stop_at,)))
    first = free.token_ids.index(stop_at)
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == FinishReason.STOP
    # logprob and entropy of the first generated token, recomputed from a full forward
    positions = torch.arange(len(prompt))
    logits = loaded_model.model(torch.tensor(prompt), positions, NoCacheAttention(), positions)[-1]
    logprobs = torch.log_softmax(logits, -1)
    assert free.logprobs[0] == pytest.approx(float(logprobs[free.token_ids[0]]), abs=1e-4)
    entropy = float(-(logprobs.exp() * logprobs).sum())
    assert free.entropies[0] == pytest.approx(entropy, abs=1e-4)


def test_attention_row_matches_reference(engine, prompt, loaded_model):
    [c] = engine.generate([prompt], SamplingParams(max_tokens=2, min_tokens=2, return_attention=True))
    assert len(c.attention) == 2
    row = torch.tensor(c.attention[0])
    assert row.shape == (len(prompt),)  # the first sampled token's query is the last prompt position
    assert row.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert len(c.attention[1]) == len(prompt) + 1
    # reference: capture last-layer q and k of a full forward and recompute head-averaged probs
    captured = {}

    class Capture(NoCacheAttention):
        def attend(self, layer, q, k, v, meta):
            if layer == loaded_model.args.n_layers - 1:
                captured["q"], captured["k"] = q, k
            return super().attend(layer, q, k, v, meta)

    positions = torch.arange(len(prompt))
    loaded_model.model(torch.tensor(prompt), positions, Capture(), positions)
    q, k = captured["q"][-1], captured["k"].repeat_interleave(3, dim=1)  # [Hq, D], [T, Hq, D]
    expected = (torch.einsum("hd,thd->ht", q, k) / 8.0).softmax(-1).mean(0)
    assert torch.allclose(row, expected, atol=1e-5)


def test_async_stream_and_cancel_frees_kv(loaded_model, prompt):
    config = LongbowConfig(engine=EngineConfig(token_budget=64, block_size=8, num_blocks=128))
    async_engine = AsyncLLMEngine(LLMEngine(config, loaded_model))

    async def scenario():
        completion = await async_engine.generate(Request("full", prompt, SamplingParams(max_tokens=6, min_tokens=6)))
        assert len(completion.token_ids) == 6 and completion.finish_reason == FinishReason.LENGTH
        stream = async_engine.stream(Request("cancel", prompt, SamplingParams(max_tokens=200, min_tokens=200)))
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        await stream.aclose()  # the client went away: the engine must abort and free the KV
        stats = await async_engine.call(lambda e: e.stats())
        with pytest.raises(InvalidRequestError):
            await async_engine.generate(Request("empty", []))
        again = await async_engine.generate(Request("after", prompt, SamplingParams(max_tokens=3, min_tokens=3)))
        return stats, again

    try:
        stats, again = asyncio.run(scenario())
    finally:
        async_engine.shutdown()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    assert len(again.token_ids) == 3


def test_async_concurrent_streams_match_sequential(loaded_model, tokenizer):
    prompts = [tokenizer(t).input_ids for t in ["The sky is", "Python is a language that", "Ray actors"]]
    config = LongbowConfig(engine=EngineConfig(token_budget=16, block_size=8, num_blocks=128))
    params = SamplingParams(max_tokens=8, min_tokens=8)
    sequential = LLMEngine(config, loaded_model).generate(prompts, params)
    async_engine = AsyncLLMEngine(LLMEngine(config, loaded_model))

    async def all_at_once():
        return await asyncio.gather(*(async_engine.generate(Request(f"r{i}", p, params)) for i, p in enumerate(prompts)))

    try:
        concurrent = asyncio.run(all_at_once())
    finally:
        async_engine.shutdown()
    assert [c.token_ids for c in concurrent] == [c.token_ids for c in sequential]
