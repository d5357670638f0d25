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


# ---- packed batches: several sequences of uneven lengths in one call ----------------------------------
# (KV length, queries) per sequence: queries are the last `queries` tokens, so a full prefill, a decode
# (1) and a chunk of a longer prefill are mixed in one batch; a sequence may have no token on a rank.
PACKED_BATCHES = {
    "mixed": ((9, 9), (14, 1), (1, 1), (17, 5), (6, 1)),
    "decode": ((11, 1), (3, 1), (16, 1), (7, 1)),
}
PACKED_SCHEDULES = ("tokenring", "ring", "ulysses", "decode_pass_q", "decode_allreduce")
LENGTH_ARGUMENTS = {  # which lengths each schedule takes when the caller knows every rank's
    "tokenring": ("q_lens",), "decode_pass_q": ("q_lens",), "decode_allreduce": ("q_lens",),
    "ring": ("kv_lens",), "ulysses": ("q_lens", "kv_lens"),
}


@dataclass(frozen=True)
class PackedCase:
    schedule: str
    world_size: int
    causal: bool
    gqa: int
    batch: str  # a PACKED_BATCHES name
    sizes_known: bool  # every rank is told every rank's lengths (no setup all-gather)

    @property
    def name(self) -> str:
        mask = "causal" if self.causal else "full"
        sizes = "known" if self.sizes_known else "gathered"
        return f"packed-{self.schedule}-n{self.world_size}-{mask}-gqa{self.gqa}-{self.batch}-{sizes}"

    def length_kwargs(self, shards: list[Shard]) -> dict[str, list[int]]:
        if not self.sizes_known:
            return {}
        lengths = {"q_lens": [len(s.q_pos) for s in shards], "kv_lens": [len(s.k_pos) for s in shards]}
        return {key: lengths[key] for key in LENGTH_ARGUMENTS[self.schedule]}


def all_packed_cases(world_size: int, gqa_ratios: tuple[int, ...] = GQA_RATIOS) -> list[PackedCase]:
    return [
        PackedCase(s, world_size, c, g, b, known)
        for s in PACKED_SCHEDULES for c in (True, False) for g in gqa_ratios for b in PACKED_BATCHES
        for known in ((c,) if s != "ulysses" else (True, False))
    ]


def build_packed(case: PackedCase) -> Built:
    """Each token of each sequence sits on a random rank (its query, if it is one, on the same rank);
    rank r's rows are its tokens sequence by sequence, in position order (as a shard packs a step)."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    n, h_q = case.world_size, HEADS_KV * case.gqa
    sequences = []
    for seq, (length, queries) in enumerate(PACKED_BATCHES[case.batch]):
        q = torch.randn(length, h_q, HEAD_DIM, generator=gen)
        k = torch.randn(length, HEADS_KV, HEAD_DIM, generator=gen)
        v = torch.randn(length, HEADS_KV, HEAD_DIM, generator=gen)
        positions = torch.arange(length) + 3 * seq  # sequences need not start at 0
        rank_of = torch.randint(0, n, (length,), generator=gen)
        sequences.append((q, k, v, positions, rank_of, length - queries))
    shards, references = [], []
    for r in range(n):
        parts: dict[str, list[torch.Tensor]] = {key: [] for key in ("q", "k", "v", "qp", "kp", "qs", "ks")}
        for seq, (q, k, v, positions, rank_of, first_query) in enumerate(sequences):
            kv = torch.nonzero(rank_of == r).flatten()
            rows = kv[kv >= first_query]
            parts["q"].append(q[rows]), parts["qp"].append(positions[rows])
            parts["qs"].append(torch.full((len(rows),), seq, dtype=torch.int64))
            parts["k"].append(k[kv]), parts["v"].append(v[kv]), parts["kp"].append(positions[kv])
            parts["ks"].append(torch.full((len(kv),), seq, dtype=torch.int64))
            if len(rows):
                references.append((sdpa_reference(q[rows], k, v, positions[rows], positions, causal=case.causal),
                                   reference_lse(q[rows], k, positions[rows], positions, causal=case.causal)))
        cat = {key: torch.cat(value) for key, value in parts.items()}
        shards.append(Shard(cat["q"], cat["k"], cat["v"], cat["qp"], cat["kp"], cat["qs"], cat["ks"]))
    q_indices, start = [], 0
    for shard in shards:
        q_indices.append(torch.arange(start, start + len(shard.q_pos)))
        start += len(shard.q_pos)
    reference_out = torch.cat([out for out, _ in references])
    reference_lses = torch.cat([lse for _, lse in references])
    return Built(shards, q_indices, reference_out, reference_lses)
