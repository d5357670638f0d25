"""One model shard: a full model replica, this shard's KV blocks and its rank in the ring's process
group. A plain class with a synchronous constructor (tests build it directly); group.py wraps it as a
Ray actor."""

from __future__ import annotations

import datetime
import socket
import time

import torch
import torch.distributed as dist

from longbow.ringattn.costmodel import AttentionShape
from longbow.services.config import LongbowConfig
from longbow.services.engine.kv_cache import LocalPagedAttention
from longbow.services.engine.types import StepPlan
from longbow.services.engine.weights import load_model
from longbow.services.engine.worker import ForwardOutput, ModelRunner, ShardLayout
from longbow.services.shards.attention import ShardedPagedAttention


class ShardWorker:
    def __init__(self, config: LongbowConfig, rank: int, world_size: int):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.loaded = load_model(config.model)
        cfg = config.engine
        self.layout = ShardLayout(cfg.num_blocks, cfg.block_size, world_size)
        self.runner: ModelRunner | None = None
        self.backend = None
        self.steps, self.step_seconds = 0, 0.0
        self.bytes_sent = self.bytes_received = 0

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's reachable address and a free port for the process group's TCP store."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, host: str, port: int, timeout_s: float) -> int:
        """Form the process group (gloo on CPU, NCCL on CUDA). Collectives time out after timeout_s, so
        a lost peer fails a step instead of hanging it."""
        args = self.loaded.args
        if self.world_size == 1:
            factory = lambda cache: LocalPagedAttention(cache, args.n_layers)  # noqa: E731
        else:
            backend = "nccl" if self.loaded.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                    world_size=self.world_size, timeout=datetime.timedelta(seconds=timeout_s))
            shape = AttentionShape(args.n_heads, args.n_kv_heads, args.head_dim, self.loaded.dtype.itemsize)
            factory = lambda cache: ShardedPagedAttention(cache, args.n_layers, shape)  # noqa: E731
        self.runner = ModelRunner(self.loaded, self.layout, self.rank, factory)
        self.backend = self.runner.backend
        return self.rank

    def forward(self, plan: StepPlan) -> ForwardOutput:
        start = time.perf_counter()
        if isinstance(self.backend, ShardedPagedAttention):
            for chunk in plan.chunks:
                if len(chunk.token_ids) == 1:
                    self.backend.choose_decode(chunk.request_id)  # no need to look at the KV layout
                elif chunk.kv_slots is not None:
                    # NOTE: an edited document's chunk (PIE): a few new tokens against a long cached
                    # document, where pass-Q moves far fewer bytes than pass-KV; its KV positions are
                    # scattered over the shards, so no layout scan either.
                    self.backend.choose_fixed(chunk.request_id, "tokenring")
                else:
                    self.backend.choose(chunk.request_id, *self._positions_by_rank(chunk))
        output = self.runner.forward(plan)
        counter = getattr(self.backend, "counter", None)
        if counter is not None:  # keep totals, not every message: the server runs for weeks
            sent, received = counter.total()
            self.bytes_sent, self.bytes_received = self.bytes_sent + sent, self.bytes_received + received
            counter.messages.clear()
        self.steps += 1
        self.step_seconds += time.perf_counter() - start
        return output

    # PIE document slots: each shard applies the operation to the slots it holds.
    def shift_slots(self, slots: list[int], delta: int, rotate: bool) -> None:
        self.runner.shift_slots(slots, delta, rotate)

    def copy_slots(self, source: list[int], target: list[int]) -> None:
        self.runner.copy_slots(source, target)

    def read_keys(self, layer: int, slots: list[int]) -> dict:
        return self.runner.read_keys(layer, slots)

    def read_positions(self, slots: list[int]) -> dict[int, int]:
        return self.runner.read_positions(slots)

    def _positions_by_rank(self, chunk) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every rank's query positions and KV positions of one chunk's request."""
        bs, per_shard = self.layout.block_size, self.layout.blocks_per_shard
        blocks = torch.tensor(chunk.block_table, dtype=torch.int64)
        q_pos = torch.tensor(chunk.positions, dtype=torch.int64)
        k_pos = torch.arange(chunk.kv_len, dtype=torch.int64)
        q_rank, k_rank = blocks[q_pos // bs] // per_shard, blocks[k_pos // bs] // per_shard
        ranks = range(self.world_size)
        return [q_pos[q_rank == r] for r in ranks], [k_pos[k_rank == r] for r in ranks]

    def stats(self) -> dict:
        return {
            "rank": self.rank, "steps": self.steps, "step_seconds": self.step_seconds,
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "kv_blocks_total": self.layout.blocks_per_shard,
            "schedules": dict(getattr(self.backend, "schedule_counts", {})),
            "peak_rss_bytes": _peak_rss_bytes(),
        }

    def ping(self) -> int:
        return self.rank

    def node_id(self) -> str:
        """The Ray node this shard runs on (placement tests, operators' logs)."""
        import ray

        return ray.get_runtime_context().get_node_id()


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
