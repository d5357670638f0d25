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
from collections import deque
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

    def chunks(self, allowance: int, key_rows: int | None = None) -> list[ScheduledChunk]:
        """Chunks of the waiting passes, oldest job first, `allowance` tokens at most (at least one token
        when any pass waits, so documents always progress). With `key_rows`, a chunk also has at most
        key_rows // (keys it sees) rows: its attention work, which grows with the document's length, stays
        bounded, and so does the step's time."""
        chunks, left = [], max(1, allowance)
        for handle in self.active:
            if left <= 0:
                break
            kv_pass = handle.pending
            if kv_pass is None or any(f.handle is handle for f in self._in_flight.values()):
                continue
            start = handle.sent
            rows = left
            if key_rows is not None:
                rows = min(left, max(1, key_rows // max(1, len(kv_pass.visible) + start)))
            end = min(len(kv_pass.token_ids), start + rows)
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
