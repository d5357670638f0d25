"""Shards on different Ray nodes: a 2-node cluster on this machine (ray.cluster_utils.Cluster, two
raylets), the group placed STRICT_SPREAD (one shard per node), a real gateway in front. Greedy output
equals one process; a node lost mid-generation fails the stream with UNAVAILABLE, and once the node is
replaced (as an autoscaler would) the group is rebuilt across nodes and the next request is served."""

from __future__ import annotations

import pytest

from longbow.services.config import EngineConfig, LongbowConfig, ModelSource
from longbow.services.engine.types import SamplingParams
from longbow.services.replica import build_engine
from tests.conftest import RunningGateway

pytestmark = pytest.mark.slow

# NOTE: a raylet that dies is declared dead by the GCS after missed health checks (default ~30 s);
# until then a new group could be placed on it. Checking every 0.5 s keeps the test short.
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                   "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
NODE = {"num_cpus": 1, "object_store_memory": 100 * 1024**2}
PROMPTS = [[504, 2365, 6354, 16438, 260, 5214, 690], [1072, 11685, 29, 1382, 28, 253, 30, 451, 2424, 297]]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False,
                                                            "_system_config": FAST_NODE_DEATH})
    try:
        cluster.add_node(**NODE)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _engine_config(shards: int) -> EngineConfig:
    # max_seqs=1 and a long generation: the stream is still running when its node goes
    return EngineConfig(token_budget=24, block_size=8, num_blocks=256, shards=shards, max_seqs=1,
                        placement_strategy="STRICT_SPREAD", placement_timeout_s=60,
                        collective_timeout_s=20, step_timeout_s=60)


def _shard_nodes(gateway) -> list[str]:
    import ray

    return ray.get([actor.node_id.remote() for actor in gateway.engine.engine.executor.actors])


def test_shards_on_two_nodes_match_one_process_and_survive_a_lost_node(cluster, tiny_checkpoint, tiny_model,
                                                                       tokenizer):
    import grpc

    from longbow.services.client.sdk import LongbowClient, LongbowError

    model = ModelSource(name_or_path=str(tiny_checkpoint), device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=12, min_tokens=12)
    reference = [c.token_ids for c in build_engine(LongbowConfig(model=model, engine=_engine_config(0)),
                                                   tiny_model).generate(PROMPTS, params)]
    head, worker = cluster.head_node, cluster.worker_nodes.copy().pop()
    gateway = RunningGateway(tiny_model, tokenizer, engine_config=_engine_config(2), sections={"model": model})
    try:
        assert sorted(_shard_nodes(gateway)) == sorted([head.node_id, worker.node_id])  # one shard per node
        with LongbowClient(gateway.address, timeout_s=120, retry=None) as client:
            first = client.generate(token_ids=PROMPTS[0], max_tokens=12, min_tokens=12)
            assert first.token_ids == reference[0]
            doomed = client.generate_stream(token_ids=PROMPTS[1], max_tokens=1500, min_tokens=1500)
            assert next(doomed).finish_reason is None  # running on both nodes
            cluster.remove_node(worker, allow_graceful=False)  # kills that node's raylet and its shard
            replacement = cluster.add_node(**NODE)
            with pytest.raises(LongbowError) as err:
                for _ in doomed:
                    pass
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and "shard" in err.value.message
            after = client.generate(token_ids=PROMPTS[1], max_tokens=12, min_tokens=12)
            assert after.token_ids == reference[1]
        assert sorted(_shard_nodes(gateway)) == sorted([head.node_id, replacement.node_id])
        assert gateway.engine.engine.executor.recoveries == 1
        assert gateway.wait_until_idle()["kv_blocks_used"] == 0
    finally:
        gateway.close()
