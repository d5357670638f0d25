"""Every schedule, emulated ranks in one process: equals single-device attention, counts the bytes
the cost model predicts, and keeps its error bounded as N grows."""

from __future__ import annotations

import pytest
import torch

from longbow.ringattn import SCHEDULES, CommCounter
from longbow.ringattn.costmodel import AttentionShape, predicted_bytes, schedule_steps
from tests.ringattn.cases import FP32_TOL, HEAD_DIM, HEADS_KV, Case, all_cases, build, errors

CASES = [case for n in (1, 2, 3, 4) for case in all_cases(n)]
COST_MODEL_NAME = {"decode_pass_q": "tokenring"}


def _run(case: Case) -> tuple[list, list[CommCounter]]:
    built = build(case)
    counters = [CommCounter() for _ in range(case.world_size)]
    results = SCHEDULES[case.schedule][1](built.shards, causal=case.causal, counters=counters)
    return built, results, counters


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_schedule_equals_single_device(case: Case) -> None:
    built, results, counters = _run(case)
    for rank, (out, lse) in enumerate(results):
        out_err, lse_err = errors(built, rank, out, lse)
        assert out_err <= FP32_TOL and lse_err <= FP32_TOL, (rank, out_err, lse_err)
    # the byte counters equal the cost model's prediction, rank by rank and step by step
    shape = AttentionShape(HEADS_KV * case.gqa, HEADS_KV, HEAD_DIM, 4, case.causal)
    steps = schedule_steps(
        COST_MODEL_NAME.get(case.schedule, case.schedule), shape,
        [s.q_pos for s in built.shards], [s.k_pos for s in built.shards],
    )
    measured = [{step: b for step, b in c.bytes_by_step().items() if b != (0, 0)} for c in counters]
    assert measured == predicted_bytes(steps)


@pytest.mark.parametrize("schedule", ["tokenring", "ring", "ulysses", "decode_allreduce"])
def test_bf16_within_1e_2(schedule: str) -> None:
    """bf16 inputs (partials travel in bf16 for TokenRing): within 1e-2 of fp32 attention of the
    same bf16-rounded inputs."""
    placement = "decode" if schedule.startswith("decode") else "zigzag"
    case = Case(schedule, 4, True, 3, placement, torch.bfloat16)
    built, results, _ = _run(case)
    for rank, (out, lse) in enumerate(results):
        out_err, lse_err = errors(built, rank, out, lse)
        assert out_err <= 1e-2 and lse_err <= 1e-2, (rank, out_err, lse_err)


def _max_error(schedule: str, world_size: int) -> float:
    built, results, _ = _run(Case(schedule, world_size, True, 1, "zigzag"))
    return max(errors(built, rank, out, lse)[0] for rank, (out, lse) in enumerate(results))


@pytest.mark.parametrize("schedule", ["tokenring", "ring"])
def test_error_does_not_grow_with_world_size(schedule: str) -> None:
    """Stated bound: each of the N-1 merges adds at most a few fp32 ulps of |out| (<= ~4 here), so
    error(N) <= error(1) + 4 * N * 2**-23 * 4. Measured growth is far below it."""
    base = _max_error(schedule, 1)
    for world_size in (2, 3, 4, 6, 8):
        assert _max_error(schedule, world_size) <= base + 4 * world_size * 2**-23 * 4
