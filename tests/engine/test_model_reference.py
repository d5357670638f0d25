"""Our model vs transformers' model on the same weights: logits and greedy generation."""

from __future__ import annotations

import pytest
import torch

from services.config import EngineConfig, LongbowConfig
from services.engine.engine import LLMEngine
from services.engine.kv_cache import NoCacheAttention
from services.engine.types import SamplingParams

pytestmark = pytest.mark.slow

LOGITS_TOLERANCE = 1e-4  # fp32, max abs diff over the whole [T, V] logits
# NOTE: on the >= 1,000-token prompt the fp32 noise floor is itself ~1e-4: hidden states of this model
# reach |2e4| (massive activations), and transformers' own eager and SDPA attention paths differ from
# each other by 9.0e-5 on that prompt (measured). Layer by layer our norm, projections, RoPE and MLP are
# bit-identical to transformers'; only the attention kernel's summation order differs. We measured
# 1.12e-4 there and allow 2e-4 for prompts over 1,000 tokens, with argmax agreement on every row.
LONG_PROMPT_TOLERANCE = 2e-4

PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Long contexts need sequence parallelism because attention memory grows with length.",
]


def _long_text(tokenizer, min_tokens: int) -> list[int]:
    paragraph = (
        "Ring attention splits a long sequence across devices. Each device keeps a block of keys and "
        "values, and the blocks of queries or keys travel around the ring until every query has seen "
        "every key it may attend to. The partial results are merged exactly with their log-sum-exp. "
    )
    ids: list[int] = []
    i = 0
    while len(ids) < min_tokens:
        ids += tokenizer(f"Section {i}. " + paragraph).input_ids
        i += 1
    return ids


def _our_logits(loaded, ids: list[int]) -> torch.Tensor:
    tokens = torch.tensor(ids)
    positions = torch.arange(len(ids))
    return loaded.model(tokens, positions, NoCacheAttention(), positions)


@torch.inference_mode()
def test_logits_match_transformers(loaded_model, hf_model, tokenizer):
    prompts = [tokenizer(p).input_ids for p in PROMPTS] + [_long_text(tokenizer, 1000)]
    assert len(prompts[-1]) >= 1000
    for ids in prompts:
        ours = _our_logits(loaded_model, ids)
        reference = hf_model(torch.tensor([ids])).logits[0].float()
        diff = (ours - reference).abs().max().item()
        tolerance = LOGITS_TOLERANCE if len(ids) < 1000 else LONG_PROMPT_TOLERANCE
        assert diff <= tolerance, f"{len(ids)} tokens: max abs logit diff {diff:.2e}"
        assert torch.equal(ours.argmax(-1), reference.argmax(-1))


@torch.inference_mode()
def test_paged_engine_logits_match_full_forward(loaded_model, tokenizer):
    """The paged cache with chunked prefill scores a prompt exactly as a single full forward."""
    ids = _long_text(tokenizer, 300)
    config = LongbowConfig(engine=EngineConfig(token_budget=64, block_size=16, num_blocks=64))
    engine = LLMEngine(config, loaded_model)
    scored = torch.tensor(engine.score(ids))
    full = torch.log_softmax(_our_logits(loaded_model, ids), -1)
    expected = full[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    assert scored.shape == expected.shape
    assert torch.allclose(scored, expected, atol=1e-4), (scored - expected).abs().max()


@torch.inference_mode()
def test_greedy_matches_transformers_generate_with_chunked_prefill(loaded_model, hf_model, tokenizer):
    texts = PROMPTS + ["Write a haiku about distributed systems.", "List three prime numbers:"]
    prompts = [tokenizer(t).input_ids for t in texts] + [_long_text(tokenizer, 200)]
    max_new = 24
    # budget 32 < the longest prompt forces chunked prefill with several requests in flight
    config = LongbowConfig(engine=EngineConfig(token_budget=32, block_size=8, num_blocks=256))
    engine = LLMEngine(config, loaded_model)
    # min_tokens bans eos exactly like transformers' min_new_tokens, so both run the full length
    params = SamplingParams(max_tokens=max_new, min_tokens=max_new)
    ours = engine.generate(prompts, params)
    assert engine.steps > max_new, "the small budget should have split prefills over several steps"
    for ids, completion in zip(prompts, ours):
        reference = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=2,
        )[0, len(ids):].tolist()
        assert completion.token_ids == reference
    assert engine.stats()["kv_blocks_used"] == 0
