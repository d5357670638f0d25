"""Block attention on one device, returning (out, lse) so partial results can be merged.

Causal masking compares position ids, never storage order: a key is visible to a query when
`key_pos <= query_pos` (and, for ragged batches, both belong to the same sequence). This is what lets
KV of one request live on any shard in any order, and what lets PIE re-position keys in place.
GQA is native: KV heads are never expanded, query heads are grouped over them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    t_k, h_kv, _ = k.shape
    group = h_q // h_kv
    if t_k == 0 or t_q == 0:
        return q.new_zeros(t_q, h_q, d, dtype=torch.float32), q.new_full((t_q, h_q), -math.inf, dtype=torch.float32)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    qg = q.float().view(t_q, h_kv, group, d)  # [Tq, Hkv, G, D]
    scores = torch.einsum("qhgd,khd->hgqk", qg, k.float()) * scale  # [Hkv, G, Tq, Tk]
    mask = visibility_mask(q_pos, k_pos, causal, q_seq, k_seq)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, Tq]
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse.unsqueeze(-1))  # rows with no visible key are all zero
    out = torch.einsum("hgqk,khd->qhgd", probs, v.float())  # [Tq, Hkv, G, D]
    return out.reshape(t_q, h_q, d), lse.permute(2, 0, 1).reshape(t_q, h_q)


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
