"""Every schedule over real processes (gloo on 127.0.0.1), N in {1, 2, 3, 4}: equals single-device
attention within 1e-5 (fp32) and counts exactly the bytes the cost model predicts; single sequences and
packed batches of several (uneven lengths, prefill and decode mixed, GQA 3).

Process start-up dominates on a small machine, so one spawn of 4 processes runs the whole case matrix
on subgroups of 1, 2 and 3 ranks (exercising the `group=` argument) and on the default group of 4;
each case is then its own test.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from longbow.ringattn import SCHEDULES, CommCounter
from longbow.ringattn.costmodel import AttentionShape, predicted_bytes, schedule_steps
from tests.ringattn.cases import (
    FP32_TOL,
    HEAD_DIM,
    HEADS_KV,
    Case,
    PackedCase,
    all_cases,
    all_packed_cases,
    build,
    build_packed,
    errors,
    row_counts,
)
from tests.ringattn.multiprocess import run_processes

WORLD_SIZES = (1, 2, 3, 4)
COST_MODEL_NAME = {"decode_pass_q": "tokenring"}
PACKED_GQA = (3,)  # packed batches over processes: one GQA ratio keeps the 4-process run short


def _all_cases(world_size: int) -> list[Case | PackedCase]:
    return [*all_cases(world_size), *all_packed_cases(world_size, PACKED_GQA)]


def _build(case: Case | PackedCase):
    return build_packed(case) if isinstance(case, PackedCase) else build(case)

# the module fixture (4 processes running every case) counts toward the first test's timeout
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def run_all_cases(rank: int, world_size: int) -> dict[str, tuple[tuple[int, int, int], float, float, dict]]:
    """On one of 4 processes: every case's (row counts, out error, lse error, bytes by step) for its shard."""
    report = {}
    for n in WORLD_SIZES:
        group = dist.new_group(list(range(n))) if n < world_size else None  # every rank must call
        if rank < n:
            report.update(_run_cases(rank, n, group))
    return report


def _run_cases(rank: int, world_size: int, group) -> dict[str, tuple[tuple[int, int, int], float, float, dict]]:
    report = {}
    for case in _all_cases(world_size):
        built = _build(case)
        shard = built.shards[rank]
        counter = CommCounter()
        packed = {}
        if isinstance(case, PackedCase):
            packed = {"q_seq": shard.q_seq, "k_seq": shard.k_seq, **case.length_kwargs(built.shards)}
        out, lse = SCHEDULES[case.schedule][0](
            shard.q, shard.k, shard.v, shard.q_pos, shard.k_pos, causal=case.causal, group=group, counter=counter,
            **packed,
        )
        measured = {step: b for step, b in counter.bytes_by_step().items() if b != (0, 0)}
        rows = row_counts(built, rank, out, lse)
        # wrong row counts are reported per case (asserted in the test), not raised here, where one
        # case's failure would take down the whole 4-process run
        errs = errors(built, rank, out, lse) if rows[0] == rows[1] == rows[2] else (float("inf"), float("inf"))
        report[case.name] = (rows, *errs, measured)
    return report


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    return run_processes(run_all_cases, max(WORLD_SIZES))


@pytest.mark.parametrize("case", [c for n in WORLD_SIZES for c in _all_cases(n)], ids=lambda c: c.name)
def test_schedule_over_processes(case: Case | PackedCase, reports: list[dict]) -> None:
    per_rank = [report[case.name] for report in reports[: case.world_size]]
    for rank, (rows, out_err, lse_err, _) in enumerate(per_rank):
        owned, out_rows, lse_rows = rows
        assert out_rows == lse_rows == owned, f"rank {rank} owns {owned} query rows, returned {out_rows}/{lse_rows}"
        assert out_err <= FP32_TOL and lse_err <= FP32_TOL, (rank, out_err, lse_err)
    shards = _build(case).shards
    shape = AttentionShape(HEADS_KV * case.gqa, HEADS_KV, HEAD_DIM, 4, case.causal)
    packed = isinstance(case, PackedCase)
    steps = schedule_steps(
        COST_MODEL_NAME.get(case.schedule, case.schedule), shape,
        [s.q_pos for s in shards], [s.k_pos for s in shards],
        [s.q_seq for s in shards] if packed else None, [s.k_seq for s in shards] if packed else None,
        packed and case.sizes_known,
    )
    assert [measured for _, _, _, measured in per_rank] == predicted_bytes(steps)
