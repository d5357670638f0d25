"""Sequence-parallel attention over a paged KV cache: each shard holds some positions of every
request, attention crosses shards through a ringattn schedule chosen per request per step.

Every rank walks the step's requests in plan order and joins each request's schedule, with an empty
query or KV block where it holds none of that request's tokens, so the collectives line up.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from longbow.ringattn import costmodel
from longbow.ringattn.comm import CommCounter
from longbow.ringattn.decode import decode_attention_pass_q
from longbow.ringattn.ring import ring_attention
from longbow.ringattn.tokenring import tokenring_attention
from longbow.services.engine.kv_cache import LocalPagedAttention, LocalStepMeta, PagedKVCache

log = logging.getLogger(__name__)

SCHEDULE_FUNCTIONS = {"tokenring": tokenring_attention, "ring": ring_attention, "decode_pass_q": decode_attention_pass_q}
# NOTE: loopback gloo on this class of machine; only the ratios between schedules matter for the choice.
LOOPBACK_GLOO = costmodel.Hardware("gloo loopback", flops_per_s=2e10, link_bytes_per_s=1e9, latency_s=1e-4)


class ShardedPagedAttention(LocalPagedAttention):
    def __init__(self, cache: PagedKVCache, n_layers: int, shape: costmodel.AttentionShape,
                 group: dist.ProcessGroup | None = None, hardware: costmodel.Hardware = LOOPBACK_GLOO):
        super().__init__(cache, n_layers)
        self.shape, self.group, self.hardware = shape, group, hardware
        self.counter = CommCounter()
        self.schedules: dict[str, str] = {}  # request id -> schedule for the current step
        self.schedule_counts: dict[str, int] = {}

    def choose_decode(self, request_id: str) -> None:
        """One query token: pass-Q moves bytes independent of the KV length."""
        self._record(request_id, "decode_pass_q")

    def choose_fixed(self, request_id: str, name: str) -> None:
        self._record(request_id, name)

    def choose(self, request_id: str, q_pos: list[torch.Tensor], k_pos: list[torch.Tensor]) -> None:
        """Called with every rank's query and KV positions of one request (all ranks agree)."""
        name, _ = costmodel.choose_schedule(self.shape, q_pos, k_pos, self.hardware, ("tokenring", "ring"))
        self._record(request_id, name)
        log.debug("request=%s schedule=%s queries=%s keys=%s", request_id, name,
                  [int(p.numel()) for p in q_pos], [int(p.numel()) for p in k_pos])

    def _record(self, request_id: str, name: str) -> None:
        self.schedules[request_id] = name
        self.schedule_counts[name] = self.schedule_counts.get(name, 0) + 1

    def prepare(self, meta: LocalStepMeta) -> LocalStepMeta:
        self.cache.positions[meta.slots] = meta.positions
        return meta

    def attend(self, layer, q, k, v, meta: LocalStepMeta) -> torch.Tensor:
        cache = self.cache
        self.store(layer, k, v, meta)
        out = torch.empty_like(q)  # [T_local, Hq, D]
        for seg in meta.segments:
            keys, values = cache.k[layer, seg.kv_slots], cache.v[layer, seg.kv_slots]  # [Tk_local, Hkv, D]
            fn = SCHEDULE_FUNCTIONS[self.schedules[seg.request_id]]
            part, _lse = fn(q[seg.rows], keys, values, meta.positions[seg.rows], cache.positions[seg.kv_slots],
                            causal=True, group=self.group, counter=self.counter)
            out[seg.rows] = part.to(q.dtype)
        return out
