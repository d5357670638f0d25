"""Cost model: bytes, FLOPs and predicted time per step for every schedule, and the choice among them.

It replays each schedule's step structure on paper. Bytes are exact: tests assert they equal what
comm.CommCounter records when the schedule runs. FLOPs are 4 * Hq * D per computed (query, key)
pair, with pairs counted by local.computed_pairs (the same causal tiling the kernel uses). A packed
batch (several sequences in one call, `Batch.q_seq`) is costed the same way: its token keys add no bytes
over positions, and pairs are counted per sequence, as packed_attention computes them.

Time of a point-to-point step = max over ranks of max(compute, latency + transfer): communication is
posted before compute and waited after, so a step costs whichever is longer. Collectives (size and
position all-gathers, Ulysses all-to-alls, decode allreduces) are not overlapped and add up.
Transfer time depends on the topology:
- "switch": each rank has one full-duplex port (NVSwitch, a PCIe switch, loopback TCP); what a rank
  sends in a step shares its outgoing bandwidth, what it receives shares the incoming one.
- "mesh": every pair of ranks has its own full-duplex link (the TokenRing paper's assumption); only
  the bytes between one pair share a link.
Under "switch", TokenRing's query hop and result return share one port and cost about what ring's KV
hop costs for MHA; under "mesh" they use two links and take about half. Under GQA ring moves
Hkv-headed K+V against TokenRing's Hq-headed Q+out, so ring moves fewer bytes; for decode a query is
one token while KV is the whole cache, so pass-Q moves orders of magnitude less.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longbow.ringattn.comm import ring_allreduce_bytes
from longbow.ringattn.layout import layout_indices
from longbow.ringattn.local import computed_pairs, computed_pairs_packed

INT64 = 8
FP32 = 4
SCHEDULES = ("tokenring", "ring", "ulysses", "decode_allreduce")


@dataclass(frozen=True)
class AttentionShape:
    """What one attention call looks like, apart from token counts."""

    heads_q: int
    heads_kv: int
    head_dim: int
    dtype_bytes: int = 4
    causal: bool = True


@dataclass(frozen=True)
class Hardware:
    """Per-rank compute rate and interconnect. Rates are achieved, not peak."""

    name: str
    flops_per_s: float
    link_bytes_per_s: float  # per direction, per port ("switch") or per pair link ("mesh")
    latency_s: float
    topology: str = "switch"


@dataclass
class RankStep:
    """One rank's share of one step: bytes per peer each way, and (query, key) pairs computed."""

    sends: dict[int, int] = field(default_factory=dict)
    recvs: dict[int, int] = field(default_factory=dict)
    pairs: int = 0
    heads_q: int = 0  # heads those pairs are computed for

    def add(self, peer: int, sent: int, received: int) -> None:
        if sent:
            self.sends[peer] = self.sends.get(peer, 0) + sent
        if received:
            self.recvs[peer] = self.recvs.get(peer, 0) + received


@dataclass
class Step:
    """One step of a schedule on every rank. collective: None for overlapped point-to-point steps,
    else the collective's name ("all_gather", "all_to_all", "all_reduce", "compute")."""

    label: str
    ranks: list[RankStep]
    collective: str | None = None


def _q_unit(shape: AttentionShape, keyed: bool) -> int:
    """Bytes per query token on a hop: Q in the input dtype, plus its token key (position, and sequence
    id when packed) when a mask reads it."""
    return shape.heads_q * shape.head_dim * shape.dtype_bytes + (INT64 if keyed else 0)


def _result_unit(shape: AttentionShape) -> int:
    """Bytes per query token of a returned partial: out in the input dtype, lse in fp32."""
    return shape.heads_q * shape.head_dim * shape.dtype_bytes + shape.heads_q * FP32


def _kv_unit(shape: AttentionShape, keyed: bool) -> int:
    """Bytes per KV token on a hop: K and V in the input dtype, plus its token key when a mask reads it."""
    return 2 * shape.heads_kv * shape.head_dim * shape.dtype_bytes + (INT64 if keyed else 0)


def _gather_step(label: str, n: int, nbytes: int) -> Step:
    return Step(label, [RankStep({-1: (n - 1) * nbytes}, {-1: (n - 1) * nbytes}) for _ in range(n)], "all_gather")


@dataclass(frozen=True)
class Batch:
    """Where the tokens of one call sit: per rank, query and KV positions and, for a packed batch of
    several sequences, their sequence ids (None: one sequence). sizes_known: every rank was given every
    rank's lengths, so no setup all-gather runs."""

    q_pos: list[torch.Tensor]
    k_pos: list[torch.Tensor]
    q_seq: list[torch.Tensor] | None = None
    k_seq: list[torch.Tensor] | None = None
    sizes_known: bool = False

    @property
    def packed(self) -> bool:
        return self.q_seq is not None

    def pairs(self, shape: AttentionShape, q_rank: int, k_rank: int, rows: slice = slice(None),
              heads_q: int | None = None) -> int:
        """Pairs computed for rank q_rank's queries (those rows of them) against rank k_rank's KV."""
        q_seq = self.q_seq[q_rank][rows] if self.packed else None
        k_seq = self.k_seq[k_rank] if self.packed else None
        return computed_pairs_packed(self.q_pos[q_rank][rows], self.k_pos[k_rank], shape.causal,
                                     heads_q or shape.heads_q, q_seq, k_seq)


def _setup(batch: Batch, n: int, nbytes: int) -> list[Step]:
    return [] if batch.sizes_known else [_gather_step("setup", n, nbytes)]


def tokenring_steps(shape: AttentionShape, batch: Batch) -> list[Step]:
    n = len(batch.q_pos)
    q_lens = [len(p) for p in batch.q_pos]
    q_unit = _q_unit(shape, shape.causal or batch.packed)
    steps = _setup(batch, n, INT64)
    for phase in range(n + 1):
        ranks = []
        for r in range(n):
            rank = RankStep(heads_q=shape.heads_q)
            if phase <= n - 2:
                rank.add((r - 1) % n, q_lens[(r + phase) % n] * q_unit, 0)
                rank.add((r + 1) % n, 0, q_lens[(r + phase + 1) % n] * q_unit)
            if 2 <= phase <= n:
                rank.add((r + phase - 1) % n, q_lens[(r + phase - 1) % n] * _result_unit(shape), 0)
                rank.add((r - phase + 1) % n, 0, q_lens[r] * _result_unit(shape))
            half = q_lens[r] // 2
            if phase == 0:
                rank.pairs = batch.pairs(shape, r, r, slice(0, half))
            elif phase == n:
                rank.pairs = batch.pairs(shape, r, r, slice(half, None))
            else:
                rank.pairs = batch.pairs(shape, (r + phase) % n, r)
            ranks.append(rank)
        steps.append(Step(f"step {phase}", ranks))
    return steps


def ring_steps(shape: AttentionShape, batch: Batch) -> list[Step]:
    n = len(batch.q_pos)
    kv_lens = [len(p) for p in batch.k_pos]
    kv_unit = _kv_unit(shape, shape.causal or batch.packed)
    steps = _setup(batch, n, INT64)
    for step in range(n):
        ranks = []
        for r in range(n):
            rank = RankStep(heads_q=shape.heads_q, pairs=batch.pairs(shape, r, (r - step) % n))
            if step <= n - 2:
                rank.add((r + 1) % n, kv_lens[(r - step) % n] * kv_unit, 0)
                rank.add((r - 1) % n, 0, kv_lens[(r - step - 1) % n] * kv_unit)
            ranks.append(rank)
        steps.append(Step(f"step {step}", ranks))
    return steps


def ulysses_steps(shape: AttentionShape, batch: Batch) -> list[Step]:
    n = len(batch.q_pos)
    q_pad, k_pad = max(len(p) for p in batch.q_pos), max(len(p) for p in batch.k_pos)
    steps = _setup(batch, n, 2 * INT64)
    if shape.causal or batch.packed:
        steps.append(_gather_step("positions", n, (q_pad + k_pad) * INT64))
    b, d = shape.dtype_bytes, shape.head_dim
    per_tensor = {"q": q_pad * shape.heads_q * d * b, "k": k_pad * shape.heads_kv * d * b}
    per_tensor["v"] = per_tensor["k"]
    for label in ("q", "k", "v"):
        sent = (n - 1) * per_tensor[label] // n
        steps.append(Step(label, [RankStep({-1: sent}, {-1: sent}) for _ in range(n)], "all_to_all"))
    heads = shape.heads_q // n
    everything = _concatenated(batch)
    pairs = everything.pairs(shape, 0, 0, heads_q=heads)
    steps.append(Step("attention", [RankStep(pairs=pairs, heads_q=heads) for _ in range(n)], "compute"))
    sent = (n - 1) * q_pad * shape.heads_q * (d + 1) * FP32 // n
    steps.append(Step("out", [RankStep({-1: sent}, {-1: sent}) for _ in range(n)], "all_to_all"))
    return steps


def _concatenated(batch: Batch, kv_per_rank: bool = False) -> Batch:
    """Every rank's queries as one block (and every rank's KV as one, unless kv_per_rank)."""
    q_seq = [torch.cat(batch.q_seq)] if batch.packed else None
    if kv_per_rank:
        return Batch([torch.cat(batch.q_pos)] * len(batch.k_pos), batch.k_pos,
                     q_seq * len(batch.k_pos) if q_seq else None, batch.k_seq)
    k_seq = [torch.cat(batch.k_seq)] if batch.packed else None
    return Batch([torch.cat(batch.q_pos)], [torch.cat(batch.k_pos)], q_seq, k_seq)


def decode_allreduce_steps(shape: AttentionShape, batch: Batch) -> list[Step]:
    n = len(batch.q_pos)
    q_all = sum(len(p) for p in batch.q_pos)
    pad = max(len(p) for p in batch.q_pos)
    steps = _setup(batch, n, INT64)
    steps.append(_gather_step("gather q", n, pad * (shape.heads_q * shape.head_dim * shape.dtype_bytes + INT64)))
    everything = _concatenated(batch, kv_per_rank=True)
    ranks = [RankStep(pairs=everything.pairs(shape, r, r), heads_q=shape.heads_q) for r in range(n)]
    steps.append(Step("attention", ranks, "compute"))
    for label, nbytes in (("max lse", q_all * shape.heads_q * FP32), ("sum partials", q_all * shape.heads_q * (shape.head_dim + 1) * FP32)):
        sent = ring_allreduce_bytes(nbytes, n)
        steps.append(Step(label, [RankStep({-1: sent}, {-1: sent}) for _ in range(n)], "all_reduce"))
    return steps


_STEP_BUILDERS = {
    "tokenring": tokenring_steps,
    "ring": ring_steps,
    "ulysses": ulysses_steps,
    "decode_allreduce": decode_allreduce_steps,
}


def schedule_steps(
    schedule: str, shape: AttentionShape, q_pos: list[torch.Tensor], k_pos: list[torch.Tensor],
    q_seq: list[torch.Tensor] | None = None, k_seq: list[torch.Tensor] | None = None,
    sizes_known: bool = False,
) -> list[Step]:
    """The steps `schedule` runs when rank r holds queries at q_pos[r] and KV at k_pos[r] (and, for a
    packed batch, sequence ids q_seq[r] and k_seq[r]); sizes_known: the callers passed every rank's
    lengths, so no setup all-gather."""
    return _STEP_BUILDERS[schedule](shape, Batch(q_pos, k_pos, q_seq, k_seq, sizes_known))


def predicted_bytes(steps: list[Step]) -> list[dict[str, tuple[int, int]]]:
    """Per rank: step label -> (bytes sent, bytes received), steps without traffic left out.
    Same form as CommCounter.bytes_by_step() with its zero entries dropped."""
    per_rank = []
    for r in range(len(steps[0].ranks)):
        table = {}
        for step in steps:
            sent, received = sum(step.ranks[r].sends.values()), sum(step.ranks[r].recvs.values())
            if sent or received:
                table[step.label] = (sent, received)
        per_rank.append(table)
    return per_rank


@dataclass
class Prediction:
    """Predicted seconds for one forward: total, compute alone, communication alone, and exposed
    communication (what compute did not hide)."""

    schedule: str
    total_s: float
    compute_s: float
    comm_s: float
    exposed_s: float
    bytes_per_rank: int  # max over ranks of bytes sent
    flops_per_rank: float  # max over ranks

    @property
    def hidden_fraction(self) -> float:
        return 1.0 - self.exposed_s / self.comm_s if self.comm_s > 0 else 1.0


def _transfer_s(rank: RankStep, hw: Hardware) -> float:
    if hw.topology == "mesh":
        peers = set(rank.sends) | set(rank.recvs)
        largest = max((max(rank.sends.get(p, 0), rank.recvs.get(p, 0)) for p in peers), default=0)
    else:
        largest = max(sum(rank.sends.values()), sum(rank.recvs.values()))
    return largest / hw.link_bytes_per_s


_COLLECTIVE_ROUNDS = {"all_gather": lambda n: n - 1, "all_reduce": lambda n: 2 * (n - 1), "all_to_all": lambda n: 1}


def step_times(step: Step, shape: AttentionShape, hw: Hardware) -> tuple[float, float]:
    """(compute seconds, communication seconds) of one step, slowest rank each."""
    n = len(step.ranks)
    compute = max(4.0 * r.heads_q * shape.head_dim * r.pairs / hw.flops_per_s for r in step.ranks)
    has_traffic = any(r.sends or r.recvs for r in step.ranks)
    if not has_traffic or n == 1:
        return compute, 0.0
    if step.collective in (None, "compute"):
        return compute, hw.latency_s + max(_transfer_s(r, hw) for r in step.ranks)
    rounds = _COLLECTIVE_ROUNDS[step.collective](n)
    per_rank = max(sum(r.sends.values()) for r in step.ranks)
    if step.collective == "all_to_all" and hw.topology == "mesh":
        per_rank /= n - 1  # every pair has its own link
    return compute, rounds * hw.latency_s + per_rank / hw.link_bytes_per_s


def predict(schedule: str, steps: list[Step], shape: AttentionShape, hw: Hardware) -> Prediction:
    """Predicted time of one forward of `steps` on `hw`."""
    total = compute = comm = exposed = 0.0
    for step in steps:
        step_compute, step_comm = step_times(step, shape, hw)
        overlapped = step.collective is None
        step_total = max(step_compute, step_comm) if overlapped else step_compute + step_comm
        total += step_total
        compute += step_compute
        comm += step_comm
        exposed += step_total - step_compute
    n = len(steps[0].ranks)
    sent = max(sum(sum(s.ranks[r].sends.values()) for s in steps) for r in range(n))
    flops = max(sum(4.0 * s.ranks[r].heads_q * shape.head_dim * s.ranks[r].pairs for s in steps) for r in range(n))
    return Prediction(schedule, total, compute, comm, exposed, sent, flops)


def predict_single_device(shape: AttentionShape, q_pos: torch.Tensor, k_pos: torch.Tensor, hw: Hardware) -> float:
    """Seconds for one device to compute the whole attention."""
    return 4.0 * shape.heads_q * shape.head_dim * computed_pairs(q_pos, k_pos, shape.causal, shape.heads_q) / hw.flops_per_s


def prefill_positions(length: int, world_size: int, layout: str = "zigzag") -> list[torch.Tensor]:
    """Per-rank positions of a self-attention prefill of `length` tokens."""
    return layout_indices(length, world_size, layout)


def decode_positions(
    kv_length: int, world_size: int, owner: int = 0, layout: str = "contiguous"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(query positions, KV positions) per rank for one new token at position kv_length on `owner`."""
    q_pos = [torch.tensor([kv_length]) if r == owner else torch.empty(0, dtype=torch.int64) for r in range(world_size)]
    return q_pos, layout_indices(kv_length, world_size, layout)


def applicable(schedule: str, shape: AttentionShape, world_size: int) -> bool:
    return schedule != "ulysses" or shape.heads_kv % world_size == 0


def choose_schedule(
    shape: AttentionShape,
    q_pos: list[torch.Tensor],
    k_pos: list[torch.Tensor],
    hw: Hardware,
    candidates: tuple[str, ...] = ("tokenring", "ring", "ulysses"),
    q_seq: list[torch.Tensor] | None = None,
    k_seq: list[torch.Tensor] | None = None,
    sizes_known: bool = False,
) -> tuple[str, dict[str, Prediction]]:
    """The schedule with the least predicted time, and every candidate's prediction."""
    n = len(q_pos)
    predictions = {
        name: predict(name, schedule_steps(name, shape, q_pos, k_pos, q_seq, k_seq, sizes_known), shape, hw)
        for name in candidates
        if applicable(name, shape, n)
    }
    # NOTE: schedules within 1% of the fastest count as tied (all hide their communication); among
    # those the one moving fewest bytes wins, leaving the links to whatever else runs.
    fastest = min(p.total_s for p in predictions.values())
    tied = [p for p in predictions.values() if p.total_s <= fastest * 1.01]
    return min(tied, key=lambda p: p.bytes_per_rank).schedule, predictions


# Hardware for projections. Every number is an assumption, stated where it comes from.
# 4x A10 over PCIe, the TokenRing paper's testbed: 13.2 GB/s per direction is what the paper's ring
# step implies (a 6k-token bf16 K+V block of 32x128 heads, 100.7 MB, in ~7.6 ms); A10 peaks at 125 dense
# bf16 TFLOPS and a flash-attention forward is assumed to reach half. The paper assumes a fully connected
# mesh; "switch" is the pessimistic reading where all of a GPU's traffic shares one PCIe port.
A10_PCIE_MESH = Hardware("4x A10 PCIe (mesh)", 62e12, 13.2e9, 10e-6, "mesh")
A10_PCIE_SWITCH = Hardware("4x A10 PCIe (switch)", 62e12, 13.2e9, 10e-6, "switch")
# 8x H100 SXM behind NVSwitch: NVLink 4 is 450 GB/s per direction per GPU, NCCL point-to-point reaches
# ~370 GB/s; flash-attention 2 forward reaches ~350 bf16 TFLOPS (of 989 dense peak).
H100_NVSWITCH = Hardware("8x H100 NVSwitch", 350e12, 370e9, 10e-6, "switch")
