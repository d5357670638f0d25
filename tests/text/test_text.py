"""Stop strings and incremental detokenization (unit) and text streaming on the real model."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from longbow.services.config import EngineConfig, LongbowConfig
from longbow.services.engine.engine import AsyncLLMEngine, LLMEngine
from longbow.services.engine.errors import InvalidRequestError
from longbow.services.text.text import IncrementalDetokenizer, StopStringMatcher, encode_chat, generate_text
from longbow.services.engine.types import FinishReason, SamplingParams


@given(text=st.text(max_size=60), stop=st.text(min_size=1, max_size=4), cuts=st.lists(st.integers(0, 60), max_size=8))
def test_stop_matcher_emits_exactly_the_text_before_the_first_stop(text, stop, cuts):
    matcher = StopStringMatcher([stop])
    pieces, last = [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        pieces.append(text[last:cut])
        last = max(last, cut)
    emitted = ""
    for piece in pieces:
        emitted += matcher.feed(piece)
        if matcher.stopped:
            break
    if not matcher.stopped:
        emitted += matcher.flush()
    index = text.find(stop)
    assert emitted == (text if index < 0 else text[:index])


def test_empty_stop_string_rejected():
    with pytest.raises(InvalidRequestError):
        StopStringMatcher(["ok", ""])


@pytest.mark.slow
def test_detokenizer_deltas_join_to_full_decode(tokenizer):
    text = "naïve café — 東京 🚀 done"
    ids = tokenizer(text).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.slow
def test_generation_stops_at_stop_string(loaded_model, tokenizer):
    config = LongbowConfig(engine=EngineConfig(token_budget=64, block_size=8, num_blocks=64))
    engine = AsyncLLMEngine(LLMEngine(config, loaded_model))
    prompt = "Count: one, two, three, four, five, six, seven,"
    try:
        free, _ = asyncio.run(generate_text(engine, tokenizer, prompt, SamplingParams(max_tokens=20, min_tokens=20)))
        stop = free.strip().split()[2]  # a word the model will produce
        cut, reason = asyncio.run(generate_text(engine, tokenizer, prompt, SamplingParams(max_tokens=20), [stop], "s"))
        stats = asyncio.run(engine.call(lambda e: e.stats()))
    finally:
        engine.shutdown()
    assert cut == free[: free.index(stop)]
    assert reason == FinishReason.STOP
    assert stats["kv_blocks_used"] == 0


@pytest.mark.slow
def test_chat_template_comes_with_the_weights(tokenizer):
    ids = encode_chat(tokenizer, [{"role": "user", "content": "hi"}])
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text
    with pytest.raises(InvalidRequestError):
        encode_chat(tokenizer, [{"role": "wizard", "content": "x"}])
