"""Executing StepPlans: a ModelRunner computes a forward pass over the tokens one shard holds; the
StepSampler turns the logits of sampling positions into tokens, batched on the logits' device.

scheduler -> executor: `StepPlan`; executor -> scheduler: `StepResult` as plain Python values. With one
shard (the in-process `Worker`) runner and sampler sit together and the logits never leave the device;
the Ray shard group runs one runner per actor and samples on the driver (services/shards/group.py).

A step's inputs are built on the host in one vectorised pass (numpy, no per-token Python) and copied to
the device in one transfer; the sampled tokens, logprobs and entropies come back in one transfer.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from longbow.services.engine.kv_cache import LocalPagedAttention, LocalStepMeta, PagedKVCache, Segment
from longbow.services.engine.model import AttentionBackend
from longbow.services.engine.sampler import SamplingControls, sample_batch
from longbow.services.engine.types import SampledToken, SamplingParams, ScheduledChunk, StepPlan, StepResult
from longbow.services.engine.weights import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class ShardLayout:
    """Where a global KV block lives: shard = block // blocks_per_shard (see scheduler.BlockPool)."""

    blocks_per_shard: int
    block_size: int
    num_shards: int = 1

    @property
    def slots_per_shard(self) -> int:
        return self.blocks_per_shard * self.block_size

    def shard_of_slot(self, slot: int) -> int:
        return slot // self.slots_per_shard


@dataclass
class StepInputs:
    """One step's tokens on one shard, grouped by chunk (plan order). Host arrays describe the layout;
    device tensors feed the model. Built by `build_step_inputs`."""

    token_ids: torch.Tensor  # [T] device
    positions: torch.Tensor  # [T] device
    slots: torch.Tensor  # [T] device, local slots where each new token's K/V goes
    kv_slots: torch.Tensor  # [N] device, local slots each chunk may see, chunk by chunk
    logit_rows: torch.Tensor  # [R] device, rows projected to the vocabulary
    row_start: np.ndarray  # [B + 1] host: chunk b owns rows row_start[b]:row_start[b + 1]
    kv_start: np.ndarray  # [B + 1] host: chunk b's keys are kv_slots[kv_start[b]:kv_start[b + 1]]
    logit_start: np.ndarray  # [B + 1] host: chunk b's logit rows are logit_rows[logit_start[b]:...]
    host_positions: np.ndarray  # [T] host copy (prompt logprobs, masks)
    host_kv_slots: list[np.ndarray]  # [B] x [Tk_b] host copies of each chunk's local key slots
    kv_in_order: np.ndarray  # [B] host bool: the chunk's keys are positions 0..n-1 in list order


def build_step_inputs(plan: StepPlan, layout: ShardLayout, shard: int, device: torch.device) -> StepInputs:
    """Everything the forward pass needs about this shard's part of the step, in one host pass and one
    host-to-device copy (pinned when the device is CUDA)."""
    chunks, bs, base = plan.chunks, layout.block_size, shard * layout.slots_per_shard
    counts = np.fromiter((len(c.token_ids) for c in chunks), np.int64, len(chunks))  # [B]
    total = int(counts.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), np.int64, total)
    positions = np.fromiter(itertools.chain.from_iterable(c.positions for c in chunks), np.int64, total)
    slots = np.fromiter(itertools.chain.from_iterable(c.slots for c in chunks), np.int64, total)
    if layout.num_shards > 1:
        here = slots // layout.slots_per_shard == shard
        counts = np.bincount(np.repeat(np.arange(len(chunks)), counts)[here], minlength=len(chunks))
        tokens, positions, slots = tokens[here], positions[here], slots[here]
    row_start = np.concatenate(([0], np.cumsum(counts)))
    kv_lists = [_local_kv_slots(c, layout, shard, bs) - base for c in chunks]
    kv_start = np.concatenate(([0], np.cumsum([len(k) for k in kv_lists])))
    logit_lists = [_logit_rows(c, row_start[b], row_start[b + 1], shard) for b, c in enumerate(chunks)]
    logit_start = np.concatenate(([0], np.cumsum([len(r) for r in logit_lists])))
    kv_in_order = np.array([(c.kv_slots is None or c.kv_in_order) and layout.num_shards == 1 for c in chunks],
                           dtype=bool)
    parts = [tokens, positions, slots - base, *kv_lists, *logit_lists]
    packed = torch.from_numpy(np.concatenate(parts).astype(np.int64, copy=False))
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    n_kv, n_logits = int(kv_start[-1]), int(logit_start[-1])
    token_t, position_t, slot_t, kv_t, logit_t = packed.split([len(tokens)] * 3 + [n_kv, n_logits])
    return StepInputs(token_t, position_t, slot_t, kv_t, logit_t, row_start, kv_start, logit_start,
                      positions, kv_lists, kv_in_order)


def _local_kv_slots(chunk: ScheduledChunk, layout: ShardLayout, shard: int, bs: int) -> np.ndarray:
    """Global slots [Tk_local] of the chunk's visible KV held on this shard: its first kv_len tokens in
    block-table order, or its explicit kv_slots (an edited document's tokens sit anywhere)."""
    if chunk.kv_slots is not None:
        slots = np.asarray(chunk.kv_slots, dtype=np.int64)
    else:
        blocks = np.asarray(chunk.block_table, dtype=np.int64)
        slots = (blocks[:, None] * bs + np.arange(bs)).reshape(-1)[:chunk.kv_len]  # [kv_len]
    if layout.num_shards > 1:
        slots = slots[slots // layout.slots_per_shard == shard]
    return slots


def _logit_rows(chunk: ScheduledChunk, start: int, stop: int, shard: int) -> np.ndarray:
    # Project to the vocabulary only the rows someone reads: every local row of a scoring request,
    # else the last row of a sampling chunk, on the shard that holds it.
    if chunk.prompt_logprobs:
        return np.arange(start, stop, dtype=np.int64)
    if chunk.sample and chunk.shard == shard and stop > start:
        return np.array([stop - 1], dtype=np.int64)
    return np.empty(0, dtype=np.int64)


class ModelRunner:
    """The model and the KV of one shard. `backend_factory(cache)` picks the attention backend: by default
    the Triton step kernel on CUDA (gpu_step.py) and per-request SDPA elsewhere (kv_cache.py)."""

    def __init__(self, loaded: LoadedModel, layout: ShardLayout, shard: int = 0,
                 backend_factory: Callable[[PagedKVCache], AttentionBackend] | None = None,
                 attention: str = "auto"):
        self.model, self.args, self.device = loaded.model, loaded.args, loaded.device
        self.layout, self.shard = layout, shard
        # One spare block past the pool: padding rows of a graph-replayed decode write their K/V there.
        self.cache = PagedKVCache(loaded.args, layout.blocks_per_shard + 1, layout.block_size, loaded.device,
                                  loaded.dtype)
        self.scratch_slot = layout.blocks_per_shard * layout.block_size
        self.backend = (backend_factory or self._default_backend(attention))(self.cache)
        self.kernel_fallbacks = 0
        self._slot_base = shard * layout.blocks_per_shard * layout.block_size

    def _default_backend(self, attention: str) -> Callable[[PagedKVCache], AttentionBackend]:
        from longbow.services.engine import gpu_step

        if attention not in ("auto", "sdpa", "triton"):
            raise ValueError(f"engine.attention must be auto, sdpa or triton, got {attention!r}")
        use_kernel = attention == "triton" or (attention == "auto" and self.device.type == "cuda"
                                                and gpu_step.triton_available(self.device))
        if use_kernel:
            return lambda cache: gpu_step.StepPagedAttention(cache, self.args)
        return lambda cache: LocalPagedAttention(cache, self.args.n_layers)

    def run(self, plan: StepPlan) -> tuple[torch.Tensor, StepInputs, LocalStepMeta]:
        """The forward pass: logits [R, V] fp32 of the step's logit rows (see StepInputs.logit_start)."""
        inputs = build_step_inputs(plan, self.layout, self.shard, self.device)
        try:
            meta = self.backend.prepare(self._meta(plan, inputs))
            logits = self.model(inputs.token_ids, inputs.positions, self.backend, meta, inputs.logit_rows)  # [R, V]
        except Exception:
            if not self._kernel_fallback():
                raise
            return self.run(plan)  # rewrites the same K/V into the same slots
        return logits, inputs, meta

    def _kernel_fallback(self) -> bool:
        """NOTE: a Triton kernel that fails to compile or launch on this GPU must cost speed, not service:
        switch to per-request SDPA once, loudly (stats show it), and redo the step."""
        from longbow.services.engine.gpu_step import StepPagedAttention

        if not isinstance(self.backend, StepPagedAttention):
            return False
        log.exception("the step attention kernel failed; falling back to per-request SDPA")
        self.backend = LocalPagedAttention(self.cache, self.args.n_layers)
        self.kernel_fallbacks += 1
        return True

    def prompt_logprobs(self, plan: StepPlan, logits: torch.Tensor,
                        inputs: StepInputs) -> dict[str, list[tuple[int, float]]]:
        """(target position, logprob) of every local row of the chunks that score their prompt."""
        found = {}
        for b, chunk in enumerate(plan.chunks):
            first, last = inputs.logit_start[b], inputs.logit_start[b + 1]
            if chunk.prompt_logprobs and last > first:
                rows = inputs.host_positions[inputs.row_start[b]:inputs.row_start[b + 1]]
                found[chunk.request_id] = _prompt_logprobs(chunk, rows.tolist(), logits[first:last])
        return found

    # ---- slot operations for documents kept across edits (services/engine/pie.py) ----------------
    def local_slots(self, slots) -> torch.Tensor:
        """The given global slots that live on this shard, as local indices [n_local]."""
        slots = torch.as_tensor(slots, dtype=torch.int64, device=self.device)
        return slots[slots // self.layout.slots_per_shard == self.shard] - self._slot_base

    def shift_slots(self, slots: list[int], delta: int, rotate: bool) -> None:
        self.cache.shift(self.local_slots(slots), delta, self.model.inv_freq, rotate)

    def copy_slots(self, source: list[int], target: list[int]) -> None:
        """Copy KV between slots; pairs must live on the same shard (the caller allocates them so)."""
        source_t = torch.as_tensor(source, dtype=torch.int64, device=self.device)
        here = source_t // self.layout.slots_per_shard == self.shard
        target_t = torch.as_tensor(target, dtype=torch.int64, device=self.device)
        self.cache.copy(source_t[here] - self._slot_base, target_t[here] - self._slot_base)

    def read_keys(self, layer: int, slots: list[int]) -> dict[int, torch.Tensor]:
        """{global slot: key [Hkv, D]} for the given slots held here (tests and diagnostics)."""
        local = self.local_slots(slots)
        keys = self.cache.k[layer, local].cpu()
        return {int(slot) + self._slot_base: key for slot, key in zip(local.tolist(), keys)}

    def read_positions(self, slots: list[int]) -> dict[int, int]:
        local = self.local_slots(slots)
        return {int(s) + self._slot_base: int(p) for s, p in zip(local.tolist(), self.cache.positions[local].tolist())}

    def _meta(self, plan: StepPlan, inputs: StepInputs) -> LocalStepMeta:
        row, kv = inputs.row_start, inputs.kv_start
        segments = [
            Segment(c.request_id, slice(int(row[b]), int(row[b + 1])), inputs.kv_slots[kv[b]:kv[b + 1]],
                    host_kv_slots=inputs.host_kv_slots[b],
                    want_attention=c.return_attention and c.sample and c.shard == self.shard,
                    in_order=bool(inputs.kv_in_order[b]))
            for b, c in enumerate(plan.chunks)
        ]
        return LocalStepMeta(inputs.slots, inputs.positions, segments, {}, row_start=row, kv_start=kv,
                             all_kv_slots=inputs.kv_slots)


class StepSampler:
    """Sampling parameters of every live request (from `StepPlan.new_requests`, forgotten on
    `StepPlan.finished`) and the batched sampling of a step's logits on their device (sampler.py):
    one host-to-device copy of the controls, one device-to-host copy of the results."""

    def __init__(self, eos_token_ids: tuple[int, ...], device: torch.device | str = "cpu"):
        self.eos, self.device = tuple(eos_token_ids), torch.device(device)
        self.params: dict[str, SamplingParams] = {}

    def update(self, plan: StepPlan) -> None:
        for request_id in plan.finished:
            self.params.pop(request_id, None)
        self.params.update(plan.new_requests)

    def sample(self, chunks: list[ScheduledChunk], logits: torch.Tensor,
               attention: dict[str, list[float]], result: StepResult) -> None:
        """Sample one token per chunk from logits [len(chunks), V]; results into `result`."""
        if not chunks:
            return
        params = [self.params[c.request_id] for c in chunks]
        # NOTE: the engine gives every request a seed at admission, so `seed` is never None here.
        controls = SamplingControls.build(params, [p.seed for p in params], [c.num_generated for c in chunks],
                                          self.eos, logits.device)
        host = sample_batch(logits, controls).to_host()
        for row, chunk in enumerate(chunks):
            if host.failed[row]:  # only this request fails; its batch-mates go on
                result.failed[chunk.request_id] = "sampling failed: no token can be sampled (all banned or not finite)"
                continue
            result.sampled[chunk.request_id] = SampledToken(
                host.token_ids[row], host.logprobs[row], host.entropies[row], attention.get(chunk.request_id))


class Worker:
    """The in-process executor (see executor.py for the contract): one runner holding all KV, and the
    sampler, on one device; logits stay there. On CUDA, decode-only steps replay CUDA graphs."""

    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, *, attention: str = "auto",
                 decode_graphs: str = "auto", max_batch: int = 64):
        self.runner = ModelRunner(loaded, ShardLayout(num_blocks, block_size), attention=attention)
        self.sampler = StepSampler(loaded.args.eos_token_ids, loaded.device)
        self.cache = self.runner.cache
        self.graphs = self._decode_graphs(loaded, decode_graphs, max_batch, num_blocks * block_size)
        self.steps = self.graph_steps = 0

    def _decode_graphs(self, loaded: LoadedModel, mode: str, max_batch: int, capacity: int):
        from longbow.services.engine import gpu_step

        if mode not in ("auto", "on", "eager", "off"):
            raise ValueError(f"engine.decode_graphs must be auto, on, eager or off, got {mode!r}")
        on_cuda = loaded.device.type == "cuda"
        if mode == "off" or (mode == "auto" and not on_cuda) or not gpu_step.triton_available(loaded.device):
            return None
        return gpu_step.DecodeGraphs(loaded.model, self.cache, loaded.args, max_batch, capacity,
                                     self.runner.scratch_slot, use_graphs=on_cuda and mode != "eager")

    def execute(self, plan: StepPlan) -> StepResult:
        self.sampler.update(plan)
        self.steps += 1
        if self.graphs is not None and self.graphs.supports(plan.chunks):
            try:
                return self._execute_decode_graph(plan)
            except Exception:  # NOTE: as for the kernel: speed lost, requests kept (stats show it)
                log.exception("graph-replayed decode step failed; decode steps run eagerly from now on")
                self.graphs = None
        logits, inputs, meta = self.runner.run(plan)
        result = StepResult(prompt_logprobs={rid: [lp for _, lp in sorted(pairs)] for rid, pairs in
                                             self.runner.prompt_logprobs(plan, logits, inputs).items()})
        last_rows = [int(inputs.logit_start[b + 1]) - 1 for b in range(len(plan.chunks))]
        for b, chunk in enumerate(plan.chunks):
            if chunk.want_logits:  # a document pass picks its own token (jobs.py)
                result.logits[chunk.request_id] = logits[last_rows[b]]
        sampling = [c for c in plan.chunks if c.sample and not c.want_logits]
        sampling_rows = [last_rows[b] for b, c in enumerate(plan.chunks) if c.sample and not c.want_logits]
        attention = {rid: _by_position(row, self.cache, meta, rid) for rid, row in meta.attention_rows.items()}
        if sampling:
            rows = torch.tensor(sampling_rows, dtype=torch.int64, device=logits.device)
            self.sampler.sample(sampling, logits.index_select(0, rows), attention, result)
        return result

    def _execute_decode_graph(self, plan: StepPlan) -> StepResult:
        layout = self.runner.layout
        kv_lists = [_local_kv_slots(c, layout, 0, layout.block_size) for c in plan.chunks]
        logits = self.graphs.run(plan.chunks, kv_lists)  # [B, V]
        result = StepResult()
        self.sampler.sample(plan.chunks, logits, {}, result)
        self.graph_steps += 1
        return result

    def shift_slots(self, slots: list[int], delta: int, rotate: bool) -> None:
        self.runner.shift_slots(slots, delta, rotate)

    def copy_slots(self, source: list[int], target: list[int]) -> None:
        self.runner.copy_slots(source, target)

    def read_keys(self, layer: int, slots: list[int]) -> dict[int, torch.Tensor]:
        return self.runner.read_keys(layer, slots)

    def read_positions(self, slots: list[int]) -> dict[int, int]:
        return self.runner.read_positions(slots)

    def recover(self) -> None:
        """Nothing to rebuild in process: a failed step leaves the cache usable; its requests are gone."""

    def stats(self) -> dict:
        return {"steps": self.steps, "decode_graph_steps": self.graph_steps,
                "kernel_fallbacks": self.runner.kernel_fallbacks,
                "graph_capture_failures": self.graphs.capture_failures if self.graphs is not None else 0,
                "tracked_requests": len(self.sampler.params),
                "attention": type(self.runner.backend).__name__}

    def shutdown(self) -> None:
        pass


def _prompt_logprobs(chunk: ScheduledChunk, positions: list[int], logits: torch.Tensor) -> list[tuple[int, float]]:
    """(target position, logprob of the token there) for each local row; row at position p predicts p + 1."""
    known = dict(zip(chunk.positions, chunk.token_ids))
    if chunk.next_token_id is not None:
        known[chunk.positions[-1] + 1] = chunk.next_token_id
    pairs = [(i, p + 1) for i, p in enumerate(positions) if p + 1 in known]
    if not pairs:
        return []
    rows = torch.tensor([i for i, _ in pairs], device=logits.device)
    targets = torch.tensor([known[t] for _, t in pairs], device=logits.device)
    # NOTE: logit - logsumexp for the target only: the full log-softmax and the entropy over every row
    # (scoring forwards 512 rows x 49k vocabulary) were ~5% of a Meta-Chunking scoring step, unused.
    picked = logits[rows].float()
    values = (picked.gather(1, targets[:, None])[:, 0] - torch.logsumexp(picked, dim=-1)).tolist()
    return [(target, value) for (_, target), value in zip(pairs, values)]


def _by_position(probs: torch.Tensor, cache: PagedKVCache, meta: LocalStepMeta, request_id: str) -> list[float]:
    """Attention probabilities re-indexed by position id (storage order is not position order)."""
    segment = next(s for s in meta.segments if s.request_id == request_id)
    positions = cache.positions[segment.kv_slots]
    dense = torch.zeros(int(positions.max()) + 1, dtype=torch.float32, device=probs.device)
    dense[positions] = probs.float()
    return dense.tolist()
