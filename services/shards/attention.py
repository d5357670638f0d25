"""Sequence-parallel attention over a paged KV cache: each shard holds some positions of every
request, and attention crosses shards through one ringattn schedule per layer for the whole step.

A step's tokens go in packed: every request's query rows and KV of this shard, with the request's index
in the plan as sequence id, in one schedule call per layer (so a step makes one collective exchange per
layer whatever its batch size). Every rank derives the same `StepLayout` from the plan (schedule, every
rank's lengths, requests that want attention rows), so their collectives line up without a word.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from longbow.ringattn import costmodel
from longbow.ringattn.comm import CommCounter, DistTransport
from longbow.ringattn.decode import decode_attention_pass_q
from longbow.ringattn.ring import ring_attention
from longbow.ringattn.tokenring import tokenring_attention
from longbow.services.engine.kv_cache import LocalPagedAttention, LocalStepMeta, PagedKVCache
from longbow.services.engine.types import StepPlan
from longbow.services.engine.worker import ShardLayout

log = logging.getLogger(__name__)

SCHEDULE_FUNCTIONS = {"tokenring": tokenring_attention, "ring": ring_attention, "decode_pass_q": decode_attention_pass_q}
# which of every rank's lengths each schedule is handed (it then skips its setup all-gather)
LENGTH_ARGUMENT = {"tokenring": "q_lens", "decode_pass_q": "q_lens", "ring": "kv_lens"}
# NOTE: loopback gloo on this class of machine; only the ratios between schedules matter for the choice.
LOOPBACK_GLOO = costmodel.Hardware("gloo loopback", flops_per_s=2e10, link_bytes_per_s=1e9, latency_s=1e-4)


@dataclass(frozen=True)
class AttentionRequest:
    """A request whose last-layer attention row is asked for (DRAGIN): chunk index, owner, query position."""

    chunk: int
    request_id: str
    owner: int
    position: int


@dataclass
class StepLayout:
    """What every rank knows about a step before computing it (derived from the plan alone)."""

    schedule: str
    q_lens: list[int]  # query tokens on each rank
    kv_lens: list[int]  # visible KV tokens on each rank, all chunks together
    attention: list[AttentionRequest] = field(default_factory=list)


def _chunk_kv_slots(chunk, block_size: int) -> np.ndarray:
    """Global slots [Tk] of every key the chunk sees, in the order build_step_inputs lists them."""
    if chunk.kv_slots is not None:
        return np.asarray(chunk.kv_slots, dtype=np.int64)
    blocks = np.asarray(chunk.block_table, dtype=np.int64)
    return (blocks[:, None] * block_size + np.arange(block_size)).reshape(-1)[:chunk.kv_len]


def step_layout(plan: StepPlan, layout: ShardLayout, shape: costmodel.AttentionShape,
                hardware: costmodel.Hardware = LOOPBACK_GLOO) -> StepLayout:
    """The step's schedule and lengths, the same on every rank.

    - every chunk one token (a decode step): pass-Q, bytes independent of the KV length;
    - a chunk with explicit kv_slots (an edited document, PIE): TokenRing, a few new tokens against a
      long cached document whose KV sits anywhere (no positions to scan);
    - otherwise the cost model's choice between TokenRing and ring for the packed batch.
    """
    n, per_shard = layout.num_shards, layout.slots_per_shard
    q_shards = [np.asarray(c.slots, dtype=np.int64) // per_shard for c in plan.chunks]
    kv_shards = [_chunk_kv_slots(c, layout.block_size) // per_shard for c in plan.chunks]
    q_lens = np.bincount(np.concatenate(q_shards), minlength=n).tolist() if q_shards else [0] * n
    kv_lens = np.bincount(np.concatenate(kv_shards), minlength=n).tolist() if kv_shards else [0] * n
    attention = [AttentionRequest(b, c.request_id, c.shard, c.positions[-1]) for b, c in enumerate(plan.chunks)
                 if c.return_attention and c.sample]
    if all(len(c.token_ids) == 1 for c in plan.chunks):
        return StepLayout("decode_pass_q", q_lens, kv_lens, attention)
    if any(c.kv_slots is not None for c in plan.chunks):
        return StepLayout("tokenring", q_lens, kv_lens, attention)
    per_rank = {key: [[] for _ in range(n)] for key in ("q_pos", "k_pos", "q_seq", "k_seq")}
    for b, chunk in enumerate(plan.chunks):
        q_pos, k_pos = np.asarray(chunk.positions, dtype=np.int64), np.arange(chunk.kv_len, dtype=np.int64)
        for r in range(n):
            mine_q, mine_k = q_pos[q_shards[b] == r], k_pos[kv_shards[b] == r]
            per_rank["q_pos"][r].append(mine_q), per_rank["k_pos"][r].append(mine_k)
            per_rank["q_seq"][r].append(np.full(len(mine_q), b)), per_rank["k_seq"][r].append(np.full(len(mine_k), b))
    tensors = {key: [torch.from_numpy(np.concatenate(parts).astype(np.int64)) for parts in ranks]
               for key, ranks in per_rank.items()}
    name, _ = costmodel.choose_schedule(shape, tensors["q_pos"], tensors["k_pos"], hardware, ("tokenring", "ring"),
                                        tensors["q_seq"], tensors["k_seq"], sizes_known=True)
    return StepLayout(name, q_lens, kv_lens, attention)


class ShardedPagedAttention(LocalPagedAttention):
    def __init__(self, cache: PagedKVCache, n_layers: int, shape: costmodel.AttentionShape,
                 group: dist.ProcessGroup | None = None):
        super().__init__(cache, n_layers)
        self.shape, self.group = shape, group
        self.counter = CommCounter()
        self.transport = DistTransport(group, self.counter)
        self.schedule_counts: dict[str, int] = {}
        self.step: StepLayout | None = None
        # request id -> (positions, head-averaged probabilities) of the keys held here, last step
        self.attention_parts: dict[str, tuple[list[int], list[float]]] = {}

    def begin_step(self, step: StepLayout) -> None:
        self.step = step
        self.schedule_counts[step.schedule] = self.schedule_counts.get(step.schedule, 0) + 1
        self.attention_parts = {}

    def prepare(self, meta: LocalStepMeta) -> LocalStepMeta:
        """Once per step: positions stored, and the packed batch's sequence ids and key positions."""
        self.cache.positions[meta.slots] = meta.positions
        device = meta.positions.device
        rows, keys = np.diff(meta.row_start), np.diff(meta.kv_start)  # [B] rows and keys per chunk here
        self.q_seq = torch.from_numpy(np.repeat(np.arange(len(rows)), rows)).to(device)  # [T_local]
        self.k_seq = torch.from_numpy(np.repeat(np.arange(len(keys)), keys)).to(device)  # [Tk_local]
        self.kv_slots = meta.all_kv_slots  # [Tk_local]
        self.k_pos = self.cache.positions[self.kv_slots]  # [Tk_local]
        return meta

    def attend(self, layer, q, k, v, meta: LocalStepMeta) -> torch.Tensor:
        step = self.step
        self.store(layer, k, v, meta)
        keys = self.cache.k[layer].index_select(0, self.kv_slots)  # [Tk_local, Hkv, D]
        values = self.cache.v[layer].index_select(0, self.kv_slots)
        lengths = {LENGTH_ARGUMENT[step.schedule]: getattr(step, LENGTH_ARGUMENT[step.schedule])}
        out, lse = SCHEDULE_FUNCTIONS[step.schedule](
            q, keys, values, meta.positions, self.k_pos, causal=True, group=self.group, counter=self.counter,
            q_seq=self.q_seq, k_seq=self.k_seq, **lengths,
        )  # [T_local, Hq, D], [T_local, Hq] fp32
        if layer == self.last_layer and step.attention:
            self._attention_rows(q, keys, lse, meta)
        return out.to(q.dtype)

    def _attention_rows(self, q: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, meta: LocalStepMeta) -> None:
        """Each asked-for row's head-averaged attention over the keys held here: its owner shares the query
        row and its lse over every shard's keys (one allreduce), then every rank computes
        exp(score - lse) for its own keys. The driver puts the pieces together by position."""
        h_q, d = q.shape[1:]
        shared = torch.zeros(len(self.step.attention), h_q, d + 1, dtype=torch.float32, device=q.device)
        for i, request in enumerate(self.step.attention):
            if request.owner == self.transport.rank:
                row = int(meta.row_start[request.chunk + 1]) - 1
                shared[i, :, :d], shared[i, :, d] = q[row].float(), lse[row]
        shared = self.transport.all_reduce("attention rows", shared, "sum")  # [W, Hq, D + 1]
        for i, request in enumerate(self.step.attention):
            where = slice(int(meta.kv_start[request.chunk]), int(meta.kv_start[request.chunk + 1]))
            k_pos = self.k_pos[where]
            block = keys[where].float().repeat_interleave(h_q // keys.shape[1], dim=1)  # [Tk, Hq, D]
            scores = torch.einsum("hd,khd->hk", shared[i, :, :d], block) / d**0.5  # [Hq, Tk]
            probs = (scores - shared[i, :, d].unsqueeze(1)).exp().masked_fill(k_pos > request.position, 0.0)
            self.attention_parts[request.request_id] = (k_pos.tolist(), probs.mean(0).tolist())
