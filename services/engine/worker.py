"""Executing StepPlans: a ModelRunner computes a forward pass over the tokens one shard holds; the
Sampler (on the driver) turns the logits of sampling positions into tokens.

scheduler -> workers: `StepPlan`; workers -> scheduler: `StepResult` as plain Python values. With one
shard (the in-process `Worker`) runner and sampler sit together; the Ray shard group runs one runner per
actor and samples on the driver, so seeded generators live in one place whatever shard holds a token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from longbow.services.engine.kv_cache import LocalPagedAttention, LocalStepMeta, PagedKVCache, Segment
from longbow.services.engine.model import AttentionBackend
from longbow.services.engine.sampler import entropy_and_logprobs, new_generator, sample_row
from longbow.services.engine.types import SampledToken, SamplingParams, ScheduledChunk, StepPlan, StepResult
from longbow.services.engine.weights import LoadedModel


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
class ForwardOutput:
    """What one runner produced for one step (plain values and small tensors: it may cross Ray)."""

    sample_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # request id -> [V] fp32
    prompt_logprobs: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # (target position, logprob)
    attention: dict[str, list[float]] = field(default_factory=dict)  # by position

    def merge(self, other: "ForwardOutput") -> "ForwardOutput":
        self.sample_logits.update(other.sample_logits)
        self.attention.update(other.attention)
        for rid, values in other.prompt_logprobs.items():
            self.prompt_logprobs.setdefault(rid, []).extend(values)
        return self


@dataclass
class _ShardBatch:
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # local slots on this shard
    rows: dict[str, slice] = field(default_factory=dict)
    kv_slots: dict[str, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    """The model and the KV of one shard. `backend_factory(cache)` picks local or sequence-parallel attention."""

    def __init__(self, loaded: LoadedModel, layout: ShardLayout, shard: int = 0,
                 backend_factory: Callable[[PagedKVCache], AttentionBackend] | None = None):
        self.model, self.args, self.device = loaded.model, loaded.args, loaded.device
        self.layout, self.shard = layout, shard
        self.cache = PagedKVCache(loaded.args, layout.blocks_per_shard, layout.block_size, loaded.device, loaded.dtype)
        make_backend = backend_factory or (lambda cache: LocalPagedAttention(cache, loaded.args.n_layers))
        self.backend = make_backend(self.cache)
        self._slot_base = shard * layout.blocks_per_shard * layout.block_size

    def forward(self, plan: StepPlan) -> ForwardOutput:
        batch = self._select(plan)
        meta = self._meta(plan, batch)
        logit_rows, owners = self._logit_rows(plan, batch)
        self.backend.prepare(meta)
        logits = self.model(_ids(batch.tokens, self.device), meta.positions, self.backend, meta,
                            _ids(logit_rows, self.device))  # [R, V]
        return self._collect(plan, batch, logits, owners, meta)

    def _select(self, plan: StepPlan) -> _ShardBatch:
        """This shard's new tokens of every chunk, and the local slots of every request's KV here."""
        batch = _ShardBatch()
        for chunk in plan.chunks:
            start = len(batch.tokens)
            for token, pos, slot in zip(chunk.token_ids, chunk.positions, chunk.slots):
                if self.layout.shard_of_slot(slot) == self.shard:
                    batch.tokens.append(token)
                    batch.positions.append(pos)
                    batch.slots.append(slot - self._slot_base)
            batch.rows[chunk.request_id] = slice(start, len(batch.tokens))
            batch.kv_slots[chunk.request_id] = self._local_kv_slots(chunk)
        return batch

    def _local_kv_slots(self, chunk: ScheduledChunk) -> torch.Tensor:
        """Local slots [Tk_local] of the request's first kv_len tokens held here, in block-table order
        (or of the chunk's explicit kv_slots held here)."""
        if chunk.kv_slots is not None:
            return self.local_slots(chunk.kv_slots)
        bs = self.layout.block_size
        blocks = torch.tensor(chunk.block_table, dtype=torch.int64, device=self.device)  # [B]
        offsets = torch.arange(bs, device=self.device)
        positions = torch.arange(len(chunk.block_table), device=self.device).unsqueeze(1) * bs + offsets  # [B, bs]
        slots = blocks.unsqueeze(1) * bs + offsets - self._slot_base  # [B, bs]
        here = (blocks // self.layout.blocks_per_shard == self.shard).unsqueeze(1) & (positions < chunk.kv_len)
        return slots[here]

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

    def _meta(self, plan: StepPlan, batch: _ShardBatch) -> LocalStepMeta:
        segments = [
            Segment(c.request_id, batch.rows[c.request_id], batch.kv_slots[c.request_id],
                    c.return_attention and c.sample and c.shard == self.shard)
            for c in plan.chunks
        ]
        return LocalStepMeta(_ids(batch.slots, self.device), _ids(batch.positions, self.device), segments, {})

    def _logit_rows(self, plan: StepPlan, batch: _ShardBatch) -> tuple[list[int], dict[str, slice]]:
        # Project to the vocabulary only the rows someone reads: every local row of a scoring request,
        # else the last row of a sampling chunk, on the shard that holds it.
        rows: list[int] = []
        owners: dict[str, slice] = {}
        for chunk in plan.chunks:
            local = batch.rows[chunk.request_id]
            wanted = list(range(local.start, local.stop)) if chunk.prompt_logprobs else []
            if chunk.sample and chunk.shard == self.shard and not chunk.prompt_logprobs:
                wanted = [local.stop - 1]
            owners[chunk.request_id] = slice(len(rows), len(rows) + len(wanted))
            rows += wanted
        return rows, owners

    def _collect(self, plan, batch, logits, owners, meta) -> ForwardOutput:
        out = ForwardOutput()
        for chunk in plan.chunks:
            rid, mine = chunk.request_id, logits[owners[chunk.request_id]]
            if chunk.prompt_logprobs and mine.shape[0]:
                out.prompt_logprobs[rid] = _prompt_logprobs(chunk, batch.positions[batch.rows[rid]], mine)
            if chunk.sample and chunk.shard == self.shard:
                out.sample_logits[rid] = mine[-1]
            if rid in meta.attention_rows:
                out.attention[rid] = _by_position(meta.attention_rows[rid], self.cache, meta, rid)
        return out


class Sampler:
    """Sampling parameters and seeded generators of every request; turns logits into StepResults."""

    def __init__(self, eos_token_ids: tuple[int, ...], device: torch.device | str = "cpu"):
        self.eos, self.device = set(eos_token_ids), torch.device(device)
        self.params: dict[str, SamplingParams] = {}
        self.generators: dict[str, torch.Generator] = {}

    def add_request(self, request_id: str, params: SamplingParams) -> None:
        self.params[request_id] = params
        self.generators[request_id] = new_generator(params.seed, self.device)

    def release(self, request_id: str) -> None:
        self.params.pop(request_id, None)
        self.generators.pop(request_id, None)

    def finish(self, plan: StepPlan, output: ForwardOutput) -> StepResult:
        result = StepResult()
        for chunk in plan.chunks:
            rid = chunk.request_id
            if rid in output.prompt_logprobs:
                result.prompt_logprobs[rid] = [lp for _, lp in sorted(output.prompt_logprobs[rid])]
            if chunk.sample:
                try:
                    result.sampled[rid] = self._sample(chunk, output.sample_logits[rid].to(self.device),
                                                       output.attention.get(rid))
                except Exception as exc:  # one request's bad distribution must not fail its batch-mates
                    result.failed[rid] = f"sampling failed: {exc}"
        return result

    def _sample(self, chunk: ScheduledChunk, logits: torch.Tensor, attention) -> SampledToken:
        params = self.params[chunk.request_id]
        banned = ()
        if chunk.num_generated < params.min_tokens:
            banned = tuple(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos))
        entropy, logprobs = entropy_and_logprobs(logits.unsqueeze(0))
        token = sample_row(logits, params, self.generators[chunk.request_id], banned)
        return SampledToken(token, float(logprobs[0, token]), float(entropy[0]), attention)


class Worker:
    """The in-process executor: one runner holding all KV, and the sampler."""

    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int):
        self.runner = ModelRunner(loaded, ShardLayout(num_blocks, block_size))
        self.sampler = Sampler(loaded.args.eos_token_ids, loaded.device)
        self.cache = self.runner.cache

    @property
    def params(self) -> dict[str, SamplingParams]:
        return self.sampler.params

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return self.sampler.generators

    def add_request(self, request_id: str, params: SamplingParams) -> None:
        self.sampler.add_request(request_id, params)

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.sampler.finish(plan, self.runner.forward(plan))

    # The same slot interface as the Ray shard group (services/shards/group.py), for PIE documents.
    def forward(self, plan: StepPlan) -> ForwardOutput:
        return self.runner.forward(plan)

    def shift_slots(self, slots: list[int], delta: int, rotate: bool) -> None:
        self.runner.shift_slots(slots, delta, rotate)

    def copy_slots(self, source: list[int], target: list[int]) -> None:
        self.runner.copy_slots(source, target)

    def read_keys(self, layer: int, slots: list[int]) -> dict[int, torch.Tensor]:
        return self.runner.read_keys(layer, slots)

    def read_positions(self, slots: list[int]) -> dict[int, int]:
        return self.runner.read_positions(slots)


def _ids(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _prompt_logprobs(chunk: ScheduledChunk, positions: list[int], logits: torch.Tensor) -> list[tuple[int, float]]:
    """(target position, logprob of the token there) for each local row; row at position p predicts p + 1."""
    _, logprobs = entropy_and_logprobs(logits)
    known = dict(zip(chunk.positions, chunk.token_ids))
    if chunk.next_token_id is not None:
        known[chunk.positions[-1] + 1] = chunk.next_token_id
    pairs = [(i, p + 1) for i, p in enumerate(positions) if p + 1 in known]
    return [(target, float(logprobs[i, known[target]])) for i, target in pairs]


def _by_position(probs: torch.Tensor, cache: PagedKVCache, meta: LocalStepMeta, request_id: str) -> list[float]:
    """Attention probabilities re-indexed by position id (storage order is not position order)."""
    segment = next(s for s in meta.segments if s.request_id == request_id)
    positions = cache.positions[segment.kv_slots]
    dense = torch.zeros(int(positions.max()) + 1, dtype=torch.float32, device=probs.device)
    dense[positions] = probs.float()
    return dense.tolist()
