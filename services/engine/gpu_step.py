"""The engine step on a GPU: one attention call per layer for the whole step, and decode steps replayed
from CUDA graphs.

`StepPagedAttention` is the attention backend for CUDA: every query row of a step (decodes and prefill
chunks of all requests) goes through one `paged_attention` launch per layer (services/engine/paged_attention.py,
a Triton kernel that reads K/V through each request's slot list and masks by position id), with the tile
plan built once per step on the host. `DecodeGraphs` captures a decode-only step per batch bucket (padded
batch, static input buffers, a tile table padded to a fixed capacity) and replays it: one host-to-device copy
of the step's ids and tables, one graph launch, the logits in a static buffer.

Nothing here runs on the CPU path; on a CPU the same code runs under Triton's interpreter for tests.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from longbow.services.engine import paged_attention as kernels
from longbow.services.engine.kv_cache import LocalStepMeta, PagedKVCache, _last_row_attention
from longbow.services.engine.model import AttentionBackend, ModelArgs, Transformer

log = logging.getLogger(__name__)


def triton_available(device: torch.device) -> bool:
    """The kernel path is used on CUDA when triton imports (the GPU image ships it with torch)."""
    return kernels.triton is not None and (device.type == "cuda" or kernels.triton.knobs.runtime.interpret)


@dataclass
class KernelStepMeta(LocalStepMeta):
    """LocalStepMeta plus what the kernel needs for the whole step (built once, read by every layer)."""

    kv_slots32: torch.Tensor | None = None  # [N] int32, chunk by chunk
    plan: kernels.TilePlan | None = None
    max_q_len: int = 0
    max_kv_len: int = 0
    attention_requests: list = field(default_factory=list)  # segments that asked for attention rows


class StepPagedAttention(AttentionBackend):
    """All KV on this device; one Triton launch per layer for every row of the step."""

    def __init__(self, cache: PagedKVCache, args: ModelArgs):
        self.cache, self.last_layer = cache, args.n_layers - 1
        self.group, self.num_kv_heads = args.n_heads // args.n_kv_heads, args.n_kv_heads
        self.scale = 1.0 / math.sqrt(args.head_dim)

    def prepare(self, meta: LocalStepMeta) -> KernelStepMeta:
        """The kernel's view of a step: int32 slot lists and the tile plan, moved to the device once."""
        self.cache.positions[meta.slots] = meta.positions
        device = meta.positions.device
        plan = kernels.plan_tiles(meta.row_start, meta.kv_start, group_size=self.group,
                                  num_kv_heads=self.num_kv_heads)
        q_lens, kv_lens = np.diff(meta.row_start), np.diff(meta.kv_start)
        return KernelStepMeta(
            meta.slots, meta.positions, meta.segments, meta.attention_rows,
            kv_slots32=meta.all_kv_slots.to(torch.int32),
            plan=plan.to(device, non_blocking=True), max_q_len=int(q_lens.max(initial=0)),
            max_kv_len=int(kv_lens.max(initial=0)),
            attention_requests=[s for s in meta.segments if s.want_attention],
        )

    def attend(self, layer, q, k, v, meta: KernelStepMeta) -> torch.Tensor:
        cache = self.cache
        cache.k[layer, meta.slots] = k
        cache.v[layer, meta.slots] = v
        out = kernels.paged_attention(
            q, cache.k[layer], cache.v[layer], cache.positions, meta.positions, None, meta.kv_slots32, None,
            self.scale, max_q_len=meta.max_q_len, max_kv_len=meta.max_kv_len, plan=meta.plan)  # [T, Hq, D]
        if layer == self.last_layer:
            for seg in meta.attention_requests:  # DRAGIN only: computed for the requests that ask
                keys = cache.k[layer, seg.kv_slots]  # [Tk, Hkv, D]
                q_pos = meta.positions[seg.rows][-1]
                visible = cache.positions[seg.kv_slots] <= q_pos
                meta.attention_rows[seg.request_id] = _last_row_attention(q[seg.rows][-1], keys, visible)
        return out


@dataclass
class _Bucket:
    """Static buffers and the captured graph of one padded decode batch size."""

    size: int
    capacity: int  # tile table length
    ids: torch.Tensor  # [3, size] int64 device: token ids, positions, slots
    tables: torch.Tensor  # [kv_capacity + 5 * capacity + 4 * size] int32 device: kv slots, tiles, merges
    staging_ids: torch.Tensor  # pinned host copies of the two
    staging_tables: torch.Tensor
    logits: torch.Tensor | None = None  # [size, V] fp32, written by every replay
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """Decode-only steps from CUDA graphs captured per batch bucket (1, 2, 4, ... up to max_batch).

    A step qualifies when every chunk is one token that samples, sees its request's first kv_len tokens,
    and asks for neither prompt logprobs nor attention rows. The batch is padded to its bucket: padding
    rows are sequences with no query rows and no keys (the kernel skips them); their token writes its K/V
    to a scratch slot past the pool, so real KV is never touched. `use_graphs=False` runs the very same
    static-buffer step eagerly (the CPU tests, and a fallback switch)."""

    def __init__(self, model: Transformer, cache: PagedKVCache, args: ModelArgs, max_batch: int,
                 kv_capacity: int, scratch_slot: int, use_graphs: bool = True):
        self.model, self.cache, self.args = model, cache, args
        self.backend = _GraphAttention(cache, args)
        self.kv_capacity, self.scratch_slot, self.use_graphs = kv_capacity, scratch_slot, use_graphs
        self.sizes = [1 << i for i in range(max(1, max_batch - 1).bit_length() + 1) if 1 << i <= max(1, max_batch)]
        if self.sizes[-1] < max_batch:
            self.sizes.append(max_batch)
        self.buckets: dict[int, _Bucket] = {}
        self.device = cache.k.device
        self.pool = torch.cuda.graph_pool_handle() if use_graphs and self.device.type == "cuda" else None
        self.replays = self.capture_failures = 0

    def supports(self, chunks) -> bool:
        return (0 < len(chunks) <= self.sizes[-1]
                and all(len(c.token_ids) == 1 and c.sample and c.kv_slots is None and not c.prompt_logprobs
                        and not c.return_attention for c in chunks)
                and sum(c.kv_len for c in chunks) <= self.kv_capacity)

    def run(self, chunks, kv_lists: list[np.ndarray]) -> torch.Tensor:
        """Logits [B, V] of the step's B decode rows; `kv_lists` are each chunk's key slots (host)."""
        size = next(s for s in self.sizes if s >= len(chunks))
        bucket = self.buckets.get(size) or self._make_bucket(size)
        self._fill(bucket, chunks, kv_lists)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            bucket.logits = self._forward(bucket)
        self.replays += 1
        return bucket.logits[:len(chunks)]

    # ---- internals -----------------------------------------------------------------------------
    def _capacity(self, size: int) -> int:
        # NOTE: plan_tiles gives at most 2B + (4 x SMs) / Hkv tiles when it splits (pieces sized so the
        # split sequences make about 4 programs per SM, one piece of rounding per sequence).
        return 2 * size + (4 * kernels.H200_SMS) // self.args.n_kv_heads + 1

    def _make_bucket(self, size: int) -> _Bucket:
        capacity = self._capacity(size)
        n_tables = self.kv_capacity + 5 * capacity + 4 * size
        pin = self.device.type == "cuda"
        bucket = _Bucket(size, capacity,
                         ids=torch.zeros((3, size), dtype=torch.int64, device=self.device),
                         tables=torch.zeros(n_tables, dtype=torch.int32, device=self.device),
                         staging_ids=torch.zeros((3, size), dtype=torch.int64, pin_memory=pin),
                         staging_tables=torch.zeros(n_tables, dtype=torch.int32, pin_memory=pin))
        bucket.ids[2].fill_(self.scratch_slot)  # before any fill: warm-up and capture write only scratch
        bucket.tables[self.kv_capacity:self.kv_capacity + 5 * capacity].zero_()
        if self.pool is not None:
            try:
                self._capture(bucket)
            except Exception:  # NOTE: a failed capture costs speed, never requests: replay eagerly
                log.exception("decode graph capture failed for batch %d; this bucket runs eagerly", size)
                bucket.graph, self.capture_failures = None, self.capture_failures + 1
                torch.cuda.synchronize()
        self.buckets[size] = bucket
        return bucket

    def _capture(self, bucket: _Bucket) -> None:
        began = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: triton compiles and autotunes outside the capture
                self._forward(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        bucket.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bucket.graph, pool=self.pool):
            bucket.logits = self._forward(bucket)
        log.info("decode graph captured: batch %d, %.2f s", bucket.size, time.perf_counter() - began)

    def _fill(self, bucket: _Bucket, chunks, kv_lists: list[np.ndarray]) -> None:
        n, size = len(chunks), bucket.size
        ids = bucket.staging_ids.numpy()
        ids[0, :n] = [c.token_ids[0] for c in chunks]
        ids[1, :n] = [c.positions[0] for c in chunks]
        ids[2, :n] = [c.slots[0] for c in chunks]
        ids[0, n:], ids[1, n:], ids[2, n:] = 0, 0, self.scratch_slot
        lengths = np.zeros(size, dtype=np.int64)
        lengths[:n] = [len(k) for k in kv_lists]
        kv_start = np.concatenate(([0], np.cumsum(lengths)))
        q_start = np.concatenate((np.arange(n + 1), np.full(size - n, n)))  # padding rows: no query rows
        plan = kernels.plan_tiles(q_start, kv_start, group_size=self.backend.group,
                                  num_kv_heads=self.args.n_kv_heads, capacity=bucket.capacity)
        tables = bucket.staging_tables.numpy()
        total = int(kv_start[-1])
        if total:
            tables[:total] = np.concatenate(kv_lists)
        tiles_at = self.kv_capacity
        tables[tiles_at:tiles_at + 5 * bucket.capacity] = plan.tiles.numpy().reshape(-1)
        tables[tiles_at + 5 * bucket.capacity:] = plan.merges.numpy().reshape(-1)
        bucket.ids.copy_(bucket.staging_ids, non_blocking=True)
        bucket.tables.copy_(bucket.staging_tables, non_blocking=True)

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        """The captured step: positions stored, the model over the bucket's rows, logits of every row."""
        tokens, positions, slots = bucket.ids[0], bucket.ids[1], bucket.ids[2]
        self.cache.positions[slots] = positions
        tiles_at, capacity = self.kv_capacity, bucket.capacity
        plan = kernels.TilePlan(
            tiles=bucket.tables[tiles_at:tiles_at + 5 * capacity].view(capacity, 5),
            merges=bucket.tables[tiles_at + 5 * capacity:].view(bucket.size, 4),
            group_size=self.backend.group, block_m=self.backend.block_m, rows_per_tile=self.backend.rows_per_tile,
            num_partials=capacity)
        meta = _GraphMeta(slots, positions, bucket.tables[:self.kv_capacity], plan)
        return self.model(tokens, positions, self.backend, meta, None)  # [size, V] fp32


@dataclass
class _GraphMeta:
    slots: torch.Tensor  # [size]
    positions: torch.Tensor  # [size]
    kv_slots: torch.Tensor  # [kv_capacity] int32
    plan: kernels.TilePlan


class _GraphAttention(AttentionBackend):
    """The kernel over static buffers: no host values read, no allocation that depends on the step."""

    def __init__(self, cache: PagedKVCache, args: ModelArgs):
        self.cache = cache
        self.group = args.n_heads // args.n_kv_heads
        self.scale = 1.0 / math.sqrt(args.head_dim)
        # A decode tile is 1 row x G heads: the planner's height for max_q_len = 1 (fixed for every step).
        self.block_m, self.rows_per_tile = kernels._tile_height(1, self.group)

    def attend(self, layer, q, k, v, meta: _GraphMeta) -> torch.Tensor:
        self.cache.k[layer, meta.slots] = k
        self.cache.v[layer, meta.slots] = v
        return kernels.paged_attention(
            q, self.cache.k[layer], self.cache.v[layer], self.cache.positions, meta.positions, None, meta.kv_slots,
            None, self.scale, max_q_len=1, max_kv_len=0, plan=meta.plan)
