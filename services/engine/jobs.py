"""KV jobs: work on KV held outside requests (PIE documents of edit sessions) that runs as engine steps.

A job is a generator written as straight-line code (pie.py, services/text/sessions.py). It yields:

- a `KVPass`: tokens to encode into given cache slots, attending to given visible slots and to themselves
  causally by position. The engine splits the pass into chunks that ride in ordinary `StepPlan`s beside the
  requests of each step (SplitFuse: a document never takes a whole step while requests are running), and
  sends back the last row's logits when `want_logits` is set, else None, once every chunk has run;
- an `ExecutorCall`: one KV slot operation (`shift_slots`, `copy_slots`, `read_keys`, ...), run by the engine
  between steps; its return value is sent back.

What the generator returns is the job's result; an exception it raises is the job's error. Between its
yields the engine runs other requests and other jobs, so a job must not assume the pool or other documents
stayed still, only its own slots. Jobs with the same key run one after another in submission order (one
edit session's calls); jobs with different keys interleave, each making progress every step.

Everything here runs on the engine thread.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from longbow.services.engine.types import ScheduledChunk, StepResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVPass:
    """Encode `token_ids` at `positions` into `slots` (one each), seeing `visible` slots and themselves."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    visible: list[int]
    shard: int = 0  # the shard holding the last token's slot (it produces the logits)
    want_logits: bool = False  # send back the last row's logits [V] (on the executor's device)
    in_order: bool = False  # visible + slots hold positions 0..n-1 in this order (ScheduledChunk.kv_in_order)


@dataclass(frozen=True)
class ExecutorCall:
    """One KV slot operation on the executor: fn(executor) runs on the engine thread between steps."""

    fn: Callable[[Any], Any]


Job = Generator[Any, Any, Any]


class JobHandle:
    """A submitted job's outcome: `done`, then `result` or `error`; `on_done(handle)` runs on the engine
    thread when it ends."""

    def __init__(self, job: Job, key: str | None, on_done: Callable[["JobHandle"], None] | None):
        self.job, self.key, self.on_done = job, key, on_done
        self.done, self.result, self.error = False, None, None
        self.ident = 0
        self.pending: KVPass | None = None
        self.sent = 0  # tokens of `pending` already computed


@dataclass
class _Flight:
    handle: JobHandle
    end: int  # tokens of the pass computed once this chunk has run


class KVJobs:
    """The engine's queue of KV jobs: starts them, cuts their passes into chunks for a step's token
    allowance, and resumes them with what the step computed."""

    def __init__(self, executor):
        self.executor = executor
        self.active: list[JobHandle] = []  # started, not done (at most one per key)
        self._parked: dict[str, deque[JobHandle]] = {}  # key -> jobs waiting for the key's active job
        self._in_flight: dict[str, _Flight] = {}  # chunk request id -> its job
        self._ids = itertools.count()
        self._chunk_ids = itertools.count()

    def has_work(self) -> bool:
        return bool(self.active)

    def submit(self, job: Job, key: str | None = None,
               on_done: Callable[[JobHandle], None] | None = None) -> JobHandle:
        """Start the job now (it runs up to its first pass, so a refusal is known at once), or park it
        behind the running job with the same key."""
        handle = JobHandle(job, key, on_done)
        handle.ident = next(self._ids)
        if key is not None and any(h.key == key for h in self.active):
            self._parked.setdefault(key, deque()).append(handle)
        else:
            self._start(handle)
        return handle

    def chunks(self, allowance: int) -> list[ScheduledChunk]:
        """Chunks of the waiting passes, oldest job first, `allowance` tokens at most (at least one token
        when any pass waits, so documents always progress)."""
        chunks, left = [], max(1, allowance)
        for handle in self.active:
            if left <= 0:
                break
            kv_pass = handle.pending
            if kv_pass is None or any(f.handle is handle for f in self._in_flight.values()):
                continue
            start = handle.sent
            end = min(len(kv_pass.token_ids), start + left)
            last = end == len(kv_pass.token_ids)
            chunk_id = f"kv-job{handle.ident}-{next(self._chunk_ids)}"
            seen = (*kv_pass.visible, *kv_pass.slots[:end])
            chunks.append(ScheduledChunk(
                chunk_id, kv_pass.token_ids[start:end], kv_pass.positions[start:end], kv_pass.slots[start:end],
                block_table=[], kv_len=len(seen), sample=last and kv_pass.want_logits, num_generated=0,
                shard=kv_pass.shard, kv_slots=seen, want_logits=last and kv_pass.want_logits,
                kv_in_order=kv_pass.in_order))
            self._in_flight[chunk_id] = _Flight(handle, end)
            left -= end - start
        return chunks

    def complete(self, chunks: list[ScheduledChunk], result: StepResult) -> None:
        """The step that carried `chunks` ran: advance their passes, resume jobs whose pass is done."""
        for chunk in chunks:
            flight = self._in_flight.pop(chunk.request_id)
            handle = flight.handle
            handle.sent = flight.end
            if handle.done or handle.sent < len(handle.pending.token_ids):
                continue
            logits = result.logits.get(chunk.request_id) if chunk.want_logits else None
            if chunk.want_logits and logits is None:
                self._advance(handle, error=RuntimeError("the executor returned no logits for a document pass"))
            else:
                self._advance(handle, value=logits)

    def fail(self, chunks: list[ScheduledChunk], error: BaseException) -> None:
        """The step carrying `chunks` failed: their jobs get the error (raised inside them)."""
        for chunk in chunks:
            flight = self._in_flight.pop(chunk.request_id, None)
            if flight is not None and not flight.handle.done:
                self._advance(flight.handle, error=error)

    def fail_all(self, error: BaseException) -> None:
        """Engine shutting down: every job, running or parked, ends with `error`."""
        self._in_flight.clear()
        for handle in list(self.active):
            self._advance(handle, error=error)
        for handle in list(self.active):  # a job that caught the error and went on ends anyway
            handle.job.close()
            self._finish(handle, error=error)
        for parked in list(self._parked.values()):
            while parked:
                self._finish(parked.popleft(), error=error)

    # ---- internals -----------------------------------------------------------------------------
    def _start(self, handle: JobHandle) -> None:
        self.active.append(handle)
        self._advance(handle, value=None)

    def _advance(self, handle: JobHandle, value=None, error: BaseException | None = None) -> None:
        """Resume the job with `value` (or raise `error` in it) and run it to its next pass or its end;
        executor calls are run here, in order."""
        if handle.done:
            return
        handle.pending, handle.sent = None, 0
        while True:
            try:
                item = handle.job.throw(error) if error is not None else handle.job.send(value)
            except StopIteration as stop:
                self._finish(handle, result=stop.value)
                return
            except Exception as exc:  # the job's own failure (capacity, a bad edit): its caller gets it
                self._finish(handle, error=exc)
                return
            error = None
            if isinstance(item, KVPass):
                if not item.token_ids:
                    value = None
                    continue
                handle.pending = item
                return
            if isinstance(item, ExecutorCall):
                try:
                    value = item.fn(self.executor)
                except Exception as exc:  # raised inside the job, which may clean up
                    value, error = None, exc
                continue
            value, error = None, TypeError(f"a KV job yielded {type(item).__name__}, not KVPass or ExecutorCall")

    def _finish(self, handle: JobHandle, result=None, error: BaseException | None = None) -> None:
        handle.done, handle.result, handle.error, handle.pending = True, result, error, None
        if handle in self.active:
            self.active.remove(handle)
        if handle.on_done is not None:
            try:
                handle.on_done(handle)
            except Exception:  # a caller's callback must not stop the engine
                log.exception("KV job callback failed")
        parked = self._parked.get(handle.key) if handle.key is not None else None
        if parked:
            following = parked.popleft()
            if not parked:
                del self._parked[handle.key]
            self._start(following)


def immediate(fn: Callable[..., Any], *args) -> Job:
    """A job with no pass: fn(*args) on the engine thread, in its key's turn (e.g. closing a session
    after the edits queued before it)."""
    return fn(*args)
    yield  # a generator function: the body runs when the engine starts the job  # noqa: unreachable


class DocumentPacer:
    """How many document tokens ride in a step beside requests: as many as keep the step within `ratio` x
    the time the same requests take alone, so a long document never stalls streams by more than that.

    Steps are timed by the engine. Steps of requests alone give the base time of their mix (chunk and
    token counts; the median of the last few, as steps are noisy). Shared steps give the cost of a document
    row: their time over the base, summed over the last `window` shared steps, divided by the rows they
    carried (one step's noise divided by its one row would say nothing); it folds in the fixed cost of
    reading the document's keys and follows the document as it grows. The next shared step gets the rows
    that fit into (ratio - 1) x base at that cost: at least 1 (documents progress), at most `max_rows` and
    twice the last step's rows (one lucky step does not open the gates). A mix with no base yet, and every
    `probe_every`-th step, runs without documents to measure it; never two such steps in a row.
    `ratio` 0: no pacing, `max_rows` every step."""

    def __init__(self, max_rows: int, ratio: float, probe_every: int = 32, remembered: int = 5, window: int = 8):
        if ratio and ratio <= 1.0:
            raise ValueError(f"engine.document_step_ratio must be 0 (off) or above 1, got {ratio}")
        self.max_rows, self.ratio, self.probe_every = max_rows, ratio, probe_every
        self.remembered = remembered
        self._alone: OrderedDict[tuple[int, int], deque[float]] = OrderedDict()  # mix -> recent step seconds
        self._shared: deque[tuple[int, float]] = deque(maxlen=window)  # (rows, seconds over the base)
        self._last_rows = 1
        self._since_probe = 0

    def rows(self, mix: tuple[int, int]) -> int:
        """Document tokens for the next step, whose requests are `mix`; 0: measure the mix alone first."""
        if not self.ratio:
            return self.max_rows
        base = self._base(mix)
        if self._since_probe and (base is None or self._since_probe >= self.probe_every):
            return 0
        if base is None or not self._shared:
            return 1
        row_seconds = max(sum(extra for _, extra in self._shared), 1e-6) / sum(n for n, _ in self._shared)
        fit = math.floor((self.ratio - 1.0) * base / row_seconds)
        return max(1, min(fit, self.max_rows, 2 * self._last_rows))

    def observe(self, mix: tuple[int, int], rows: int, seconds: float) -> None:
        """A step with requests `mix` and `rows` document tokens took `seconds`."""
        if not rows:
            times = self._alone.pop(mix, None) or deque(maxlen=self.remembered)
            times.append(seconds)
            self._alone[mix] = times
            while len(self._alone) > 64:
                self._alone.popitem(last=False)
            self._since_probe = 0
            return
        self._since_probe += 1
        self._last_rows = rows
        base = self._base(mix)
        if base is not None:
            self._shared.append((rows, seconds - base))

    def _base(self, mix: tuple[int, int]) -> float | None:
        times = self._alone.get(mix)
        return statistics.median(times) if times else None
