"""Every schedule, emulated ranks in one process: equals single-device attention, counts the bytes
the cost model predicts, and keeps its error bounded as N grows; the same for packed batches of
several sequences in one call."""

from __future__ import annotations

import dataclasses

import pytest
import torch

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
)

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


PACKED_CASES = [case for n in (1, 2, 3, 4) for case in all_packed_cases(n)]


@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: c.name)
def test_packed_batch_equals_single_device_per_sequence(case: PackedCase) -> None:
    """Several sequences of uneven lengths (prefill, chunk and decode mixed) in one call: every query
    equals one-device attention over its own sequence only, and the bytes are the cost model's."""
    built = build_packed(case)
    counters = [CommCounter() for _ in range(case.world_size)]
    results = SCHEDULES[case.schedule][1](built.shards, causal=case.causal, counters=counters,
                                          **case.length_kwargs(built.shards))
    for rank, (out, lse) in enumerate(results):
        out_err, lse_err = errors(built, rank, out, lse)
        assert out_err <= FP32_TOL and lse_err <= FP32_TOL, (rank, out_err, lse_err)
    shape = AttentionShape(HEADS_KV * case.gqa, HEADS_KV, HEAD_DIM, 4, case.causal)
    shards = built.shards
    steps = schedule_steps(
        COST_MODEL_NAME.get(case.schedule, case.schedule), shape, [s.q_pos for s in shards],
        [s.k_pos for s in shards], [s.q_seq for s in shards], [s.k_seq for s in shards], case.sizes_known,
    )
    measured = [{step: b for step, b in c.bytes_by_step().items() if b != (0, 0)} for c in counters]
    assert measured == predicted_bytes(steps)
    assert all(("setup" in m) != case.sizes_known for m in measured if case.world_size > 1)


def test_packed_batch_makes_the_messages_of_one_sequence() -> None:
    """One exchange per layer whatever the batch: a packed call of 5 sequences posts exactly the
    messages (step by step, peer by peer) of one single-sequence call on the same ranks."""
    def messages(shards, **lengths) -> list[list[tuple[str, str, int]]]:
        counters = [CommCounter() for _ in shards]
        SCHEDULES["tokenring"][1](shards, causal=True, counters=counters, **lengths)
        return [[(m.step, m.kind, m.peer) for m in c.messages] for c in counters]

    case = PackedCase("tokenring", 3, True, 3, "mixed", True)
    packed = build_packed(case).shards
    assert all(len(s.q_pos) and len(s.k_pos) for s in packed)  # every rank sends and receives
    single = build(Case("tokenring", 3, True, 3, "zigzag")).shards
    assert messages(packed, **case.length_kwargs(packed)) == messages(single, q_lens=[len(s.q_pos) for s in single])


def test_sequence_ids_are_required_on_both_sides() -> None:
    built = build_packed(PackedCase("ring", 2, True, 1, "mixed", False))
    shards = [dataclasses.replace(s, k_seq=None) for s in built.shards]
    with pytest.raises(ValueError, match="sequence ids"):
        SCHEDULES["ring"][1](shards)
