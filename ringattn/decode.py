"""Decode over a KV cache spread across shards: a few query tokens against a long, sharded KV.

Two exact forms, same signature as the prefill schedules (each rank passes the query tokens it owns,
usually one token on one rank and none elsewhere, and the KV it holds):
- pass-Q ring (`decode_attention_pass_q`): TokenRing itself. The query hops the ring and each
  partial returns to its owner; bytes per step are a query and a result, independent of KV length.
- allreduce (`decode_attention_allreduce`): every rank gets every query (one all-gather), computes its
  partial, and the partials are combined by two allreduces: max of lse, then the sum of
  [out * w, w] with w = exp(lse - max). Two collective latencies instead of N ring steps.
Moving KV (pass-KV) for decode would send the whole cache to attend one token; the cost model rules
it out with numbers (costmodel.choose_schedule).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longbow.ringattn.comm import CommCounter, DistTransport, Transport, run_emulated, setup_lengths
from longbow.ringattn.layout import Shard, check_packed
from longbow.ringattn.local import keyed_attention, token_keys
from longbow.ringattn.tokenring import tokenring_rank


def decode_attention_pass_q(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool = True,
    group: dist.ProcessGroup | None = None,
    counter: CommCounter | None = None,
    q_seq: torch.Tensor | None = None,
    k_seq: torch.Tensor | None = None,
    q_lens: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass-Q ring decode (TokenRing with a query block of a token or a few; packed: one per sequence)."""
    return tokenring_rank(DistTransport(group, counter), q, k, v, q_pos, k_pos, causal=causal,
                          q_seq=q_seq, k_seq=k_seq, q_lens=q_lens)


def decode_attention_allreduce(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool = True,
    group: dist.ProcessGroup | None = None,
    counter: CommCounter | None = None,
    q_seq: torch.Tensor | None = None,
    k_seq: torch.Tensor | None = None,
    q_lens: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather queries, attend locally, combine partials with two allreduces."""
    return decode_allreduce_rank(DistTransport(group, counter), q, k, v, q_pos, k_pos, causal=causal,
                                 q_seq=q_seq, k_seq=k_seq, q_lens=q_lens)


def decode_attention_pass_q_emulated(
    shards: list[Shard], *, causal: bool = True, counters: list[CommCounter] | None = None,
    q_lens: list[int] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return run_emulated(
        lambda t, s: tokenring_rank(t, s.q, s.k, s.v, s.q_pos, s.k_pos, causal=causal,
                                    q_seq=s.q_seq, k_seq=s.k_seq, q_lens=q_lens),
        shards, counters,
    )


def decode_attention_allreduce_emulated(
    shards: list[Shard], *, causal: bool = True, counters: list[CommCounter] | None = None,
    q_lens: list[int] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return run_emulated(
        lambda t, s: decode_allreduce_rank(t, s.q, s.k, s.v, s.q_pos, s.k_pos, causal=causal,
                                           q_seq=s.q_seq, k_seq=s.k_seq, q_lens=q_lens),
        shards, counters,
    )


def _gather_queries(
    transport: Transport, q: torch.Tensor, q_pos: torch.Tensor, q_lens: list[int] | None
) -> tuple[torch.Tensor, torch.Tensor, slice]:
    """Every rank's queries [Q_all, Hq, D] and token keys [Q_all], and the rows that are this rank's."""
    q_lens = setup_lengths(transport, q.shape[0], q_lens)
    pad = max(q_lens)
    padded = torch.zeros(pad, *q.shape[1:], dtype=q.dtype, device=q.device)
    padded[: q.shape[0]] = q
    padded_pos = torch.zeros(pad, dtype=torch.int64, device=q.device)
    padded_pos[: q.shape[0]] = q_pos
    all_q = transport.all_gather("gather q", padded)
    all_pos = transport.all_gather("gather q", padded_pos)
    own_start = sum(q_lens[: transport.rank])
    rows = slice(own_start, own_start + q.shape[0])
    return (
        torch.cat([block[:n] for block, n in zip(all_q, q_lens)]),
        torch.cat([block[:n] for block, n in zip(all_pos, q_lens)]),
        rows,
    )


def decode_allreduce_rank(
    transport: Transport,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool = True,
    q_seq: torch.Tensor | None = None,
    k_seq: torch.Tensor | None = None,
    q_lens: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allreduce decode for one rank over any Transport."""
    d = q.shape[2]
    packed = check_packed(q_seq, k_seq)
    q_pos, k_pos = token_keys(q_pos, q_seq), token_keys(k_pos, k_seq)
    all_q, all_pos, own_rows = _gather_queries(transport, q, q_pos, q_lens)
    part_out, part_lse = keyed_attention(all_q, k, v, all_pos, k_pos, causal=causal, packed=packed)  # [Q, Hq, D], [Q, Hq]
    max_lse = transport.all_reduce("max lse", part_lse, "max")
    # NOTE: shift by the global max before exponentiating, so an lse of +80 cannot overflow; a row no
    # rank can see has max -inf, shifted by 0 instead, giving weights exp(-inf) = 0 everywhere.
    shift = torch.where(torch.isneginf(max_lse), torch.zeros_like(max_lse), max_lse)
    weight = torch.exp(part_lse - shift)  # [Q, Hq], 0 where this rank saw no key
    packed = torch.cat([part_out * weight.unsqueeze(-1), weight.unsqueeze(-1)], dim=-1)  # [Q, Hq, D+1]
    total = transport.all_reduce("sum partials", packed, "sum")
    norm = total[..., d]  # [Q, Hq]
    seen = norm > 0
    out = torch.where(seen.unsqueeze(-1), total[..., :d] / norm.clamp_min(1e-30).unsqueeze(-1), 0.0)
    lse = torch.where(seen, shift + torch.log(norm.clamp_min(1e-30)), -float("inf"))
    return out[own_rows].contiguous(), lse[own_rows].contiguous()
