"""Ring attention (pass-KV), the baseline TokenRing is measured against.

Queries stay; each rank's K/V block travels the ring one hop per step (rank r -> r+1) while the rank
computes its queries against the block it holds, merging partials in fp32. N compute steps, N-1 KV
hops, all overlapped; the last step has no communication. Causal load balance comes from the zigzag
layout (ringattn.layout): with it every off-diagonal step computes half a block on every rank.

K and V are packed into one [Tk, 2, Hkv, D] buffer so a hop is one message (plus positions under a
causal mask). Sizes are all-gathered once per call ("setup") unless the caller passes them, so shards
may be uneven or empty. Packed batches (sequence ids) as in tokenring: the token keys ride with the KV.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longbow.ringattn.comm import CommCounter, DistTransport, Transport, run_emulated, setup_lengths
from longbow.ringattn.layout import Shard, check_packed
from longbow.ringattn.local import keyed_attention, token_keys
from longbow.ringattn.merge import merge_partials


def ring_attention(
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
    kv_lens: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's queries attended over every rank's KV. Returns out [Tq, Hq, D], lse [Tq, Hq] fp32.
    q_seq/k_seq: a packed batch (see tokenring); kv_lens: every rank's KV count, when known."""
    return ring_rank(DistTransport(group, counter), q, k, v, q_pos, k_pos, causal=causal,
                     q_seq=q_seq, k_seq=k_seq, kv_lens=kv_lens)


def ring_attention_emulated(
    shards: list[Shard], *, causal: bool = True, counters: list[CommCounter] | None = None,
    kv_lens: list[int] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same schedule over N emulated ranks in this process (one shard per rank)."""
    return run_emulated(
        lambda transport, s: ring_rank(transport, s.q, s.k, s.v, s.q_pos, s.k_pos, causal=causal,
                                       q_seq=s.q_seq, k_seq=s.k_seq, kv_lens=kv_lens),
        shards,
        counters,
    )


def ring_rank(
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
    kv_lens: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass-KV ring for one rank over any Transport. At step s the rank holds rank (r-s)'s KV."""
    n, rank = transport.world_size, transport.rank
    packed = check_packed(q_seq, k_seq)
    q_pos, k_pos = token_keys(q_pos, q_seq), token_keys(k_pos, k_seq)
    with_keys = causal or packed  # token keys travel with the KV only when a mask reads them
    t_k, h_kv, d = k.shape
    kv_lens = setup_lengths(transport, t_k, kv_lens)
    pos_len = max(kv_lens) if with_keys else 0
    kv_buffers = [k.new_empty(max(kv_lens), 2, h_kv, d) for _ in range(2)]  # [Tk_max, 2, Hkv, D]
    pos_buffers = [torch.empty(pos_len, dtype=torch.int64, device=k.device) for _ in range(2)]
    held_kv = torch.stack([k, v], dim=1)  # [Tk, 2, Hkv, D]
    held_pos = k_pos.contiguous() if with_keys else k_pos[:0]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # [Tq, Hq, D]
    lse = torch.full(q.shape[:2], -float("inf"), dtype=torch.float32, device=q.device)  # [Tq, Hq]
    for step in range(n):
        handle = None
        if step <= n - 2:
            length = kv_lens[(rank - step - 1) % n]
            next_kv = kv_buffers[step % 2][:length]
            next_pos = pos_buffers[step % 2][: length if with_keys else 0]
            sends = [((rank + 1) % n, held_kv), ((rank + 1) % n, held_pos)]
            recvs = [((rank - 1) % n, next_kv), ((rank - 1) % n, next_pos)]
            handle = transport.exchange(f"step {step}", sends, recvs)
        positions = held_pos if with_keys else torch.zeros(held_kv.shape[0], dtype=torch.int64)
        part_out, part_lse = keyed_attention(
            q, held_kv[:, 0], held_kv[:, 1], q_pos, positions, causal=causal, packed=packed
        )
        out, lse = merge_partials(out, lse, part_out, part_lse)
        if handle is not None:
            transport.wait(handle)
            held_kv, held_pos = next_kv, next_pos
    return out, lse
