"""block_attention against torch SDPA: layouts, GQA, causal tiling, empty blocks."""

from __future__ import annotations

import pytest
import torch

import longbow.ringattn.local as local
from longbow.ringattn.layout import layout_indices
from longbow.ringattn.local import block_attention, computed_pairs, reference_lse, sdpa_reference


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("gqa", [1, 3, 4])
@pytest.mark.parametrize("order", ["sorted", "permuted", "zigzag"])
def test_block_attention_matches_sdpa_with_small_tiles(monkeypatch, causal: bool, gqa: int, order: str) -> None:
    # small tiles so that skipped, unmasked and masked tiles all occur on a 70-token block
    monkeypatch.setattr(local, "TILE_SCORES", 16 * 2 * gqa)
    monkeypatch.setattr(local, "KEY_TILE", 8)
    gen = torch.Generator().manual_seed(gqa)
    q = torch.randn(70, 2 * gqa, 16, generator=gen)
    k, v = torch.randn(70, 2, 16, generator=gen), torch.randn(70, 2, 16, generator=gen)
    index = {"sorted": torch.arange(70), "permuted": torch.randperm(70, generator=gen)}.get(order)
    if index is None:
        index = torch.cat(layout_indices(70, 3, "zigzag"))
    positions = index + 3
    out, lse = block_attention(q, k, v, positions, positions, causal=causal)
    assert (out - sdpa_reference(q, k, v, positions, positions, causal=causal)).abs().max() <= 1e-5
    assert (lse - reference_lse(q, k, positions, positions, causal=causal)).abs().max() <= 1e-5


def test_causal_tiling_skips_masked_tiles() -> None:
    pos = torch.arange(4096)
    pairs = computed_pairs(pos, pos, causal=True, heads_q=8)
    assert pairs < 0.7 * 4096**2  # a diagonal block computes little more than its lower triangle
    assert computed_pairs(pos, pos, causal=False) == 4096**2


def test_rows_without_visible_keys_are_zero_with_minus_inf_lse() -> None:
    q, k, v = torch.randn(3, 2, 4), torch.randn(5, 1, 4), torch.randn(5, 1, 4)
    out, lse = block_attention(q, k, v, torch.tensor([0, 10, 20]), torch.arange(5, 10))
    assert torch.equal(out[0], torch.zeros(2, 4)) and torch.isneginf(lse[0]).all()
    assert torch.isfinite(lse[1:]).all()
    empty_out, empty_lse = block_attention(q, k[:0], v[:0], torch.arange(3), torch.arange(0))
    assert empty_out.shape == (3, 2, 4) and torch.isneginf(empty_lse).all()


def test_sequence_ids_separate_ragged_requests() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(6, 2, 4, generator=gen), torch.randn(6, 2, 4, generator=gen), torch.randn(6, 2, 4, generator=gen)
    pos, seq = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 1])
    out, _ = block_attention(q, k, v, pos, pos, q_seq=seq, k_seq=seq)
    first, _ = block_attention(q[:3], k[:3], v[:3], pos[:3], pos[:3])
    assert (out[:3] - first).abs().max() <= 1e-6
