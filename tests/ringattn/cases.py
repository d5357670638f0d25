"""Test cases shared by the emulated and the multi-process tests: inputs, shards and references.

A case is rebuilt from its name alone (seeded by a hash of it), so every spawned rank constructs the
same full sequence, takes its own shard, and checks its own rows against the same reference.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from longbow.ringattn.layout import Shard, layout_indices, shard_by_indices
from longbow.ringattn.local import reference_lse, sdpa_reference

HEADS_KV = 12  # divisible by every N in {1, 2, 3, 4}, so Ulysses runs in every case
HEAD_DIM = 8
LENGTH = 24
PREFILL_SCHEDULES = ("tokenring", "ring", "ulysses")
DECODE_SCHEDULES = ("decode_pass_q", "decode_allreduce", "tokenring", "ring", "ulysses")
PLACEMENTS = ("contiguous", "zigzag", "interleaved", "uneven")
GQA_RATIOS = (1, 3, 4)
FP32_TOL = 1e-5


@dataclass(frozen=True)
class Case:
    schedule: str
    world_size: int
    causal: bool
    gqa: int
    placement: str  # a layout name, "uneven" (random sizes, one rank empty) or "decode"
    dtype: torch.dtype = torch.float32

    @property
    def decode_owner(self) -> int:
        """The rank holding the decode query. It rotates over the ranks across a schedule's six
        (gqa, causal) cases, so for every N <= 4 each rank owns the query in some case."""
        return (GQA_RATIOS.index(self.gqa) * 2 + int(self.causal)) % self.world_size

    @property
    def name(self) -> str:
        mask = "causal" if self.causal else "full"
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.schedule}-n{self.world_size}-{mask}-gqa{self.gqa}-{self.placement}-{dtype}"


def all_cases(world_size: int) -> list[Case]:
    cases = [
        Case(s, world_size, c, g, p)
        for s in PREFILL_SCHEDULES for c in (True, False) for g in GQA_RATIOS for p in PLACEMENTS
    ]
    cases += [Case(s, world_size, c, g, "decode") for s in DECODE_SCHEDULES for c in (True, False) for g in GQA_RATIOS]
    return cases


def _generator(case: Case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(case.name.encode()))


def _uneven_indices(length: int, world_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Random sizes (rank 1 empty when N > 1) over a random permutation of the tokens."""
    order = torch.randperm(length, generator=gen)
    holders = max(world_size - 1, 1)  # every rank but rank 1 holds tokens
    cuts = sorted(torch.randint(0, length + 1, (holders - 1,), generator=gen).tolist())
    bounds = [0, *cuts, length]
    pieces = [order[bounds[i] : bounds[i + 1]] for i in range(holders)]
    if world_size > 1:
        pieces.insert(1, order[:0])
    return pieces


@dataclass
class Built:
    shards: list[Shard]
    q_indices: list[torch.Tensor]  # rows of the reference each rank's output must equal
    reference_out: torch.Tensor  # [Tq, Hq, D] fp32
    reference_lse: torch.Tensor  # [Tq, Hq] fp32


def build(case: Case) -> Built:
    gen = _generator(case)
    n, h_q = case.world_size, HEADS_KV * case.gqa
    q = torch.randn(LENGTH, h_q, HEAD_DIM, generator=gen).to(case.dtype)
    k = torch.randn(LENGTH, HEADS_KV, HEAD_DIM, generator=gen).to(case.dtype)
    v = torch.randn(LENGTH, HEADS_KV, HEAD_DIM, generator=gen).to(case.dtype)
    positions = torch.arange(LENGTH) + 5  # positions need not start at 0
    if case.placement == "decode":
        kv_indices = layout_indices(LENGTH, n, "interleaved")
        q_indices = [
            torch.tensor([LENGTH - 1]) if r == case.decode_owner else torch.empty(0, dtype=torch.int64) for r in range(n)
        ]
    else:
        kv_indices = _uneven_indices(LENGTH, n, gen) if case.placement == "uneven" else layout_indices(LENGTH, n, case.placement)
        q_indices = kv_indices
    shards = shard_by_indices(q, k, v, positions, q_indices, kv_indices)
    rows = torch.cat(q_indices)
    ref_out = sdpa_reference(q[rows], k, v, positions[rows], positions, causal=case.causal)
    ref_lse = reference_lse(q[rows], k, positions[rows], positions, causal=case.causal)
    return Built(shards, q_indices, ref_out, ref_lse)


def row_counts(built: Built, rank: int, out: torch.Tensor, lse: torch.Tensor) -> tuple[int, int, int]:
    """(rows this rank owns, rows of out, rows of lse): a schedule that drops or adds rows is wrong
    however small the error on the rows it did return."""
    return len(built.q_indices[rank]), out.shape[0], lse.shape[0]


def errors(built: Built, rank: int, out: torch.Tensor, lse: torch.Tensor) -> tuple[float, float]:
    """Max abs error of one rank's (out, lse) against the reference rows it owns (0 for no rows).

    Asserts first that the rank returned exactly as many rows as it owns: an empty output from the
    rank that owns the query must fail, not score 0."""
    owned, out_rows, lse_rows = row_counts(built, rank, out, lse)
    assert out_rows == lse_rows == owned, f"rank {rank} owns {owned} query rows, returned out {out_rows}, lse {lse_rows}"
    start = sum(len(ix) for ix in built.q_indices[:rank])
    rows = slice(start, start + owned)
    if owned == 0:
        return 0.0, 0.0
    out_err = (out.float() - built.reference_out[rows]).abs().max().item()
    finite = torch.isfinite(built.reference_lse[rows])
    assert torch.equal(finite, torch.isfinite(lse)), "lse is -inf exactly where no key is visible"
    lse_err = (lse[finite] - built.reference_lse[rows][finite]).abs().max().item() if finite.any() else 0.0
    return out_err, lse_err
