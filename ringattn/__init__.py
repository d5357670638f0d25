"""Sequence-parallel attention over torch.distributed.

Owns the attention math only: no Ray, no gRPC, no model. Every schedule here returns
exactly what single-device attention would (see tests/ringattn).

All distributed schedules share one signature: each rank passes its own shard (q [Tq, Hq, D] of the
tokens it holds, k/v [Tk, Hkv, D] and int64 positions of the KV it holds) and gets back
(out [Tq, Hq, D] fp32, lse [Tq, Hq] fp32) for its own queries:

    fn(q, k, v, q_pos, k_pos, *, causal=True, group=None, counter=None)

Each also has an `_emulated` form: a list of layout.Shard in, a list of (out, lse) out, N logical ranks
in one process with the same steps and byte counts.
"""

from longbow.ringattn.comm import CommCounter
from longbow.ringattn.decode import (
    decode_attention_allreduce,
    decode_attention_allreduce_emulated,
    decode_attention_pass_q,
    decode_attention_pass_q_emulated,
)
from longbow.ringattn.layout import Shard, shard_sequence
from longbow.ringattn.local import block_attention, sdpa_reference
from longbow.ringattn.merge import merge_many, merge_partials
from longbow.ringattn.ring import ring_attention, ring_attention_emulated
from longbow.ringattn.tokenring import tokenring_attention, tokenring_attention_emulated
from longbow.ringattn.ulysses import ulysses_attention, ulysses_attention_emulated

# name -> (torch.distributed form, emulated form)
SCHEDULES = {
    "tokenring": (tokenring_attention, tokenring_attention_emulated),
    "ring": (ring_attention, ring_attention_emulated),
    "ulysses": (ulysses_attention, ulysses_attention_emulated),
    "decode_pass_q": (decode_attention_pass_q, decode_attention_pass_q_emulated),
    "decode_allreduce": (decode_attention_allreduce, decode_attention_allreduce_emulated),
}

__all__ = [
    "SCHEDULES",
    "CommCounter",
    "Shard",
    "block_attention",
    "decode_attention_allreduce",
    "decode_attention_pass_q",
    "merge_many",
    "merge_partials",
    "ring_attention",
    "sdpa_reference",
    "shard_sequence",
    "tokenring_attention",
    "ulysses_attention",
]
