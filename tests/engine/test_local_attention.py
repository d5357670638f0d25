"""LocalPagedAttention on in-order chunks: whichever CPU path a chunk takes (boolean lower-right causal
mask, or ringattn's mask-free flash pieces for long contexts), the output equals dense fp64 attention
computed here from the cache's own keys. Tolerance 1e-5 (fp32 kernels, fp64 reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longbow.services.engine.kv_cache import LocalPagedAttention, LocalStepMeta, PagedKVCache, Segment
from longbow.services.engine.model import ModelArgs

H_Q, H_KV, D = 6, 2, 16


def _cache(slots: int) -> PagedKVCache:
    args = ModelArgs(vocab_size=8, dim=H_Q * D, n_layers=1, n_heads=H_Q, n_kv_heads=H_KV, head_dim=D,
                     intermediate_size=8, norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
                     max_position_embeddings=slots, tie_embeddings=True, attention_bias=False)
    return PagedKVCache(args, num_blocks=slots // 16, block_size=16, device="cpu", dtype=torch.float32)


def _reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Dense attention of the last len(q) positions over keys at positions 0..Tk-1, lower-right causal."""
    t_q, t_k = q.shape[0], keys.shape[0]
    group = H_Q // H_KV
    k = keys.double().repeat_interleave(group, dim=1)  # [Tk, Hq, D]
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(D)
    visible = torch.arange(t_k)[None, :] <= torch.arange(t_k - t_q, t_k)[:, None]
    scores = scores.masked_fill(~visible, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("rows,keys,flash", [
    (8, 1024, False),  # short chunk, moderate context: the boolean mask
    (128, 256, False),
    (2, 2048, True),  # any chunk over a long context: flash pieces
    (32, 1600, True),
    (64, 512, True),  # a long enough chunk: flash pieces
    (200, 700, True),
    (192, 256, True),  # a long chunk over few keys: flash pieces too
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
        segments=[Segment("chunk", slice(0, rows), torch.from_numpy(chunk_keys), chunk_keys, in_order=True),
                  Segment("decode", slice(rows, rows + 1), torch.from_numpy(decode_keys), decode_keys, in_order=True)],
        attention_rows={})
    q = torch.randn(rows + 1, H_Q, D, generator=generator)
    k_new = torch.randn(rows + 1, H_KV, D, generator=generator)
    v_new = torch.randn(rows + 1, H_KV, D, generator=generator)

    meta = attention.prepare(meta)
    assert meta.segments[0].flash_causal is flash
    out = attention.attend(0, q, k_new, v_new, meta)

    expected_chunk = _reference(q[:rows], cache.k[0, :keys], cache.v[0, :keys])
    expected_decode = _reference(q[rows:], cache.k[0, keys:decode_slot + 1], cache.v[0, keys:decode_slot + 1])
    torch.testing.assert_close(out[:rows].double(), expected_chunk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[rows:].double(), expected_decode, atol=1e-5, rtol=1e-5)
