"""Block attention on one device, returning (out, lse) so partial results can be merged.

Causal masking compares position ids, never storage order: a key is visible to a query when
`key_pos <= query_pos` (and, for ragged batches, both belong to the same sequence). This is what lets
KV of one request live on any shard in any order, and what lets PIE re-position keys in place.
GQA is native: KV heads are never expanded, query heads are grouped over them.

Under a causal mask the block is cut into tiles (up to KEY_TILE keys by as many query rows as fit in
TILE_SCORES); tiles whose keys all lie after every query are skipped and tiles whose keys all lie
before every query run without a mask. This works for any position layout: contiguous and zigzag
shards skip about half of a diagonal block, a random permutation skips nothing and stays exact.
`computed_pairs` counts the (query, key) pairs that are actually computed, which is what the cost model charges as FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from longbow.ringattn.merge import merge_partials

# NOTE: 2**22 fp32 scores per tile keeps one tile's scratch (scores + probabilities) near 32 MiB, so a
# 16k x 16k block with 9 heads runs on a laptop; on CPU the tile size barely moves the FLOP rate.
TILE_SCORES = 1 << 22
KEY_TILE = 1024


def visibility_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    q_seq: torch.Tensor | None = None,
    k_seq: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean [Tq, Tk] mask of visible keys, or None when every key is visible."""
    mask = None
    if causal:
        mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    if q_seq is not None and k_seq is not None:
        same = k_seq.unsqueeze(0) == q_seq.unsqueeze(1)
        mask = same if mask is None else mask & same
    return mask


def _dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile: q [Tq, Hq, D], k/v [Tk, Hkv, D], mask [Tq, Tk] or None -> out [Tq, Hq, D], lse [Tq, Hq]."""
    t_q, h_q, d = q.shape
    h_kv = k.shape[1]
    group = h_q // h_kv
    qg = q.float().reshape(t_q, h_kv, group, d).permute(1, 2, 0, 3).reshape(h_kv, group * t_q, d)
    scores = torch.bmm(qg, k.float().permute(1, 2, 0)).mul_(scale)  # [Hkv, G*Tq, Tk]
    scores = scores.view(h_kv, group, t_q, -1)  # [Hkv, G, Tq, Tk]
    if mask is not None:
        scores.masked_fill_(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, Tq]
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = scores.sub_(safe_lse.unsqueeze(-1)).exp_()  # rows with no visible key are all zero
    out = torch.bmm(probs.view(h_kv, group * t_q, -1), v.float().transpose(0, 1))  # [Hkv, G*Tq, D]
    out = out.view(h_kv, group, t_q, d).permute(2, 0, 1, 3).reshape(t_q, h_q, d)
    return out, lse.permute(2, 0, 1).reshape(t_q, h_q)


def _position_range(pos: list[int], start: int, end: int) -> tuple[int, int]:
    window = pos[start:end]
    return min(window), max(window)


def causal_tiles(
    q_pos: torch.Tensor, k_pos: torch.Tensor, heads_q: int
) -> Iterator[tuple[slice, slice, bool]]:
    """(query rows, key rows, needs_mask) for every causal tile with at least one visible key."""
    q_list, k_list = q_pos.tolist(), k_pos.tolist()
    rows = max(1, TILE_SCORES // (heads_q * KEY_TILE))
    key_tiles = [
        (start, min(start + KEY_TILE, len(k_list)), *_position_range(k_list, start, start + KEY_TILE))
        for start in range(0, len(k_list), KEY_TILE)
    ]
    for q_start in range(0, len(q_list), rows):
        q_end = min(q_start + rows, len(q_list))
        q_min, q_max = _position_range(q_list, q_start, q_end)
        for k_start, k_end, k_min, k_max in key_tiles:
            if k_min <= q_max:
                yield slice(q_start, q_end), slice(k_start, k_end), k_max > q_min


def computed_pairs(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, heads_q: int = 1) -> int:
    """Query-key pairs block_attention computes (tiles it skips are not counted)."""
    t_q, t_k = q_pos.shape[0], k_pos.shape[0]
    if not causal or t_q == 0 or t_k == 0:
        return t_q * t_k
    return sum((q.stop - q.start) * (k.stop - k.start) for q, k, _ in causal_tiles(q_pos, k_pos, heads_q))


def _rows_per_tile(heads_q: int, t_k: int) -> int:
    return max(1, TILE_SCORES // max(1, heads_q * t_k))


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool = True,
    q_seq: torch.Tensor | None = None,
    k_seq: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over (k, v) with its log-sum-exp.

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D] with Hq % Hkv == 0; q_pos: [Tq], k_pos: [Tk] (int64).
    Returns out: [Tq, Hq, D] fp32 (zeros where no key is visible) and lse: [Tq, Hq] fp32 (-inf there).
    """
    t_q, h_q, d = q.shape
    t_k = k.shape[0]
    out = q.new_zeros(t_q, h_q, d, dtype=torch.float32)
    lse = q.new_full((t_q, h_q), -math.inf, dtype=torch.float32)
    if t_k == 0 or t_q == 0:
        return out, lse
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if causal and q_seq is None:
        for q_rows, k_rows, needs_mask in causal_tiles(q_pos, k_pos, h_q):
            mask = visibility_mask(q_pos[q_rows], k_pos[k_rows], True) if needs_mask else None
            tile_out, tile_lse = _dense_attention(q[q_rows], k[k_rows], v[k_rows], mask, scale)
            out[q_rows], lse[q_rows] = merge_partials(out[q_rows], lse[q_rows], tile_out, tile_lse)
        return out, lse
    rows = _rows_per_tile(h_q, t_k)
    for start in range(0, t_q, rows):
        q_rows = slice(start, min(start + rows, t_q))
        seq = q_seq[q_rows] if q_seq is not None else None
        mask = visibility_mask(q_pos[q_rows], k_pos, causal, seq, k_seq)
        out[q_rows], lse[q_rows] = _dense_attention(q[q_rows], k, v, mask, scale)
    return out, lse


def sdpa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool = True,
    q_seq: torch.Tensor | None = None,
    k_seq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single-device reference through torch's SDPA (KV heads expanded). Returns [Tq, Hq, D] fp32.

    Rows with no visible key are returned as zeros, matching block_attention.
    """
    h_q, h_kv = q.shape[1], k.shape[1]
    k_full = k.float().repeat_interleave(h_q // h_kv, dim=1)
    v_full = v.float().repeat_interleave(h_q // h_kv, dim=1)
    mask = visibility_mask(q_pos, k_pos, causal, q_seq, k_seq)
    if mask is None:
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool)
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k_full.transpose(0, 1), v_full.transpose(0, 1), attn_mask=mask
    ).transpose(0, 1)
    empty_rows = ~mask.any(dim=1)
    return out.masked_fill(empty_rows.view(-1, 1, 1), 0.0)


def reference_lse(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool
) -> torch.Tensor:
    """Single-device log-sum-exp [Tq, Hq] fp32 in float64 arithmetic (KV heads expanded), for tests."""
    h_q, h_kv, d = q.shape[1], k.shape[1], q.shape[2]
    k_full = k.double().repeat_interleave(h_q // h_kv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k_full) / math.sqrt(d)  # [Hq, Tq, Tk]
    mask = visibility_mask(q_pos, k_pos, causal)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.logsumexp(scores, dim=-1).transpose(0, 1).float()
