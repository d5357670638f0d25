"""TokenRing: pass-Q, bidirectional sequence-parallel attention.

K/V never move. Each query block travels the ring one hop per phase (rank r -> r-1), and each
partial result (out, lse) goes straight back to the query block's owner on a second channel, in the
same phase as the next hop, so both directions of the links carry data while every rank computes.

Phases on rank r of N (owner(p) = (r + p) mod N is whose queries r holds in phase p):
    phase 0        compute own queries, first half of the rows, on own KV   | send own Q to r-1
    phase 1..N-1   compute owner(p)'s queries on own KV                      | forward Q to r-1 (p <= N-2)
                                                                             | return phase p-1's result (p >= 2)
    phase N        compute own queries, second half of the rows, on own KV  | return phase N-1's result
NOTE: the local block is split in two so that the first query hop and the last result return are both
hidden behind compute; a schedule that computed the whole local block first would leave the last
return exposed (one full result message per forward).

Sizes: one all-gather of query lengths per call ("setup"), unless the caller passes every rank's
lengths (`q_lens`), so shards may be uneven or empty and every receive buffer is preallocated at its
exact size; nothing is padded. Positions travel with the queries only under a causal mask.

Packed batches: with sequence ids (q_seq, k_seq) a call attends the tokens of many sequences at once,
one ring for the whole step's batch instead of one per request. Sequence id and position travel as one
int64 token key (local.token_keys), so the bytes per query token are those of one sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longbow.ringattn.comm import CommCounter, DistTransport, Transport, run_emulated, setup_lengths
from longbow.ringattn.layout import Shard, check_packed
from longbow.ringattn.local import keyed_attention, token_keys
from longbow.ringattn.merge import merge_partials


def tokenring_attention(
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
    """This rank's queries attended over every rank's KV. Returns out [Tq, Hq, D], lse [Tq, Hq] fp32.

    Packed (q_seq/k_seq [Tq]/[Tk] sequence ids): several sequences at once, a query seeing only its own
    sequence's keys. q_lens: every rank's query count, when all ranks know them (skips the setup step).
    """
    return tokenring_rank(DistTransport(group, counter), q, k, v, q_pos, k_pos, causal=causal,
                          q_seq=q_seq, k_seq=k_seq, q_lens=q_lens)


def tokenring_attention_emulated(
    shards: list[Shard], *, causal: bool = True, counters: list[CommCounter] | None = None,
    q_lens: list[int] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same schedule over N emulated ranks in this process (one shard per rank)."""
    return run_emulated(
        lambda transport, s: tokenring_rank(transport, s.q, s.k, s.v, s.q_pos, s.k_pos, causal=causal,
                                            q_seq=s.q_seq, k_seq=s.k_seq, q_lens=q_lens),
        shards,
        counters,
    )


class _QueryBuffers:
    """Two preallocated query (and position) buffers, alternated so a hop never overwrites a block
    that is still being sent."""

    def __init__(self, max_len: int, q: torch.Tensor, with_positions: bool):
        _, h_q, d = q.shape
        self.q = [q.new_empty(max_len, h_q, d) for _ in range(2)]
        self.pos = [torch.empty(max_len if with_positions else 0, dtype=torch.int64, device=q.device) for _ in range(2)]

    def take(self, phase: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        slot = phase % 2
        return self.q[slot][:length], self.pos[slot][: length if self.pos[slot].numel() else 0]


def tokenring_rank(
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
    """TokenRing for one rank over any Transport (see the module docstring for the phases)."""
    n, rank = transport.world_size, transport.rank
    packed = check_packed(q_seq, k_seq)
    q = q.contiguous()
    q_pos, k_pos = token_keys(q_pos, q_seq).contiguous(), token_keys(k_pos, k_seq)
    with_keys = causal or packed  # token keys travel with the queries only when a mask reads them
    t_q, h_q, d = q.shape
    q_lens = setup_lengths(transport, t_q, q_lens)
    buffers = _QueryBuffers(max(q_lens), q, with_positions=with_keys)
    result_out = q.new_empty(t_q, h_q, d)  # [Tq, Hq, D], partials come back in the input dtype
    result_lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    out = torch.zeros(t_q, h_q, d, dtype=torch.float32, device=q.device)
    lse = torch.full((t_q, h_q), -float("inf"), dtype=torch.float32, device=q.device)
    half = t_q // 2
    held_q, held_pos = q, (q_pos if with_keys else q_pos[:0])
    pending = None  # (owner, out, lse) computed last phase, to return this phase
    for phase in range(n + 1):
        sends, recvs = [], []
        if phase <= n - 2:
            next_q, next_pos = buffers.take(phase, q_lens[(rank + phase + 1) % n])
            sends += [((rank - 1) % n, held_q), ((rank - 1) % n, held_pos)]
            recvs += [((rank + 1) % n, next_q), ((rank + 1) % n, next_pos)]
        if pending is not None:
            owner, part_out, part_lse = pending
            source = (rank - phase + 1) % n
            sends += [(owner, part_out), (owner, part_lse)]
            recvs += [(source, result_out), (source, result_lse)]
        handle = transport.exchange(f"step {phase}", sends, recvs)
        if phase == 0 or phase == n:
            rows = slice(0, half) if phase == 0 else slice(half, t_q)
            local_out, local_lse = keyed_attention(q[rows], k, v, q_pos[rows], k_pos, causal=causal, packed=packed)
            out[rows], lse[rows] = merge_partials(out[rows], lse[rows], local_out, local_lse)
            next_pending = None
        else:
            positions = held_pos if with_keys else torch.zeros(held_q.shape[0], dtype=torch.int64)
            part_out, part_lse = keyed_attention(held_q, k, v, positions, k_pos, causal=causal, packed=packed)
            # NOTE: partials travel in the input dtype (bf16 on GPU halves the return bytes); the merge
            # itself is fp32. lse stays fp32: in bf16 an lse of 20 would be off by ~0.06, i.e. 6%.
            next_pending = ((rank + phase) % n, part_out.to(q.dtype), part_lse)
        transport.wait(handle)
        if pending is not None:
            out, lse = merge_partials(out, lse, result_out, result_lse)
        if phase <= n - 2:
            held_q, held_pos = next_q, next_pos
        pending = next_pending
    return out, lse
