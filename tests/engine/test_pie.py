"""PIE on the paged cache: re-positioned keys equal freshly computed ones where they must (layer 0),
rotations compose, the exact baselines equal a fresh encoding, the conflict baseline does not, and
prediction from a kept document equals the engine's own greedy generation."""

from __future__ import annotations

import pytest
import torch

from longbow.services.config import EngineConfig, LongbowConfig
from longbow.services.engine.engine import LLMEngine
from longbow.services.engine.errors import CapacityError
from longbow.services.engine.pie import DocumentKV, UpdateMode
from longbow.services.engine.types import SamplingParams

pytestmark = pytest.mark.slow

TEXT = (
    "def mean(values: list[float]) -> float:\n"
    "    total = 0.0\n"
    "    for value in values:\n"
    "        total += value\n"
    "    return total / len(values)\n\n\n"
    "def variance(values: list[float]) -> float:\n"
    "    centre = mean(values)\n"
    "    return sum((v - centre) ** 2 for v in values) / len(values)\n"
) * 3


@pytest.fixture(scope="module")
def engine(loaded_model):
    return LLMEngine(LongbowConfig(engine=EngineConfig(token_budget=128, block_size=16, num_blocks=256)), loaded_model)


@pytest.fixture
def document_ids(tokenizer):
    return list(tokenizer(TEXT, add_special_tokens=False).input_ids)


def _doc(engine, ids, chunk_tokens=64):
    doc = DocumentKV.for_engine(engine, chunk_tokens)
    doc.encode(ids)
    return doc


def test_pie_keys_at_layer_zero_equal_fresh_keys(engine, document_ids, tokenizer):
    doc = _doc(engine, document_ids)
    new = list(tokenizer("    # a comment that shifts everything after it\n", add_special_tokens=False).input_ids)
    start, end = 20, 24  # replace 4 tokens by len(new): every later key moves by len(new) - 4
    stats = doc.replace(start, end, new, UpdateMode.PIE)
    expected_ids = [*document_ids[:start], *new, *document_ids[end:]]
    fresh = _doc(engine, expected_ids)
    try:
        assert doc.token_ids == expected_ids and doc.positions() == list(range(len(expected_ids)))
        assert stats.tokens_encoded == len(new) and stats.tokens_rotated == len(document_ids) - end
        torch.testing.assert_close(doc.keys(0), fresh.keys(0), atol=1e-5, rtol=0)
        # Deeper layers are PIE's approximation (later tokens never saw the new ones): close, not equal.
        later = slice(start + len(new), None)
        assert (doc.keys(5)[later] - fresh.keys(5)[later]).abs().max() > 1e-4
    finally:
        doc.release(), fresh.release()


def test_rotations_compose(engine, document_ids, tokenizer):
    """Two edits (+7 then -3) move later keys exactly as one edit of the summed delta (+4)."""
    x = tokenizer(" x", add_special_tokens=False).input_ids
    twice, once = _doc(engine, document_ids), _doc(engine, document_ids)
    try:
        twice.replace(10, 10, x * 7, UpdateMode.PIE)  # original token k >= 10 now at k + 7
        twice.replace(30, 33, [], UpdateMode.PIE)  # deletes original tokens 23..25; k >= 26 at k + 4
        once.replace(10, 13, x * 7, UpdateMode.PIE)  # original token k >= 13 at k + 4
        tail = len(document_ids) - 26
        assert twice.positions()[-tail:] == once.positions()[-tail:] == list(range(30, len(document_ids) + 4))
        for layer in range(engine.loaded.args.n_layers):
            torch.testing.assert_close(twice.keys(layer)[-tail:], once.keys(layer)[-tail:], atol=1e-5, rtol=0)
    finally:
        twice.release(), once.release()


@pytest.mark.parametrize("mode", [UpdateMode.FULL, UpdateMode.SUFFIX])
def test_exact_baselines_equal_a_fresh_encoding(engine, document_ids, tokenizer, mode):
    new = list(tokenizer("    total = 1.0\n", add_special_tokens=False).input_ids)
    doc = _doc(engine, document_ids)
    stats = doc.replace(40, 47, new, mode)
    expected_ids = [*document_ids[:40], *new, *document_ids[47:]]
    fresh = _doc(engine, expected_ids)
    try:
        assert doc.token_ids == expected_ids and doc.positions() == list(range(len(expected_ids)))
        assert stats.tokens_encoded == (len(expected_ids) if mode == UpdateMode.FULL else len(expected_ids) - 40)
        for layer in (0, 15, engine.loaded.args.n_layers - 1):
            torch.testing.assert_close(doc.keys(layer), fresh.keys(layer), atol=1e-4, rtol=1e-5)
    finally:
        doc.release(), fresh.release()


def test_conflict_encoding_leaves_keys_at_old_positions(engine, document_ids, tokenizer):
    new = list(tokenizer("    # twelve new tokens are inserted right here, ok\n", add_special_tokens=False).input_ids)
    doc = _doc(engine, document_ids)
    doc.replace(20, 20, new, UpdateMode.CONFLICT)
    fresh = _doc(engine, [*document_ids[:20], *new, *document_ids[20:]])
    try:
        assert doc.positions() == list(range(len(document_ids) + len(new)))  # ids move, keys do not
        later = slice(20 + len(new), None)
        assert (doc.keys(0)[later] - fresh.keys(0)[later]).abs().max() > 0.1
    finally:
        doc.release(), fresh.release()


def test_predict_equals_engine_greedy_generation(engine, document_ids, tokenizer):
    doc = _doc(engine, document_ids)
    try:
        for prefix in (len(document_ids), 57):
            ours = doc.predict(prefix, [], max_tokens=12, stop_ids=set())
            [reference] = engine.generate([document_ids[:prefix]], SamplingParams(max_tokens=12, ignore_eos=True))
            assert ours == reference.token_ids
        # a partial token at the cursor is fed as extra tokens after the cached prefix
        extra = tokenizer("    ret", add_special_tokens=False).input_ids
        ours = doc.predict(57, extra, max_tokens=6, stop_ids=set())
        [reference] = engine.generate([document_ids[:57] + extra], SamplingParams(max_tokens=6, ignore_eos=True))
        assert ours == reference.token_ids
        assert doc.token_ids == document_ids and doc.positions() == list(range(len(document_ids)))
    finally:
        doc.release()


def test_fork_copies_kv_and_edits_stay_apart(engine, document_ids, tokenizer):
    doc = _doc(engine, document_ids)
    twin = doc.fork()
    try:
        assert twin.slots != doc.slots and twin.token_ids == doc.token_ids
        for layer in (0, engine.loaded.args.n_layers - 1):
            assert torch.equal(twin.keys(layer), doc.keys(layer))
        twin.replace(5, 9, [], UpdateMode.PIE)
        assert doc.token_ids == document_ids and doc.positions() == list(range(len(document_ids)))
        assert doc.predict(len(document_ids), [], 4, set()) == engine.generate(
            [document_ids], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids
    finally:
        doc.release(), twin.release()


def test_blocks_come_from_the_shared_pool_and_go_back(engine, document_ids):
    pool = engine.scheduler.pool
    free = pool.num_free
    doc = _doc(engine, document_ids)
    assert pool.num_free < free and engine.stats()["kv_blocks_used"] == pool.num_blocks - pool.num_free
    doc.release()
    assert pool.num_free == free


def test_a_document_larger_than_the_cache_is_refused(loaded_model, document_ids):
    small = LLMEngine(LongbowConfig(engine=EngineConfig(token_budget=64, block_size=16, num_blocks=4)), loaded_model)
    doc = DocumentKV.for_engine(small)
    with pytest.raises(CapacityError):
        doc.encode(document_ids)
    doc.release()
    assert small.scheduler.pool.num_free == 4
