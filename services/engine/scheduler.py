"""Dynamic SplitFuse (DeepSpeed-FastGen) and a prefill-first baseline. No torch here.

The scheduler sees request ids, token ids, token counts and block ids; it decides what each forward pass
computes and where its KV goes, and turns the worker's StepResult into TokenEvents. SplitFuse fills a
fixed token budget every step: decodes first, then prompt chunks in arrival order (a long prompt is
split to fill the budget exactly; its remainder runs first next step). A prompt is admitted only when
KV for all of it fits; when a decode needs a block and none is free, the newest request holding KV is
preempted (blocks freed, recomputed later from prompt + generated tokens).

KV held outside requests (PIE documents of edit sessions, pie.py) is asked back through one hook,
`Scheduler.kv_reclaimer`, when the head of the queue does not fit; a request that cannot fit even once every
running request has finished (the rest of the cache is held outside requests and not given back) is
refused at once (FinishReason.REFUSED) instead of waiting for KV that may never come.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from longbow.services.engine.errors import UnknownRequestError
from longbow.services.engine.types import (
    FinishReason,
    Request,
    SamplingParams,
    ScheduledChunk,
    StepPlan,
    StepResult,
    TokenEvent,
)


class BlockPool:
    """Free lists of KV block ids, one per shard.

    Shard s owns global ids [s * blocks_per_shard, (s + 1) * blocks_per_shard). A request's j-th block
    (positions [j * block_size, (j + 1) * block_size)) lives on shard j % num_shards, so every request's
    KV is spread evenly over the shards; with one shard this is a plain free list.
    """

    def __init__(self, blocks_per_shard: int, num_shards: int = 1):
        self.blocks_per_shard, self.num_shards = blocks_per_shard, num_shards
        self.num_blocks = blocks_per_shard * num_shards
        self._free = [deque(range(s * blocks_per_shard, (s + 1) * blocks_per_shard)) for s in range(num_shards)]

    @property
    def num_free(self) -> int:
        return sum(len(f) for f in self._free)

    def shard_of(self, block: int) -> int:
        return block // self.blocks_per_shard

    def demand(self, n: int, start: int = 0) -> list[int]:
        """Blocks needed per shard for a request's blocks start .. start + n - 1."""
        per_shard = [0] * self.num_shards
        for j in range(start, start + n):
            per_shard[j % self.num_shards] += 1
        return per_shard

    def can_allocate(self, n: int, start: int = 0) -> bool:
        return all(need <= len(free) for need, free in zip(self.demand(n, start), self._free))

    def could_ever_hold(self, n: int) -> bool:
        return max(self.demand(n)) <= self.blocks_per_shard

    def free_per_shard(self) -> list[int]:
        return [len(f) for f in self._free]

    def allocate(self, n: int, start: int = 0) -> list[int]:
        assert self.can_allocate(n, start), "caller must check can_allocate"
        return [self._free[j % self.num_shards].popleft() for j in range(start, start + n)]

    def allocate_on_shard(self, shard: int) -> int | None:
        """One free block of the given shard, or None when that shard is full."""
        return self._free[shard].popleft() if self._free[shard] else None

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self._free[self.shard_of(block)].append(block)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is cached
    blocks: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    prompt_logprobs: list[float] = field(default_factory=list)
    sent_prompt_logprobs: bool = False

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_pending(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return bool(self.output_ids) and self.num_pending == 1


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class Scheduler:
    """Shared bookkeeping; subclasses decide what a step computes (`schedule`)."""

    def __init__(self, num_blocks: int, block_size: int, token_budget: int, max_seqs: int, eos_ids=(),
                 num_shards: int = 1):
        self.pool = BlockPool(num_blocks, num_shards)  # num_blocks per shard
        self.block_size, self.token_budget, self.max_seqs = block_size, token_budget, max_seqs
        self.eos_ids = set(eos_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self.sequences: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self._arrivals = 0
        # What the executor has not been told yet; handed over with the next plan that has chunks.
        self._unannounced: dict[str, SamplingParams] = {}
        self._finished_since_plan: list[str] = []
        # The one hook to KV held outside requests: kv_reclaimer(blocks wanted) -> blocks freed. Called on
        # the engine thread, mid-schedule: it may only release blocks to the pool (no model pass, no
        # executor call). SessionManager sets it (idle sessions evicted least-recently-used).
        self.kv_reclaimer: Callable[[int], int] | None = None
        self._refused: list[TokenEvent] = []

    # ---- requests in and out -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        seq = Sequence(request.id, list(request.token_ids), request.params, self._arrivals)
        self._arrivals += 1
        self.sequences[request.id] = seq
        self.waiting.append(seq)
        self._unannounced[request.id] = request.params

    def plan(self) -> StepPlan:
        """`schedule()`, plus the sampling parameters and endings the executor has not seen yet."""
        plan = self.schedule()
        if not plan.chunks:
            return plan
        plan.new_requests.update(self._unannounced)
        plan.finished.extend(self._finished_since_plan)
        self._unannounced, self._finished_since_plan = {}, []
        return plan

    def abort(self, request_id: str) -> TokenEvent:
        seq = self.sequences.get(request_id)
        if seq is None:
            raise UnknownRequestError(f"unknown request id {request_id!r}")
        self._finish(seq)
        return TokenEvent(request_id, None, finished=True, reason=FinishReason.ABORT)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def could_admit(self, needed: int) -> bool:
        """Whether a request of `needed` blocks gets its KV once every running request has finished, after
        asking the kv_reclaimer for what is missing. False: the rest is held outside requests and kept."""
        if self._fits_beside_held(needed):
            return True
        if self.kv_reclaimer is not None:
            self.kv_reclaimer(max(1, needed - self.pool.num_free - sum(len(s.blocks) for s in self.running)))
        return self._fits_beside_held(needed)

    def take_refused(self) -> list[TokenEvent]:
        """Requests refused at admission since the last call (their KV is held outside requests)."""
        refused, self._refused = self._refused, []
        return refused

    @property
    def kv_blocks_held_outside(self) -> int:
        """Blocks neither free nor held by a request (PIE documents)."""
        return self.kv_blocks_used - sum(len(s.blocks) for s in self.running)

    @property
    def kv_blocks_used(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    def schedule(self) -> StepPlan:
        raise NotImplementedError

    # ---- after the forward pass ----------------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> list[TokenEvent]:
        events = []
        for chunk in plan.chunks:
            seq = self.sequences[chunk.request_id]
            if chunk.request_id in result.failed:
                self._finish(seq)
                events.append(TokenEvent(seq.request_id, None, finished=True, reason=FinishReason.ERROR,
                                         error=result.failed[chunk.request_id]))
                continue
            start = seq.num_computed
            seq.num_computed += len(chunk.token_ids)
            self._record_prompt_logprobs(seq, start, result.prompt_logprobs.get(chunk.request_id, []))
            event = self._advance(seq, chunk, result)
            if event is not None:
                events.append(event)
        return events

    def _advance(self, seq: Sequence, chunk: ScheduledChunk, result: StepResult) -> TokenEvent | None:
        if seq.num_pending > 0:  # prompt not finished yet
            return None
        if seq.params.max_tokens == 0:  # scoring: done once the prompt is computed
            return self._event(seq, None, None, FinishReason.LENGTH)
        sampled = result.sampled[chunk.request_id]
        seq.output_ids.append(sampled.token_id)
        return self._event(seq, sampled, sampled.token_id, self._finish_reason(seq, sampled.token_id))

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params, n = seq.params, len(seq.output_ids)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        if token in stops and n >= params.min_tokens:
            return FinishReason.STOP
        if n >= params.max_tokens:
            return FinishReason.LENGTH
        return None

    def _event(self, seq, sampled, token, reason) -> TokenEvent:
        prompt_lp = None
        if seq.params.prompt_logprobs and not seq.sent_prompt_logprobs:
            prompt_lp, seq.sent_prompt_logprobs = list(seq.prompt_logprobs), True
        if reason is not None:
            self._finish(seq)
        return TokenEvent(
            seq.request_id, token,
            logprob=sampled.logprob if sampled else None,
            entropy=sampled.entropy if sampled else None,
            attention=sampled.attention if sampled else None,
            prompt_logprobs=prompt_lp, finished=reason is not None, reason=reason,
        )

    def _record_prompt_logprobs(self, seq: Sequence, start: int, values: list[float]) -> None:
        # values[i] is the logprob of token start+i+1. Keep prompt tokens only, once each (a preempted
        # request recomputes its prefix and would report it again).
        for i, value in enumerate(values):
            target = start + i + 1
            if target == len(seq.prompt_logprobs) + 1 and target < len(seq.prompt_ids):
                seq.prompt_logprobs.append(value)

    # ---- KV and queue bookkeeping --------------------------------------------------------------
    def _finish(self, seq: Sequence) -> None:
        if seq.status == Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status == Status.RUNNING:
            self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.status = [], Status.FINISHED
        del self.sequences[seq.request_id]
        if self._unannounced.pop(seq.request_id, None) is None:  # the executor knows it: tell it it ended
            self._finished_since_plan.append(seq.request_id)

    def _admit(self, seq: Sequence) -> bool:
        """Move the head of the queue to running if KV for its whole remaining prompt fits (asking the
        kv_reclaimer when it does not); refuse it when it never could."""
        needed = blocks_for(len(seq.all_ids), self.block_size)
        if len(self.running) >= self.max_seqs:
            return False
        if not self.pool.can_allocate(needed) and self.kv_reclaimer is not None:
            self.kv_reclaimer(max(1, needed - self.pool.num_free))
        if not self.pool.can_allocate(needed):
            if not self.could_admit(needed):
                self._refuse(seq, needed)
            return False
        self.waiting.popleft()
        seq.blocks = self.pool.allocate(needed)
        seq.status = Status.RUNNING
        self.running.append(seq)
        return True

    def _fits_beside_held(self, needed: int) -> bool:
        room = self.pool.free_per_shard()
        for seq in self.running:
            for block in seq.blocks:
                room[self.pool.shard_of(block)] += 1
        return all(want <= have for want, have in zip(self.pool.demand(needed), room))

    def _refuse(self, seq: Sequence, needed: int) -> None:
        self._finish(seq)
        self._refused.append(TokenEvent(
            seq.request_id, None, finished=True, reason=FinishReason.REFUSED,
            error=f"KV cache: the request needs {needed} blocks but {self.kv_blocks_held_outside} of "
                  f"{self.pool.num_blocks} are held by edit sessions in use; retry later"))

    def _ensure_decode_slot(self, seq: Sequence, plan_ids: set[str], preempted: list[str]) -> bool:
        """Make room for seq's next token, preempting the newest KV holders if needed."""
        while len(seq.blocks) * self.block_size < seq.num_computed + 1:
            if self.pool.can_allocate(1, len(seq.blocks)):
                seq.blocks += self.pool.allocate(1, len(seq.blocks))
                continue
            victim = next(s for s in reversed(self.running) if s.request_id not in plan_ids)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.status = [], 0, Status.WAITING
        # Victims are newer than other running requests but older than anything waiting: they go
        # to the front of the queue, newest preempted first, so arrival order is kept.
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start, ids = seq.num_computed, seq.all_ids
        end = start + n
        slots = [seq.blocks[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
        return ScheduledChunk(
            request_id=seq.request_id,
            token_ids=ids[start:end],
            positions=list(range(start, end)),
            slots=slots,
            block_table=list(seq.blocks),
            kv_len=end,
            sample=end == len(ids) and seq.params.max_tokens > 0,
            num_generated=len(seq.output_ids),
            next_token_id=ids[end] if end < len(ids) else None,
            shard=self.pool.shard_of(seq.blocks[(end - 1) // self.block_size]),
            prompt_logprobs=seq.params.prompt_logprobs,
            return_attention=seq.params.return_attention,
        )


class SplitFuseScheduler(Scheduler):
    """Fixed token budget per step: decodes, then prompt remainders, then new prompts, split to fit."""

    def schedule(self) -> StepPlan:
        budget, chunks, preempted = self.token_budget, [], []
        planned: set[str] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != Status.RUNNING or not seq.is_decoding:
                continue
            if self._ensure_decode_slot(seq, planned, preempted):
                chunks.append(self._chunk(seq, 1))
                planned.add(seq.request_id)
                budget -= 1
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status == Status.RUNNING and seq.request_id not in planned and seq.num_pending > 0:
                n = min(seq.num_pending, budget)
                chunks.append(self._chunk(seq, n))
                planned.add(seq.request_id)
                budget -= n
        while budget > 0 and self.waiting and self._admit(self.waiting[0]):
            seq = self.running[-1]
            n = min(seq.num_pending, budget)
            chunks.append(self._chunk(seq, n))
            budget -= n
        return StepPlan(chunks, preempted)


class PrefillFirstScheduler(Scheduler):
    """Continuous batching without chunking (vLLM before chunked prefill): whole prompts first,
    decodes only in steps with no prompt. A prompt longer than the budget runs alone."""

    def schedule(self) -> StepPlan:
        chunks, tokens = [], 0
        while self.waiting:
            seq = self.waiting[0]
            if chunks and tokens + seq.num_pending > self.token_budget:
                break
            if not self._admit(seq):
                break
            chunks.append(self._chunk(seq, seq.num_pending))
            tokens += seq.num_pending
        if chunks:
            return StepPlan(chunks)
        preempted: list[str] = []
        planned: set[str] = set()
        for seq in list(self.running):
            if seq.status == Status.RUNNING and self._ensure_decode_slot(seq, planned, preempted):
                chunks.append(self._chunk(seq, 1))
                planned.add(seq.request_id)
        return StepPlan(chunks, preempted)


def make_scheduler(policy: str, **kwargs) -> Scheduler:
    policies = {"splitfuse": SplitFuseScheduler, "prefill_first": PrefillFirstScheduler}
    if policy not in policies:
        raise ValueError(f"unknown scheduling policy {policy!r}; choose from {sorted(policies)}")
    return policies[policy](**kwargs)
