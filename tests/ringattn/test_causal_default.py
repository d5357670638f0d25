"""`causal=True` is the default of every schedule's public function and of the rank functions behind them:
called without the argument, each must equal single-device causal attention. The other tests always pass
`causal` explicitly, so a default flipped to False passed them all (found by scripts/mutation.sh)."""

from __future__ import annotations

import pytest

from longbow.ringattn import SCHEDULES
from longbow.ringattn.comm import run_emulated
from longbow.ringattn.decode import decode_allreduce_rank
from longbow.ringattn.tokenring import tokenring_rank
from tests.ringattn.cases import FP32_TOL, Case, build, errors


def _assert_causal(built, results) -> None:
    for rank, (out, lse) in enumerate(results):
        out_err, lse_err = errors(built, rank, out, lse)
        assert out_err <= FP32_TOL and lse_err <= FP32_TOL, (rank, out_err, lse_err)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_emulated_schedule_is_causal_by_default(schedule: str) -> None:
    # every rank holds queries (zigzag), so causal and non-causal attention differ on every rank
    built = build(Case(schedule, 3, True, 3, "zigzag"))
    _assert_causal(built, SCHEDULES[schedule][1](built.shards))


@pytest.mark.parametrize("rank_function", [tokenring_rank, decode_allreduce_rank], ids=lambda f: f.__name__)
def test_rank_function_is_causal_by_default(rank_function) -> None:
    built = build(Case("tokenring", 3, True, 3, "zigzag"))
    results = run_emulated(lambda t, s: rank_function(t, s.q, s.k, s.v, s.q_pos, s.k_pos), built.shards, None)
    _assert_causal(built, results)


def test_distributed_function_is_causal_by_default(tmp_path) -> None:
    """The process-group entry points (SCHEDULES[name][0]) too, on a one-rank gloo group in this process:
    one rank holds the whole sequence, so a non-causal default would differ on every row but the last."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        for schedule, (distributed, _) in sorted(SCHEDULES.items()):
            built = build(Case(schedule, 1, True, 3, "zigzag"))
            shard = built.shards[0]
            _assert_causal(built, [distributed(shard.q, shard.k, shard.v, shard.q_pos, shard.k_pos)])
    finally:
        dist.destroy_process_group()
