"""block_attention against torch SDPA (layouts, GQA, causal tiling, empty blocks); fast path == exact path."""

from __future__ import annotations

import pytest
import torch

import longbow.ringattn.local as local
from longbow.ringattn.layout import layout_indices
from longbow.ringattn.local import block_attention, computed_pairs, reference_lse, sdpa_reference


@pytest.mark.parametrize("mask", [None, "positions"])  # fast path where it applies, and the exact tiles
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("gqa", [1, 3, 4])
@pytest.mark.parametrize("order", ["sorted", "permuted", "zigzag"])
def test_block_attention_matches_sdpa_with_small_tiles(
    monkeypatch, mask, causal: bool, gqa: int, order: str
) -> None:
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
    out, lse = block_attention(q, k, v, positions, positions, causal=causal, mask=mask)
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


# (q positions, k positions, hint the caller could give) for the mask shapes a ring hop meets
def _contiguous(start: int, length: int) -> torch.Tensor:
    return torch.arange(start, start + length)


FAST_CASES = {
    "diagonal": (_contiguous(40, 48), _contiguous(40, 48), "causal_diagonal"),
    "keys_before": (_contiguous(100, 48), _contiguous(20, 64), "full"),
    "keys_after": (_contiguous(0, 48), _contiguous(60, 40), None),  # nothing visible: zeros, -inf
    "tokenring_first_half": (_contiguous(40, 24), _contiguous(40, 48), None),
    "tokenring_second_half": (_contiguous(64, 24), _contiguous(40, 48), None),
    "overlapping_shifted": (_contiguous(50, 40), _contiguous(30, 45), None),
    "zigzag": (
        torch.cat([_contiguous(0, 20), _contiguous(140, 20)]),
        torch.cat([_contiguous(20, 30), _contiguous(110, 30)]),
        None,
    ),
}


def _qkv(t_q: int, t_k: int, gqa: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t_q, 2 * gqa, 32, generator=gen).to(dtype)
    k, v = torch.randn(t_k, 2, 32, generator=gen), torch.randn(t_k, 2, 32, generator=gen)
    return q, k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("gqa", [1, 3, 4])
@pytest.mark.parametrize("case", sorted(FAST_CASES))
def test_fast_path_equals_exact_path(
    monkeypatch, case: str, gqa: int, dtype: torch.dtype, tolerance: float
) -> None:
    calls = []
    real_kernel = local._flash_kernel
    monkeypatch.setattr(local, "_flash_kernel", lambda *args: calls.append(args[3]) or real_kernel(*args))
    q_pos, k_pos, hint = FAST_CASES[case]
    q, k, v = _qkv(len(q_pos), len(k_pos), gqa, dtype)
    exact_out, exact_lse = block_attention(q, k, v, q_pos, k_pos, mask="positions")
    assert not calls
    for mask in dict.fromkeys([None, hint]):
        out, lse = block_attention(q, k, v, q_pos, k_pos, mask=mask)
        assert out.dtype == lse.dtype == torch.float32 and lse.shape == exact_lse.shape
        assert torch.equal(torch.isneginf(lse), torch.isneginf(exact_lse))
        finite = torch.isfinite(exact_lse)
        assert ((lse[finite] - exact_lse[finite]).abs() <= tolerance).all()
        assert (out - exact_out).abs().max() <= tolerance
    assert calls or case == "keys_after"  # every case but the empty one ran the kernel


@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_non_causal_fast_path_ignores_positions(gqa: int) -> None:
    q, k, v = _qkv(30, 50, gqa, torch.float32)
    q_pos, k_pos = torch.randperm(30), torch.randperm(50) + 100  # keys after queries: visible anyway
    out, lse = block_attention(q, k, v, q_pos, k_pos, causal=False)
    exact_out, exact_lse = block_attention(q, k, v, q_pos, k_pos, causal=False, mask="positions")
    assert (out - exact_out).abs().max() <= 1e-5 and (lse - exact_lse).abs().max() <= 1e-5
    assert (lse - reference_lse(q, k, q_pos, k_pos, causal=False)).abs().max() <= 1e-5


def test_shuffled_positions_take_the_exact_path() -> None:
    pos = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    assert local.kernel_pieces(pos, pos, True, None) is None
    assert local.kernel_pieces(torch.arange(8), torch.arange(8), True, "positions") is None
    assert local.kernel_pieces(pos, pos, False, None) == [(slice(0, 64), slice(0, 64), False)]


def test_hints_are_checked() -> None:
    with pytest.raises(ValueError):
        local.kernel_pieces(torch.arange(4), torch.arange(6), True, "causal_diagonal")
    with pytest.raises(ValueError):
        local.kernel_pieces(torch.arange(4), torch.arange(4), True, "diagonal")


def test_kernel_failure_falls_back_to_the_exact_path(monkeypatch) -> None:
    def broken(*args):
        raise RuntimeError("no kernel for this head dim")

    monkeypatch.setattr(local, "_cpu_kernel", broken)
    monkeypatch.setattr(local, "_broken_kernels", set())
    q, k, v = _qkv(16, 16, 3, torch.float32)
    pos = torch.arange(16)
    out, lse = block_attention(q, k, v, pos, pos)
    assert (out - sdpa_reference(q, k, v, pos, pos)).abs().max() <= 1e-5
    assert local._broken_kernels == {("cpu", torch.float32, 32)}


@pytest.mark.parametrize("dense_scores", [0, 1 << 30])  # one kernel call per sequence / one dense call
@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_equals_each_sequence_alone(monkeypatch, dense_scores: int, causal: bool) -> None:
    """A packed block (rows and keys of several sequences, uneven, one without keys here, one sequence's
    rows in two runs) equals attention of each sequence alone; both local paths."""
    monkeypatch.setattr(local, "PACKED_DENSE_SCORES", dense_scores)
    gen = torch.Generator().manual_seed(7)
    q_seq = torch.tensor([0] * 5 + [1] + [2] * 3 + [3] * 2 + [0] * 2)  # sequence 3 has no keys here
    q_pos = torch.tensor([4, 5, 6, 7, 8, 20, 0, 1, 2, 9, 10, 11, 12])
    k_seq = torch.tensor([0] * 13 + [1] * 21 + [2] * 3)
    k_pos = torch.cat([torch.arange(13), torch.arange(21), torch.arange(3)])
    q, k, v = torch.randn(13, 6, 16, generator=gen), torch.randn(37, 2, 16, generator=gen), torch.randn(37, 2, 16, generator=gen)
    out, lse = local.packed_attention(q, k, v, q_pos, k_pos, q_seq, k_seq, causal=causal)
    for seq in range(4):
        rows, keys = q_seq == seq, k_seq == seq
        if not keys.any():
            assert torch.equal(out[rows], torch.zeros_like(out[rows])) and torch.isneginf(lse[rows]).all()
            continue
        expected = sdpa_reference(q[rows], k[keys], v[keys], q_pos[rows], k_pos[keys], causal=causal)
        expected_lse = reference_lse(q[rows], k[keys], q_pos[rows], k_pos[keys], causal=causal)
        assert (out[rows] - expected).abs().max() <= 1e-5
        assert (lse[rows] - expected_lse).abs().max() <= 1e-5


def test_token_keys_round_trip() -> None:
    positions, seq = torch.tensor([0, 5, -3, 2**31 - 1, -(2**31)]), torch.tensor([0, 1, 7, 2**31 - 1, 3])
    assert all(torch.equal(a, b) for a, b in zip(local.split_token_keys(local.token_keys(positions, seq)), (positions, seq)))
