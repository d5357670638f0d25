"""Properties of the (out, lse) merge: exact, order independent, stable at extreme lse, -inf safe."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longbow.ringattn.local import block_attention
from longbow.ringattn.merge import merge_many, merge_partials

LSE = st.one_of(st.floats(-80.0, 80.0), st.just(-math.inf))
# A partial that saw no key is (zeros, -inf): that is what block_attention returns, and the merge
# relies on it.
PART = st.tuples(st.lists(st.floats(-10.0, 10.0), min_size=3, max_size=3), LSE).map(
    lambda p: ([0.0, 0.0, 0.0], p[1]) if math.isinf(p[1]) else p
)


def _tensors(part: tuple[list[float], float]) -> tuple[torch.Tensor, torch.Tensor]:
    values, lse = part
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 3), torch.tensor([[lse]], dtype=torch.float32)


def _reference(parts: list[tuple[list[float], float]]) -> tuple[torch.Tensor, float]:
    """The merge in float64 the textbook way: weights exp(lse_i - max)."""
    lses = torch.tensor([lse for _, lse in parts], dtype=torch.float64)
    if torch.isneginf(lses).all():
        return torch.zeros(3, dtype=torch.float64), -math.inf
    top = lses.max()
    weights = torch.exp(lses - top)
    outs = torch.tensor([values for values, _ in parts], dtype=torch.float64)
    total = weights.sum()
    return (weights.unsqueeze(1) * outs).sum(0) / total, (top + torch.log(total)).item()


@settings(max_examples=200, deadline=None)
@given(st.lists(PART, min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_merge_matches_float64_in_any_order(parts, rng) -> None:
    expected_out, expected_lse = _reference(parts)
    shuffled = list(parts)
    rng.shuffle(shuffled)
    for order in (parts, shuffled):
        out, lse = merge_many([_tensors(p) for p in order])
        assert torch.isfinite(out).all()
        assert torch.allclose(out.view(3).double(), expected_out, atol=1e-5, rtol=1e-5)
        if math.isinf(expected_lse):
            assert torch.isneginf(lse).all()
        else:
            assert abs(lse.item() - expected_lse) <= 1e-5 * max(1.0, abs(expected_lse))


@settings(max_examples=100, deadline=None)
@given(PART, st.sampled_from([80.0, -80.0, 1e4, -1e4]))
def test_extreme_lse_does_not_overflow(part, extreme) -> None:
    a = _tensors(part)
    b = (torch.full((1, 1, 3), 2.0), torch.tensor([[extreme]]))
    out, lse = merge_partials(*a, *b)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    expected_out, expected_lse = _reference([part, ([2.0, 2.0, 2.0], extreme)])
    assert torch.allclose(out.view(3).double(), expected_out, atol=1e-5, rtol=1e-5)
    assert abs(lse.item() - expected_lse) <= 1e-5 * max(1.0, abs(expected_lse))


def test_empty_partial_contributes_nothing_exactly() -> None:
    out = torch.randn(4, 2, 3)
    lse = torch.randn(4, 2)
    empty = (torch.zeros(4, 2, 3), torch.full((4, 2), -math.inf))
    for merged_out, merged_lse in (merge_partials(out, lse, *empty), merge_partials(*empty, out, lse)):
        assert torch.equal(merged_out, out) and torch.equal(merged_lse, lse)
    both_out, both_lse = merge_partials(*empty, *empty)
    assert torch.equal(both_out, empty[0]) and torch.isneginf(both_lse).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_merged_key_splits_equal_attention_over_all_keys(splits, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(7, 4, 8, generator=gen), torch.randn(20, 2, 8, generator=gen), torch.randn(20, 2, 8, generator=gen))
    q_pos, k_pos = torch.randint(0, 20, (7,), generator=gen), torch.randperm(20, generator=gen)
    full_out, full_lse = block_attention(q, k, v, q_pos, k_pos)
    pieces = torch.tensor_split(torch.randperm(20, generator=gen), splits)
    out, lse = merge_many([block_attention(q, k[ix], v[ix], q_pos, k_pos[ix]) for ix in pieces])
    assert (out - full_out).abs().max() <= 1e-5
    finite = torch.isfinite(full_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[finite] - full_lse[finite]).abs().max() <= 1e-5
