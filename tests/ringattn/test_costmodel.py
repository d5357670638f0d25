"""The cost model's claims, from numbers: which schedule moves fewer bytes, hides more, and is chosen."""

from __future__ import annotations

import torch

from longbow.ringattn.costmodel import (
    A10_PCIE_MESH,
    A10_PCIE_SWITCH,
    H100_NVSWITCH,
    AttentionShape,
    Hardware,
    choose_schedule,
    decode_positions,
    predict,
    prefill_positions,
    schedule_steps,
    step_times,
)

SMOLLM2 = AttentionShape(heads_q=9, heads_kv=3, head_dim=64, dtype_bytes=2)
MHA = AttentionShape(heads_q=32, heads_kv=32, head_dim=128, dtype_bytes=2)
SLOW_LINK = Hardware("comm-bound", flops_per_s=1e15, link_bytes_per_s=1e9, latency_s=1e-5)


def _predict(schedule: str, shape: AttentionShape, q_pos, k_pos, hw: Hardware):
    return predict(schedule, schedule_steps(schedule, shape, q_pos, k_pos), shape, hw)


def test_gqa_prefill_pass_kv_moves_fewer_bytes_and_is_chosen() -> None:
    pos = prefill_positions(16384, 4)
    tokenring = _predict("tokenring", SMOLLM2, pos, pos, SLOW_LINK)
    ring = _predict("ring", SMOLLM2, pos, pos, SLOW_LINK)
    assert ring.bytes_per_rank < 0.5 * tokenring.bytes_per_rank  # K+V of 3 heads vs Q+out of 9
    assert choose_schedule(SMOLLM2, pos, pos, SLOW_LINK)[0] == "ring"


def test_decode_pass_q_moves_orders_of_magnitude_less_and_is_chosen() -> None:
    q_pos, k_pos = decode_positions(131072, 8)
    pass_q = _predict("tokenring", SMOLLM2, q_pos, k_pos, H100_NVSWITCH)
    pass_kv = _predict("ring", SMOLLM2, q_pos, k_pos, H100_NVSWITCH)
    assert pass_kv.bytes_per_rank > 1000 * pass_q.bytes_per_rank
    best, _ = choose_schedule(SMOLLM2, q_pos, k_pos, H100_NVSWITCH, ("tokenring", "ring", "decode_allreduce"))
    assert best != "ring"


def test_tokenring_beats_ring_exposed_communication_on_a_mesh_for_mha() -> None:
    """The TokenRing paper's setting: 4x A10, 32 heads x 128, 24k tokens, causal (comm-bound)."""
    pos = prefill_positions(24576, 4)
    tokenring = _predict("tokenring", MHA, pos, pos, A10_PCIE_MESH)
    ring = _predict("ring", MHA, pos, pos, A10_PCIE_MESH)
    assert tokenring.exposed_s < 0.5 * ring.exposed_s


def test_ring_step_consistency_with_the_measurement_the_link_speed_came_from() -> None:
    """A CONSISTENCY CHECK, NOT A VALIDATION: A10_PCIE_MESH's 13.2 GB/s was derived from the TokenRing paper's
    ~7.6 ms ring step (ringattn/costmodel.py says so), so this can only fail if the model's ring byte count
    drifts from the 100.7 MB per step that derivation assumed (a 6k-token bf16 K+V block of 32x128 heads).
    It says nothing about whether the model predicts real hardware; the next test does that, on one point."""
    pos = prefill_positions(24576, 4)
    ring = _predict("ring", MHA, pos, pos, A10_PCIE_MESH)
    ring_step = ring.comm_s - 3 * A10_PCIE_MESH.latency_s
    assert 7.0e-3 < ring_step / 3 < 8.2e-3


def test_tokenring_step_matches_a_measurement_the_model_was_not_fitted_on() -> None:
    """Held out: the paper's TokenRing per-step communication (~3.5-4.6 ms, same testbed) played no part in
    choosing any constant; the link speed was fitted on the ring step only. A TokenRing step moves other
    bytes (a query block one hop, a result block and its log-sum-exp back), so this checks the model's byte
    accounting and its per-link timing against an independent number. One point, one testbed: weak
    evidence, stated as such. bench/ringattn.py checks the byte counts exactly against measured traffic over
    gloo, and its timings (docs/benchmarks.md: within 30% in 16 of 40 rows) are the model's real test."""
    pos = prefill_positions(24576, 4)
    phase_2 = schedule_steps("tokenring", MHA, pos, pos)[3]  # a query hop and a result return
    assert phase_2.label == "step 2"
    assert 3.5e-3 < step_times(phase_2, MHA, A10_PCIE_MESH)[1] < 4.6e-3


def test_on_a_switch_tokenring_and_ring_move_the_same_bytes_per_port_for_mha() -> None:
    pos = prefill_positions(24576, 4)
    tokenring = _predict("tokenring", MHA, pos, pos, A10_PCIE_SWITCH)
    ring = _predict("ring", MHA, pos, pos, A10_PCIE_SWITCH)
    assert abs(tokenring.comm_s / ring.comm_s - 1) < 0.03


def test_zigzag_balances_causal_work_and_contiguous_does_not() -> None:
    shape = AttentionShape(8, 8, 64)
    def spread(layout: str) -> float:
        pos = prefill_positions(8192, 4, layout)
        per_rank = [sum(s.ranks[r].pairs for s in schedule_steps("ring", shape, pos, pos)) for r in range(4)]
        return max(per_rank) / min(per_rank)
    assert spread("zigzag") < 1.1
    assert spread("contiguous") > 2.0


def test_ulysses_not_offered_when_kv_heads_do_not_divide() -> None:
    pos = prefill_positions(4096, 4)
    _, predictions = choose_schedule(SMOLLM2, pos, pos, SLOW_LINK)
    assert "ulysses" not in predictions and {"tokenring", "ring"} <= set(predictions)
    _, predictions = choose_schedule(SMOLLM2, prefill_positions(4096, 3), prefill_positions(4096, 3), SLOW_LINK)
    assert "ulysses" in predictions
