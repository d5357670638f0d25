"""N shard actors forming one engine replica: an executor (services/engine/executor.py) like the in-process Worker.

Each step is one `forward` call per shard (gathered together, no per-actor blocking get); each shard
samples the requests whose last token it holds, and the driver merges the shards' tokens, prompt
logprobs and attention pieces into one StepResult. A shard that dies fails the step promptly (collectives time out, a dead
actor's result errors at once), the in-flight requests get a retriable error, and the group rebuilds
itself: new actors, a new process group on a new port.
"""

from __future__ import annotations

import logging
import os
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from longbow.services.config import LongbowConfig
from longbow.services.engine.errors import EngineError
from longbow.services.engine.model import ModelArgs
from longbow.services.engine.types import SamplingParams, StepPlan, StepResult
from longbow.services.shards.placement import plan_placement, unplaceable_message
from longbow.services.shards.worker import ShardStepOutput, ShardWorker

log = logging.getLogger(__name__)


class ShardFailureError(EngineError):
    """A shard died or timed out during a step; the requests in flight may be retried."""


class ShardGroup:
    def __init__(self, config: LongbowConfig, args: ModelArgs, num_shards: int):
        self.config, self.num_shards = config, num_shards
        cfg = config.engine
        self.step_timeout_s, self.collective_timeout_s = cfg.step_timeout_s, cfg.collective_timeout_s
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # A local Ray registers os.cpu_count() CPUs; ask for enough bundles' worth so N shards can
            # always be placed on one machine (they then share its cores).
            local_cpus = None if cfg.ray_address else max(os.cpu_count() or 1, num_shards * cfg.cpus_per_shard)
            ray.init(address=cfg.ray_address or None, num_cpus=local_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        # sampling parameters of live requests: the shards keep their own copies; these are handed to a
        # rebuilt group, whose new actors never saw the plans that announced the requests still queued
        self.params: dict[str, SamplingParams] = {}
        self.recoveries = 0
        self.actors: list = []
        self._placement = None
        self._start()

    # ---- the executor contract (services/engine/executor.py) ------------------------------------
    def execute(self, plan: StepPlan) -> StepResult:
        """One `forward` call per shard, gathered together. Each shard samples the requests whose last
        token it holds, so only tokens (and asked-for extras) come back, never a vocabulary of logits."""
        for request_id in plan.finished:
            self.params.pop(request_id, None)
        self.params.update(plan.new_requests)
        return merge_outputs(plan, self._gather([actor.forward.remote(plan) for actor in self.actors]))

    # ---- PIE document slots: the same interface as the in-process Worker ------------------------
    def shift_slots(self, slots: list[int], delta: int, rotate: bool) -> None:
        self._gather([actor.shift_slots.remote(slots, delta, rotate) for actor in self.actors])

    def copy_slots(self, source: list[int], target: list[int]) -> None:
        self._gather([actor.copy_slots.remote(source, target) for actor in self.actors])

    def read_keys(self, layer: int, slots: list[int]) -> dict:
        return {k: v for part in self._gather([a.read_keys.remote(layer, slots) for a in self.actors])
                for k, v in part.items()}

    def read_positions(self, slots: list[int]) -> dict[int, int]:
        return {k: v for part in self._gather([a.read_positions.remote(slots) for a in self.actors])
                for k, v in part.items()}

    def recover(self) -> None:
        """Replace every actor and form a new process group (survivors may be stuck in a collective)."""
        self._stop_actors()
        self._start()
        self._gather([actor.remember.remote(self.params) for actor in self.actors])
        self.recoveries += 1

    def stats(self) -> dict:
        return {"shards": self._gather([actor.stats.remote() for actor in self.actors]),
                "recoveries": self.recoveries, "tracked_requests": len(self.params)}

    def shutdown(self) -> None:
        if self._owns_ray:
            # NOTE: the Ray we started goes with everything in it. Removing the placement group first
            # hung `longbow serve` on SIGTERM (seen: remove_placement_group never returned).
            self.actors, self._placement = [], None
            ray.shutdown()
            return
        self._stop_actors()

    def _stop_actors(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self._placement is not None:
            remove_placement_group(self._placement)
        self.actors, self._placement = [], None

    # ---- internals -----------------------------------------------------------------------------
    def _start(self) -> None:
        config = self.config
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        placement = plan_placement(config.engine, config.model, self.num_shards, cluster_gpus)
        self._placement = placement_group(placement.bundles, strategy=placement.strategy)
        try:
            ray.get(self._placement.ready(), timeout=config.engine.placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self._placement)
            self._placement = None
            nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
            raise ShardFailureError(unplaceable_message(placement, nodes)) from None
        remote = ray.remote(ShardWorker)
        self.actors = [
            remote.options(num_cpus=placement.cpus, num_gpus=placement.gpus, max_restarts=0,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement, rank)
                           ).remote(config, rank, self.num_shards)
            for rank in range(self.num_shards)
        ]
        host, port = ray.get(self.actors[0].rendezvous_address.remote(), timeout=300)
        ray.get([a.join.remote(host, port, self.collective_timeout_s) for a in self.actors], timeout=300)
        log.info("shard group ready: %d shards, rendezvous %s:%d", self.num_shards, host, port)

    def _gather(self, refs: list) -> list:
        """All results, failing fast: a dead shard's ref errors at once while its peers would wait
        for their collective timeout."""
        deadline = time.monotonic() + self.step_timeout_s
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise GetTimeoutError(f"shard step exceeded {self.step_timeout_s} s")
                ray.get(ready[0])  # raises now if that shard failed
            return ray.get(refs)
        except (RayActorError, RayTaskError, GetTimeoutError) as exc:
            raise ShardFailureError(f"shard failure: {type(exc).__name__}: {str(exc)[:200]}") from exc


def merge_outputs(plan: StepPlan, outputs: list[ShardStepOutput]) -> StepResult:
    """The shards' outputs as one StepResult: every request is sampled by exactly one shard; prompt
    logprobs come from every shard holding some of a chunk's rows; an attention row (DRAGIN) is the sum
    of every shard's piece over the keys it holds, laid out by position as the in-process Worker does."""
    result, prompt_pairs, pieces = StepResult(), {}, {}
    for output in outputs:
        result.sampled.update(output.result.sampled)
        result.failed.update(output.result.failed)
        result.logits.update(output.result.logits)
        for request_id, pairs in output.prompt_logprobs.items():
            prompt_pairs.setdefault(request_id, []).extend(pairs)
        for request_id, piece in output.attention.items():
            pieces.setdefault(request_id, []).append(piece)
    for chunk in plan.chunks:
        if chunk.request_id in prompt_pairs:
            result.prompt_logprobs[chunk.request_id] = [lp for _, lp in sorted(prompt_pairs[chunk.request_id])]
    for request_id, parts in pieces.items():
        if request_id in result.sampled:
            result.sampled[request_id].attention = _by_position(parts)
    return result


def _by_position(parts: list[tuple[list[int], list[float]]]) -> list[float]:
    """Attention probabilities indexed by position id, from each shard's (positions, probabilities)."""
    length = 1 + max((max(positions) for positions, _ in parts if positions), default=-1)
    dense = [0.0] * length
    for positions, probs in parts:
        for position, prob in zip(positions, probs):
            dense[position] += prob
    return dense
