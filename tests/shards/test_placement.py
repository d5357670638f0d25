"""Where shards are placed: bundles (CPUs, a GPU when shards run on CUDA), the strategy option, and an
error for a group that cannot be placed that names the reason. The plan is a pure function; the last
tests place real groups on a local Ray."""

from __future__ import annotations

import pytest

from longbow.services.config import EngineConfig, LongbowConfig, ModelSource, load_config
from longbow.services.shards.placement import ShardPlacement, plan_placement, unplaceable_message

CPU, AUTO, CUDA = ModelSource(device="cpu"), ModelSource(device="auto"), ModelSource(device="cuda")


@pytest.mark.parametrize(("model", "cluster_gpus", "gpus"), [
    (CPU, 0, 0.0), (CPU, 8, 0.0),  # shards asked to run on CPUs never take a GPU
    (AUTO, 0, 0.0), (AUTO, 8, 1.0),  # auto: CUDA wherever the cluster has GPUs (not where the driver is)
    (CUDA, 0, 1.0), (CUDA, 8, 1.0),
])
def test_bundles_ask_for_a_gpu_when_shards_run_on_cuda(model, cluster_gpus, gpus):
    placement = plan_placement(EngineConfig(cpus_per_shard=2), model, 3, cluster_gpus)
    expected = {"CPU": 2.0, "GPU": gpus} if gpus else {"CPU": 2.0}
    assert placement.bundles == [expected] * 3 and placement.strategy == "PACK"


def test_gpus_per_shard_overrides_and_strategy_is_checked():
    engine = EngineConfig(gpus_per_shard=0.5, placement_strategy="strict_spread")
    placement = plan_placement(engine, CPU, 2, 0)
    assert placement.bundles == [{"CPU": 1.0, "GPU": 0.5}] * 2 and placement.strategy == "STRICT_SPREAD"
    with pytest.raises(ValueError, match="'SPRED' is not one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"):
        plan_placement(EngineConfig(placement_strategy="SPRED"), CPU, 2, 0)


def test_strategy_from_the_environment(monkeypatch):
    monkeypatch.setenv("LONGBOW_PLACEMENT_STRATEGY", "STRICT_SPREAD")
    monkeypatch.setenv("LONGBOW_GPUS_PER_SHARD", "1")
    engine = load_config().engine
    assert (engine.placement_strategy, engine.gpus_per_shard) == ("STRICT_SPREAD", 1.0)


@pytest.mark.parametrize(("placement", "nodes", "reason"), [
    (ShardPlacement(2, 1.0, 0.0, "STRICT_SPREAD"), [{"CPU": 4.0}], "STRICT_SPREAD needs 2 such nodes"),
    (ShardPlacement(2, 4.0, 0.0, "STRICT_PACK"), [{"CPU": 4.0}, {"CPU": 4.0}], "STRICT_PACK needs one node"),
    (ShardPlacement(4, 1.0, 1.0, "PACK"), [{"CPU": 8.0, "GPU": 2.0}], "add GPU nodes"),
    (ShardPlacement(2, 64.0, 0.0, "PACK"), [{"CPU": 4.0}], "lower --shards or engine.cpus_per_shard"),
])
def test_unplaceable_message_names_the_reason(placement, nodes, reason):
    message = unplaceable_message(placement, nodes)
    assert message.startswith(f"cannot place {placement.num_shards} shards x ") and reason in message
    assert f"({placement.strategy}) on this Ray cluster ({len(nodes)} nodes" in message


@pytest.fixture(scope="module")
def ray_with_gpus():
    """One local node that reports 2 GPUs (Ray takes the count on trust): GPU bundles get placed and the
    shard actors are handed GPU ids, while torch (no CUDA here) keeps the model on the CPU."""
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def _config(tiny_checkpoint, **engine) -> LongbowConfig:
    return LongbowConfig(model=ModelSource(name_or_path=str(tiny_checkpoint), device="auto", dtype="float32"),
                         engine=EngineConfig(token_budget=24, block_size=8, num_blocks=32, shards=2,
                                             collective_timeout_s=20, step_timeout_s=60, **engine))


@pytest.mark.slow
def test_shards_take_gpu_bundles_on_a_cluster_with_gpus(ray_with_gpus, tiny_checkpoint, tiny_model):
    import ray

    from longbow.services.engine.types import SamplingParams
    from longbow.services.replica import build_engine

    engine = build_engine(_config(tiny_checkpoint), tiny_model)
    try:
        table = ray.util.placement_group_table(engine.executor._placement)
        gpu_ids = ray.get([a.__ray_call__.remote(lambda self: ray.get_gpu_ids()) for a in engine.executor.actors])
        [completion] = engine.generate([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=3, min_tokens=3))
    finally:
        engine.shutdown()
    assert [b["GPU"] for b in table["bundles"].values()] == [1.0, 1.0]
    assert sorted(len(ids) for ids in gpu_ids) == [1, 1] and gpu_ids[0] != gpu_ids[1]
    assert len(completion.token_ids) == 3


@pytest.mark.slow
def test_strict_spread_on_one_node_is_a_clear_error(ray_with_gpus, tiny_checkpoint, tiny_model):
    from longbow.services.replica import build_engine
    from longbow.services.shards.group import ShardFailureError

    config = _config(tiny_checkpoint, placement_strategy="STRICT_SPREAD", placement_timeout_s=2)
    with pytest.raises(ShardFailureError, match=r"cannot place 2 shards .*STRICT_SPREAD needs 2 such nodes"):
        build_engine(config, tiny_model)
