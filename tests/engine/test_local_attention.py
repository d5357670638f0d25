"""The paged KV cache and LocalPagedAttention without a model (fast: the mutation check runs these).

Whichever CPU path a segment takes (boolean lower-right causal mask or mask-free flash pieces for in-order
chunks, one batched call for decode rows, a mask by position id for re-positioned keys), the output
equals dense fp64 attention computed here from the cache's own keys and positions; PIE's shift equals
rotating at the new positions; copy moves K, V and positions. Tolerance 1e-5 (fp32 kernels, fp64
reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longbow.ringattn.rope import apply_rotary, inverse_frequencies, rotary_cos_sin
from longbow.services.engine.kv_cache import (
    LocalPagedAttention, LocalStepMeta, NoCacheAttention, PagedKVCache, Segment)
from longbow.services.engine.model import ModelArgs

H_Q, H_KV, D = 6, 2, 16


def _cache(slots: int) -> PagedKVCache:
    args = ModelArgs(vocab_size=8, dim=H_Q * D, n_layers=1, n_heads=H_Q, n_kv_heads=H_KV, head_dim=D,
                     intermediate_size=8, norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
                     max_position_embeddings=slots, tie_embeddings=True, attention_bias=False)
    return PagedKVCache(args, num_blocks=slots // 16, block_size=16, device="cpu", dtype=torch.float32)


def _probabilities(q, keys, q_pos=None, k_pos=None) -> torch.Tensor:
    """[Hq, Tq, Tk] fp64 attention probabilities; visible where k_pos <= q_pos (default: the last len(q)
    positions over keys at 0..Tk-1, lower-right causal)."""
    t_q, t_k = q.shape[0], keys.shape[0]
    q_pos = torch.arange(t_k - t_q, t_k) if q_pos is None else q_pos
    k_pos = torch.arange(t_k) if k_pos is None else k_pos
    k = keys.double().repeat_interleave(H_Q // H_KV, dim=1)  # [Tk, Hq, D]
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(D)
    return scores.masked_fill(~(k_pos[None, :] <= q_pos[:, None]), -math.inf).softmax(-1)


def _reference(q, keys, values, q_pos=None, k_pos=None) -> torch.Tensor:
    v = values.double().repeat_interleave(H_Q // H_KV, dim=1)
    return torch.einsum("hqk,khd->qhd", _probabilities(q, keys, q_pos, k_pos), v)


@pytest.mark.parametrize("rows,keys,flash", [
    (8, 1024, False),  # the boolean mask, up to long chunks over many keys
    (128, 256, False),
    (2, 2048, False),
    (32, 8000, False),
    (200, 700, False),
    (128, 4096, True),  # a long chunk over a long context: flash pieces
    (160, 5000, True),
])
def test_in_order_chunk_equals_dense_attention_on_either_path(rows, keys, flash):
    generator = torch.Generator().manual_seed(rows * 7919 + keys)
    cache = _cache(keys + 32)
    attention = LocalPagedAttention(cache, n_layers=1)
    cached = keys - rows
    cache.k[0, :cached] = torch.randn(cached, H_KV, D, generator=generator)
    cache.v[0, :cached] = torch.randn(cached, H_KV, D, generator=generator)
    cache.positions[:cached] = torch.arange(cached)
    # A one-row decode beside the chunk (another request) keeps the step realistic.
    decode_slot = keys + 16
    cache.k[0, keys:decode_slot] = torch.randn(16, H_KV, D, generator=generator)
    cache.v[0, keys:decode_slot] = torch.randn(16, H_KV, D, generator=generator)
    cache.positions[keys:decode_slot] = torch.arange(16)
    decode_keys = np.arange(keys, decode_slot + 1)
    chunk_keys = np.arange(keys)
    meta = LocalStepMeta(
        slots=torch.tensor([*range(cached, keys), decode_slot]),
        positions=torch.tensor([*range(cached, keys), 16]),
        segments=[Segment("chunk", slice(0, rows), torch.from_numpy(chunk_keys), chunk_keys, in_order=True,
                          want_attention=True),
                  Segment("decode", slice(rows, rows + 1), torch.from_numpy(decode_keys), decode_keys,
                          in_order=True)],
        attention_rows={})
    q = torch.randn(rows + 1, H_Q, D, generator=generator)
    k_new = torch.randn(rows + 1, H_KV, D, generator=generator)
    v_new = torch.randn(rows + 1, H_KV, D, generator=generator)

    # The reference's keys: what was cached before the step, then the step's own new K/V (not read back
    # from the cache, so a step that forgot to store them fails).
    chunk_k = torch.cat([cache.k[0, :cached], k_new[:rows]])
    chunk_v = torch.cat([cache.v[0, :cached], v_new[:rows]])
    decode_k = torch.cat([cache.k[0, keys:decode_slot], k_new[rows:]])
    decode_v = torch.cat([cache.v[0, keys:decode_slot], v_new[rows:]])

    meta = attention.prepare(meta)
    assert meta.segments[0].flash_causal is flash
    assert meta.segments[0].kv_range == slice(0, keys)  # consecutive slots: a view, no gather
    out = attention.attend(0, q, k_new, v_new, meta)

    expected_chunk = _reference(q[:rows], chunk_k, chunk_v)
    expected_decode = _reference(q[rows:], decode_k, decode_v)
    torch.testing.assert_close(out[:rows].double(), expected_chunk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[rows:].double(), expected_decode, atol=1e-5, rtol=1e-5)
    # The chunk's last row's attention (DRAGIN reads it), head-averaged
    expected_row = _probabilities(q[:rows], chunk_k)[:, -1].mean(0)
    torch.testing.assert_close(meta.attention_rows["chunk"].double(), expected_row, atol=1e-6, rtol=1e-5)


def _fill(cache, slots, positions, generator):
    cache.k[0, slots] = torch.randn(len(slots), H_KV, D, generator=generator)
    cache.v[0, slots] = torch.randn(len(slots), H_KV, D, generator=generator)
    cache.positions[slots] = torch.as_tensor(positions)


def _segment(name, rows: slice, slots, in_order=True, want_attention=False) -> Segment:
    host = np.asarray(slots, dtype=np.int64)
    return Segment(name, rows, torch.from_numpy(host), host, want_attention=want_attention, in_order=in_order)


@pytest.mark.parametrize("lengths,batched", [((20, 30, 25), True), ((20, 30), True), ((8, 40, 9), False)])
def test_decode_rows_equal_dense_attention_batched_or_not(lengths, batched):
    """Decode rows of requests with scattered blocks: one padded call when padding stays under 2x, else one
    call each; the same attention either way, and the last layer's attention row when asked."""
    generator = torch.Generator().manual_seed(sum(lengths))
    cache = _cache(512)
    attention = LocalPagedAttention(cache, n_layers=1)
    segments, new_slots, new_positions, start = [], [], [], 0
    for i, n in enumerate(lengths):
        slots = [start + 3 * j for j in range(n)]  # every third slot: never a range
        start = slots[-1] + 1
        _fill(cache, slots[:-1], range(n - 1), generator)
        new_slots.append(slots[-1])
        new_positions.append(n - 1)
        segments.append(_segment(f"r{i}", slice(i, i + 1), slots, want_attention=i == 1))
    meta = LocalStepMeta(slots=torch.tensor(new_slots), positions=torch.tensor(new_positions),
                         segments=segments, attention_rows={})
    q = torch.randn(len(lengths), H_Q, D, generator=generator)
    k_new = torch.randn(len(lengths), H_KV, D, generator=generator)
    v_new = torch.randn(len(lengths), H_KV, D, generator=generator)
    meta = attention.prepare(meta)
    assert all(seg.kv_range is None and seg.batched is batched for seg in meta.segments)
    assert (meta.decode_batch is not None) is batched
    out = attention.attend(0, q, k_new, v_new, meta)
    for i, seg in enumerate(meta.segments):
        keys, values = cache.k[0, seg.kv_slots], cache.v[0, seg.kv_slots]
        torch.testing.assert_close(out[i:i + 1].double(), _reference(q[i:i + 1], keys, values),
                                   atol=1e-5, rtol=1e-5)
    [(name, row)] = meta.attention_rows.items()
    expected_row = _probabilities(q[1:2], cache.k[0, segments[1].kv_slots]).mean(0)[-1]
    assert name == "r1"
    torch.testing.assert_close(row.double(), expected_row, atol=1e-6, rtol=1e-5)


def test_decode_mirror_follows_the_batch_and_refills_when_its_keys_change():
    """Decode steps of the same requests append one column to the kept KV (no gather); a shift, a step
    that rewrites a slot the mirror holds, a finished request, or growth past its capacity refill or
    regrow it. Every step's output equals dense attention over the cache's keys (fp64, 1e-5)."""
    generator = torch.Generator().manual_seed(3)
    cache = _cache(2048)
    attention = LocalPagedAttention(cache, n_layers=1)
    free = iter(torch.randperm(2040, generator=generator).tolist())
    lists = {f"r{i}": [next(free) for _ in range(n)] for i, n in enumerate((20, 30, 25))}
    for slots in lists.values():
        _fill(cache, slots, range(len(slots)), generator)
    kinds = []
    for step in range(80):
        if step == 9:
            del lists["r2"]  # finished
        if step == 4:
            cache.shift(torch.tensor(lists["r0"][:3]), 0 + 1, torch.ones(D // 2))  # keys moved (PIE)
        extra_slots, extra_positions, segments = [], [], []
        for i, (name, slots) in enumerate(lists.items()):
            slots.append(next(free))
            segments.append(_segment(name, slice(i, i + 1), slots))
        if step == 7:  # another pass rewrites a slot that r1 reads (and one of its own)
            rewritten = [lists["r1"][5], next(free)]
            extra_slots, extra_positions = rewritten, [100, 101]
            segments.append(_segment("doc", slice(len(lists), len(lists) + 2), rewritten, in_order=False))
        rows = len(lists) + len(extra_slots)
        meta = LocalStepMeta(
            slots=torch.tensor([slots[-1] for slots in lists.values()] + extra_slots),
            positions=torch.tensor([len(slots) - 1 for slots in lists.values()] + extra_positions),
            segments=segments, attention_rows={})
        q = torch.randn(rows, H_Q, D, generator=generator)
        k_new = torch.randn(rows, H_KV, D, generator=generator)
        v_new = torch.randn(rows, H_KV, D, generator=generator)
        meta = attention.prepare(meta)
        batch = meta.decode_batch
        assert batch.mirror is not None
        kinds.append("append" if batch.append_at is not None else "refill")
        capacity = batch.mirror.k.shape[2]
        out = attention.attend(0, q, k_new, v_new, meta)
        for i, seg in enumerate(meta.segments[:len(lists)]):
            keys, values = cache.k[0, seg.kv_slots], cache.v[0, seg.kv_slots]
            torch.testing.assert_close(out[i:i + 1].double(), _reference(q[i:i + 1], keys, values),
                                       atol=1e-5, rtol=1e-5)
        if step == 74:
            grown = capacity
    assert kinds[:4] == ["refill", "append", "append", "append"]
    assert kinds[4] == kinds[7] == kinds[9] == "refill"  # shift, a held slot rewritten, a request gone
    assert kinds.count("refill") == 4
    assert grown > 39 + 64  # appended past the refill's capacity (longest 39 + 64): regrown, not refilled


def test_re_positioned_keys_are_masked_by_position_not_order():
    """After PIE edits a request's keys are not in position order: visibility is key_pos <= query_pos."""
    generator = torch.Generator().manual_seed(5)
    cache = _cache(128)
    attention = LocalPagedAttention(cache, n_layers=1)
    key_positions = [0, 1, 2, 7, 8, 3, 4, 5, 6, 9]  # positions 7 and 8 were moved ahead of 3..6
    slots = [10, 12, 11, 16, 17, 13, 14, 15, 18, 19]  # exactly the slots 10..19 from 10 to 19, not in order
    _fill(cache, slots, key_positions, generator)
    # The chunk is the last five slots (positions 3, 4, 5, 6, 9): only position 9 may see 7 and 8.
    chunk_slots, chunk_positions = slots[5:], key_positions[5:]
    meta = LocalStepMeta(slots=torch.tensor(chunk_slots), positions=torch.tensor(chunk_positions),
                         segments=[_segment("edited", slice(0, 5), slots, in_order=False)], attention_rows={})
    q = torch.randn(5, H_Q, D, generator=generator)
    k_new, v_new = cache.k[0, chunk_slots].clone(), cache.v[0, chunk_slots].clone()
    meta = attention.prepare(meta)
    assert meta.segments[0].visible is not None and not meta.segments[0].flash_causal
    assert meta.segments[0].kv_range is None  # not in slot order: gathered in list order
    out = attention.attend(0, q, k_new, v_new, meta)
    expected = _reference(q, cache.k[0, slots], cache.v[0, slots], torch.tensor(chunk_positions),
                          torch.tensor(key_positions))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rotate", [True, False])
def test_shift_moves_positions_and_rotates_keys_as_if_encoded_there(rotate):
    generator = torch.Generator().manual_seed(11)
    cache = _cache(64)
    inv_freq = inverse_frequencies(D, 1e4)
    raw = torch.randn(6, H_KV, D, generator=generator)
    positions = torch.tensor([3, 4, 5, 6, 7, 8])
    slots = torch.tensor([9, 2, 30, 31, 40, 17])
    cache.k[0, slots] = apply_rotary(raw, *rotary_cos_sin(positions, inv_freq))
    cache.v[0, slots] = values = torch.randn(6, H_KV, D, generator=generator)
    cache.positions[slots] = positions
    untouched = cache.k[0, 20].clone()
    moved = slots[2:]
    cache.shift(moved, 5, inv_freq, rotate=rotate)
    assert cache.positions[slots].tolist() == [3, 4, 10, 11, 12, 13]
    expected_positions = positions + 5 if rotate else positions  # a rotation at the new positions, or none
    def rotated(keys, at):
        return apply_rotary(keys, *rotary_cos_sin(at, inv_freq))

    torch.testing.assert_close(cache.k[0, moved], rotated(raw[2:], expected_positions[2:]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.k[0, slots[:2]], rotated(raw[:2], positions[:2]))
    assert torch.equal(cache.v[0, slots], values) and torch.equal(cache.k[0, 20], untouched)
    cache.shift(moved, 0, inv_freq)  # no move: nothing changes
    assert cache.positions[slots].tolist() == [3, 4, 10, 11, 12, 13]
    cache.shift(moved, -5, inv_freq)  # back (keys rotated by default)
    assert cache.positions[slots].tolist() == positions.tolist()
    back = positions if rotate else positions - 5  # without the first rotation the keys now sit 5 behind
    torch.testing.assert_close(cache.k[0, moved], rotated(raw[2:], back[2:]), atol=1e-5, rtol=1e-5)
    cache.shift(slots[:1], 1, inv_freq)  # one key, one position: the smallest move is still a move
    assert cache.positions[slots[0]].item() == 4
    torch.testing.assert_close(cache.k[0, slots[:1]], rotated(raw[:1], positions[:1] + 1),
                               atol=1e-5, rtol=1e-5)


def test_copy_takes_keys_values_and_positions_and_leaves_the_source():
    generator = torch.Generator().manual_seed(13)
    cache = _cache(64)
    source, target = torch.tensor([1, 2, 3]), torch.tensor([40, 41, 50])
    _fill(cache, source, [7, 8, 9], generator)
    before = cache.k[:, source].clone(), cache.v[:, source].clone()
    cache.copy(source, target)
    assert torch.equal(cache.k[:, target], before[0]) and torch.equal(cache.v[:, target], before[1])
    assert cache.positions[target].tolist() == [7, 8, 9] == cache.positions[source].tolist()
    assert torch.equal(cache.k[:, source], before[0])


def test_attention_without_a_cache_is_causal():
    generator = torch.Generator().manual_seed(17)
    q = torch.randn(12, H_Q, D, generator=generator)
    k, v = torch.randn(12, H_KV, D, generator=generator), torch.randn(12, H_KV, D, generator=generator)
    out = NoCacheAttention().attend(0, q, k, v, torch.arange(12))
    torch.testing.assert_close(out.double(), _reference(q, k, v), atol=1e-5, rtol=1e-5)
