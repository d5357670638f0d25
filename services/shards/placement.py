"""Where a shard group's actors run: one placement-group bundle per shard (its CPUs, and a GPU when the
shards run on CUDA), under the strategy the operator picks, and an error that says why a group cannot
be placed. Pure functions over the config and the nodes' resources; group.py makes the Ray calls."""

from __future__ import annotations

from dataclasses import dataclass

from longbow.services.config import EngineConfig, ModelSource

# Ray's placement-group strategies: PACK puts bundles on as few nodes as it can, SPREAD on as many,
# STRICT_PACK on one node or not at all, STRICT_SPREAD on distinct nodes or not at all.
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class ShardPlacement:
    num_shards: int
    cpus: float  # per shard
    gpus: float  # per shard; 0: the shards run on CPUs
    strategy: str

    @property
    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, "GPU": self.gpus} if self.gpus else {"CPU": self.cpus}

    @property
    def bundles(self) -> list[dict[str, float]]:
        return [dict(self.bundle) for _ in range(self.num_shards)]


def plan_placement(engine: EngineConfig, model: ModelSource, num_shards: int,
                   cluster_gpus: float) -> ShardPlacement:
    strategy = engine.placement_strategy.upper()
    if strategy not in STRATEGIES:
        raise ValueError(f"engine.placement_strategy {engine.placement_strategy!r} is not one of "
                         f"{', '.join(STRATEGIES)}")
    return ShardPlacement(num_shards, engine.cpus_per_shard, shard_gpus(engine, model, cluster_gpus), strategy)


def shard_gpus(engine: EngineConfig, model: ModelSource, cluster_gpus: float) -> float:
    """GPUs each shard asks for. NOTE: the driver decides for the workers, and on a `ray up` cluster the
    driver (the gateway on a CPU-only head) has no GPU of its own: `auto` means CUDA when the cluster
    has GPUs, which is where a shard's own `auto` (cuda when available) will land once placed there."""
    if engine.gpus_per_shard is not None:
        return engine.gpus_per_shard
    if model.device.startswith("cuda"):
        return 1.0
    return 1.0 if model.device == "auto" and cluster_gpus > 0 else 0.0


def unplaceable_message(placement: ShardPlacement, nodes: list[dict[str, float]]) -> str:
    """Why `placement` did not fit `nodes` (each alive node's total resources), and what to change."""
    n, bundle = placement.num_shards, placement.bundle
    fitting = sum(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in nodes)
    cpus, gpus = sum(node.get("CPU", 0) for node in nodes), sum(node.get("GPU", 0) for node in nodes)
    asked = " + ".join(f"{v:g} {k}" for k, v in bundle.items())
    message = (f"cannot place {n} shards x {asked} ({placement.strategy}) on this Ray cluster "
               f"({len(nodes)} nodes, {cpus:g} CPUs, {gpus:g} GPUs; {fitting} nodes fit one shard)")
    if placement.strategy == "STRICT_SPREAD" and fitting < n:
        return message + f"; STRICT_SPREAD needs {n} such nodes: add nodes or lower --shards"
    if placement.strategy == "STRICT_PACK":
        return message + "; STRICT_PACK needs one node that fits every shard: use PACK, or a bigger node"
    if placement.gpus and gpus < n * placement.gpus:
        return message + "; add GPU nodes, or run the shards on CPUs (model.device cpu, engine.gpus_per_shard 0)"
    return message + "; lower --shards or engine.cpus_per_shard, or add nodes"
