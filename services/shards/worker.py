"""One model shard: a full model replica, this shard's KV blocks, its rank in the ring's process group,
and the sampling of the requests whose last token it holds (counter-based seeded sampling, sampler.py,
so a request draws the same tokens on any shard as in process). A plain class with a synchronous
constructor (tests build it directly); group.py wraps it as a Ray actor."""

from __future__ import annotations

import datetime
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from longbow.ringattn.costmodel import AttentionShape
from longbow.services.config import LongbowConfig
from longbow.services.engine.kv_cache import LocalPagedAttention, LocalStepMeta, PagedKVCache
from longbow.services.engine.types import SamplingParams, StepPlan, StepResult
from longbow.services.engine.weights import load_model
from longbow.services.engine.worker import ModelRunner, ShardLayout, StepSampler
from longbow.services.shards.attention import ShardedPagedAttention, step_layout


@dataclass
class ShardStepOutput:
    """What one shard sends back for one step: plain values, no logits but document passes'."""

    result: StepResult = field(default_factory=StepResult)  # sampled, failed, logits of this shard's requests
    prompt_logprobs: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # (target position, logprob)
    # request id -> (positions, attention probabilities) of the keys held here (DRAGIN), summed by the driver
    attention: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def _local_attention(meta: LocalStepMeta, cache: PagedKVCache) -> dict[str, tuple[list[int], list[float]]]:
    """One shard holding all KV: the rows LocalPagedAttention filled, with their keys' positions."""
    segments = {seg.request_id: seg for seg in meta.segments}
    return {rid: (cache.positions[segments[rid].kv_slots].tolist(), row.float().tolist())
            for rid, row in meta.attention_rows.items()}


class ShardWorker:
    def __init__(self, config: LongbowConfig, rank: int, world_size: int):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.loaded = load_model(config.model)
        cfg = config.engine
        self.layout = ShardLayout(cfg.num_blocks, cfg.block_size, world_size)
        self.runner: ModelRunner | None = None
        self.sampler = StepSampler(self.loaded.args.eos_token_ids, self.loaded.device)
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

    def remember(self, params: dict[str, SamplingParams]) -> None:
        """Sampling parameters of requests announced before this shard existed (a rebuilt group)."""
        self.sampler.params.update(params)

    def forward(self, plan: StepPlan) -> ShardStepOutput:
        """One step on this shard: the forward pass over the tokens held here, then sampling of the
        requests whose last token is here. Only tokens, logprobs, entropies (and asked-for attention
        pieces and prompt logprobs) go back; logits only for document passes (`want_logits`)."""
        start = time.perf_counter()
        self.sampler.update(plan)
        sharded = isinstance(self.backend, ShardedPagedAttention)
        if sharded:
            self.backend.begin_step(step_layout(plan, self.layout, self.backend.shape))
        logits, inputs, meta = self.runner.run(plan)  # [R, V]
        output = ShardStepOutput(prompt_logprobs=self.runner.prompt_logprobs(plan, logits, inputs))
        sampling, rows = [], []
        for b, chunk in enumerate(plan.chunks):
            if not (chunk.sample and chunk.shard == self.rank):
                continue
            last_row = int(inputs.logit_start[b + 1]) - 1
            if chunk.want_logits:  # a document pass picks its own token (jobs.py)
                output.result.logits[chunk.request_id] = logits[last_row].cpu()
            else:
                sampling.append(chunk), rows.append(last_row)
        if sampling:
            picked = logits.index_select(0, torch.tensor(rows, dtype=torch.int64, device=logits.device))
            self.sampler.sample(sampling, picked, {}, output.result)
        output.attention = self.backend.attention_parts if sharded else _local_attention(meta, self.runner.cache)
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
