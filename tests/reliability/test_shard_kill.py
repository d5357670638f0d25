"""A shard killed mid-stream, through a real gateway socket over a real Ray ShardGroup (2 actors, the real
model): the in-flight stream fails with UNAVAILABLE (retriable), the request queued at the kill and a new
one complete on the recovered group with the same tokens as one process, and no KV is left held."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from longbow.services.client.sdk import LongbowClient, LongbowError
from longbow.services.config import EngineConfig, LongbowConfig, ModelSource
from longbow.services.engine.types import SamplingParams
from longbow.services.replica import build_engine
from tests.conftest import RunningGateway

pytestmark = pytest.mark.slow

BOUND_S = 60.0  # the collective timeout is 20 s: a lost shard is noticed well within this


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _engine_config(shards: int) -> EngineConfig:
    # max_seqs=1: a second request waits in the queue while the first runs
    return EngineConfig(token_budget=24, block_size=8, num_blocks=64, shards=shards, max_seqs=1,
                        collective_timeout_s=20, step_timeout_s=60)



def test_killed_shard_fails_the_stream_retriably_and_later_requests_complete(ray_session, loaded_model,
                                                                              tokenizer):
    import ray

    queued_ids = tokenizer("def merge_sorted(a, b):\n    result = []\n").input_ids
    new_ids = tokenizer("List three uses of a hash map:").input_ids
    cpu = ModelSource(device="cpu", dtype="float32")
    single = build_engine(LongbowConfig(model=cpu, engine=_engine_config(0)), loaded_model)
    params = SamplingParams(max_tokens=10, min_tokens=10)
    reference = [c.token_ids for c in single.generate([queued_ids, new_ids], params)]

    gateway = RunningGateway(loaded_model, tokenizer, engine_config=_engine_config(2), sections={"model": cpu})
    try:
        with LongbowClient(gateway.address, timeout_s=120, retry=None) as client:
            doomed = client.generate_stream("Write a very long story.", max_tokens=200, min_tokens=200)
            assert next(doomed).finish_reason is None  # running on both shards
            queued: dict = {}

            def run_queued():
                try:
                    queued["result"] = client.generate(token_ids=queued_ids, max_tokens=10, min_tokens=10)
                except LongbowError as err:
                    queued["error"] = err

            waiter = threading.Thread(target=run_queued)
            waiter.start()
            gateway.wait_for_stats(lambda s: s["waiting"] == 1, "the second request queued", BOUND_S)
            ray.kill(gateway.engine.engine.executor.actors[1], no_restart=True)
            killed = time.monotonic()
            with pytest.raises(LongbowError) as err:
                for _ in doomed:
                    pass
            failed_after = time.monotonic() - killed
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and "shard" in err.value.message
            assert failed_after < BOUND_S
            waiter.join(BOUND_S)
            assert not waiter.is_alive() and "error" not in queued, queued
            assert queued["result"].token_ids == reference[0]  # queued at the kill, served after recovery
            after = client.generate(token_ids=new_ids, max_tokens=10, min_tokens=10)
            assert after.token_ids == reference[1]
        stats = gateway.wait_until_idle()
        assert stats["kv_blocks_used"] == 0 and gateway.engine.engine.executor.recoveries == 1
        print(f"in-flight stream failed {failed_after:.2f} s after the kill")
    finally:
        gateway.close()
