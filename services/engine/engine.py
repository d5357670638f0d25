"""The engine: one model replica behind a request queue.

`LLMEngine` is synchronous and single-threaded (tests, benchmarks, scripts): add requests, call `step()`
until done. `AsyncLLMEngine` runs that loop on one background thread and gives asyncio callers
streams of TokenEvents (the gateway). The engine knows token ids, never text (see text.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from longbow.services.config import LongbowConfig, load_config
from longbow.services.engine.errors import (
    CapacityError,
    EngineError,
    EngineStoppedError,
    InvalidRequestError,
    PromptTooLongError,
)
from longbow.services.engine.scheduler import blocks_for, make_scheduler
from longbow.services.engine.types import FinishReason, Request, SamplingParams, TokenEvent
from longbow.services.engine.weights import LoadedModel, load_model
from longbow.services.engine.executor import Executor
from longbow.services.engine.jobs import DocumentPacer, Job, JobHandle, KVJobs
from longbow.services.engine.worker import Worker

log = logging.getLogger(__name__)


def default_token_budget(device) -> int:
    """SplitFuse's tokens per forward pass when the config leaves it at 0: 512 on CPU, where a pass over
    more tokens only adds latency, and 2048 on a GPU, which needs wide passes to be busy."""
    return 2048 if torch.device(device).type == "cuda" else 512


@dataclass
class Completion:
    """Everything one finished request produced."""

    id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    attention: list[list[float]] = field(default_factory=list)
    prompt_logprobs: list[float] | None = None
    finish_reason: FinishReason | None = None

    def add(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
            self.logprobs.append(event.logprob)
            self.entropies.append(event.entropy)
        if event.attention is not None:
            self.attention.append(event.attention)
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.finished:
            self.finish_reason = event.reason


class LLMEngine:
    """Schedule -> execute -> update, one step at a time. The engine is the only caller of its executor
    (executor.py) and, through the scheduler's BlockPool, the only owner of KV blocks. Work on KV held
    outside requests (edit sessions' documents) arrives as KV jobs (jobs.py): their passes ride in the
    same steps as requests, as many tokens per step as keep the step within `document_step_ratio` x the
    requests' time alone (jobs.DocumentPacer), `document_tokens` at most."""

    def __init__(self, config: LongbowConfig | None = None, loaded: LoadedModel | None = None,
                 executor: Executor | None = None):
        self.config = config or load_config()
        self.loaded = loaded or load_model(self.config.model)
        cfg, args = self.config.engine, self.loaded.args
        # NOTE: a sliding-window checkpoint (Mistral) is exact only up to its window, since we attend to
        # every earlier key; rather than serve silently different attention we cap the context there.
        limits = [args.max_position_embeddings, cfg.max_model_len, args.sliding_window]
        self.max_model_len = min(x for x in limits if x)
        if executor is None and cfg.shards:
            raise ValueError("engine.shards > 0 needs a shard group: build the engine with "
                             "longbow.services.replica.build_engine(config)")
        self.executor: Executor = executor or Worker(self.loaded, cfg.num_blocks, cfg.block_size,
                                                     attention=cfg.attention, decode_graphs=cfg.decode_graphs,
                                                     max_batch=cfg.max_seqs)
        self.scheduler = make_scheduler(
            cfg.policy, num_blocks=cfg.num_blocks, block_size=cfg.block_size,
            token_budget=cfg.token_budget or default_token_budget(self.loaded.device), max_seqs=cfg.max_seqs,
            eos_ids=args.eos_token_ids, num_shards=max(1, cfg.shards),
        )
        self.jobs = KVJobs(self.executor)
        budget = self.scheduler.token_budget
        self.pacer = DocumentPacer(cfg.document_tokens or max(16, budget // 16), cfg.document_step_ratio)
        self._held_events: list[TokenEvent] = []  # request events of steps a synchronous run_job took
        self._ids = itertools.count()
        self.steps = 0

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self._validate(request)
        if request.params.seed is None:  # every request samples from its own seeded stream
            request = Request(request.id, request.token_ids,
                              dataclasses.replace(request.params, seed=secrets.randbits(63)))
        self.scheduler.add(request)

    def abort(self, request_id: str) -> TokenEvent:
        return self.scheduler.abort(request_id)  # raises UnknownRequestError; the executor hears next step

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self.jobs.has_work() or bool(self._held_events)

    # ---- KV jobs (jobs.py) -----------------------------------------------------------------------
    def submit_job(self, job: Job, key: str | None = None, on_done=None) -> JobHandle:
        """Start a KV job (a document encode, edit or prediction); it runs up to its first pass now and
        then progresses with every step. Jobs with the same key run one after another."""
        return self.jobs.submit(job, key, on_done)

    def run_job(self, job: Job, key: str | None = None):
        """Run a KV job to its end by stepping the engine (synchronous callers: tests, scripts); requests
        in flight progress too, and their events come out of the next `step()`. Returns the job's result
        or raises its error."""
        handle = self.submit_job(job, key)
        while not handle.done:
            self._held_events += self._step()
        if handle.error is not None:
            raise handle.error
        return handle.result

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        held, self._held_events = self._held_events, []
        return held + self._step()

    def _step(self) -> list[TokenEvent]:
        plan = self.scheduler.plan()
        refused = self.scheduler.take_refused()  # KV held outside requests (sessions) that was not given back
        # SplitFuse for documents: beside requests a share paced by step time, so a long document never
        # stalls streams for more than a somewhat longer step; alone, the whole budget.
        mix = (len(plan.chunks), sum(len(c.token_ids) for c in plan.chunks))
        allowance = self.pacer.rows(mix) if plan.chunks else self.scheduler.token_budget
        documents = self.jobs.chunks(allowance) if allowance and self.jobs.has_work() else []
        document_rows = sum(len(c.token_ids) for c in documents)
        if not plan.chunks and not documents:
            return refused
        full = dataclasses.replace(plan, chunks=plan.chunks + documents) if documents else plan
        started = time.perf_counter()
        try:
            result = self.executor.execute(full)
        except EngineError as exc:
            self.jobs.fail(documents, exc)
            return refused + self._fail_running(exc)
        except BaseException as exc:
            self.jobs.fail(documents, exc)
            raise
        self.steps += 1
        if plan.chunks:
            self.pacer.observe(mix, document_rows, time.perf_counter() - started)
        events = self.scheduler.update(plan, result)
        self.jobs.complete(documents, result)
        return refused + events

    def _fail_running(self, error: EngineError) -> list[TokenEvent]:
        """A lost shard lost the KV of every running request: fail those (retriable), keep the queue."""
        log.warning("step failed (%s); failing %d running requests", error, len(self.scheduler.running))
        events = []
        for seq in list(self.scheduler.running):
            self.scheduler.abort(seq.request_id)
            events.append(TokenEvent(seq.request_id, None, finished=True, reason=FinishReason.ERROR, error=str(error)))
        self.executor.recover()
        return events

    def shutdown(self) -> None:
        self.jobs.fail_all(EngineStoppedError("engine is shut down"))
        self.executor.shutdown()

    # ---- conveniences --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run prompts to completion together (they share batches); results in prompt order."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        completions = {}
        for prompt, p in zip(prompts, all_params):
            rid = self.new_request_id()
            self.add_request(Request(rid, prompt, p))
            completions[rid] = Completion(rid)
        while self.has_unfinished():
            for event in self.step():
                completions[event.id].add(event)
        return list(completions.values())

    def score(self, token_ids: list[int]) -> list[float]:
        """logprob of token i given tokens < i, for i >= 1 (len(token_ids) - 1 values)."""
        [completion] = self.generate([token_ids], SamplingParams(max_tokens=0, prompt_logprobs=True))
        return completion.prompt_logprobs or []

    def stats(self) -> dict:
        s = self.scheduler
        stats = {
            "waiting": len(s.waiting), "running": len(s.running), "steps": self.steps,
            "kv_blocks_used": s.kv_blocks_used, "kv_blocks_total": s.pool.num_blocks,
            "preemptions": s.num_preemptions, "executor": self.executor.stats(),
        }
        return stats

    def _validate(self, request: Request) -> None:
        ids, params, cfg = request.token_ids, request.params, self.config.engine
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.loaded.args.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        params.validate(vocab)
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens")
        if not self.scheduler.pool.could_ever_hold(blocks_for(total, cfg.block_size)):
            raise PromptTooLongError(
                f"prompt + max_tokens ({total} tokens) exceeds the KV capacity of "
                f"{self.scheduler.pool.num_blocks * cfg.block_size} tokens")
        if request.id in self.scheduler.sequences:
            raise InvalidRequestError(f"request id {request.id!r} is already in use")
        # NOTE: KV held outside requests (edit sessions, `scheduler.kv_reclaimer`) can starve a request that
        # fits the cache: fail now (RESOURCE_EXHAUSTED) rather than let it wait silently to its deadline.
        if not self.scheduler.could_admit(blocks_for(len(ids), cfg.block_size)):
            raise CapacityError(
                f"KV cache: {len(ids)} prompt tokens need {blocks_for(len(ids), cfg.block_size)} blocks but "
                f"{self.scheduler.kv_blocks_held_outside} of {self.scheduler.pool.num_blocks} are held by "
                f"edit sessions in use; retry later")
        if len(self.scheduler.waiting) >= cfg.max_queue:
            raise CapacityError(f"engine queue is full ({cfg.max_queue} waiting requests)")


class AsyncLLMEngine:
    """Runs an LLMEngine on one background thread; asyncio callers stream TokenEvents.

    All scheduler state is touched only by the engine thread: callers submit commands through a
    queue and get events back on their own event loop.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="longbow-engine", daemon=True)
        self._thread.start()

    async def stream(self, request: Request) -> AsyncIterator[TokenEvent]:
        """Yields the request's events; leaving early (cancel, disconnect) aborts it and frees its KV."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        added = self._submit(("add", request, loop, events))
        try:
            await asyncio.wrap_future(added)  # raises the engine's validation error, if any
        except asyncio.CancelledError:
            # Cancelled while the add was queued: the engine may have added it anyway (it was already
            # running the command); an abort behind it in the queue makes sure nothing is left.
            self._submit(("abort", request.id))
            raise
        finished = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, Exception):
                    raise event
                if event.reason == FinishReason.ERROR:
                    finished = True
                    raise EngineError(event.error or "request failed")
                if event.reason == FinishReason.REFUSED:
                    finished = True
                    raise CapacityError(event.error or "KV cache is held by edit sessions")
                yield event
                if event.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._submit(("abort", request.id))

    async def generate(self, request: Request) -> Completion:
        completion = Completion(request.id)
        # aclosing: a cancelled caller must abort the request now, not when the generator is collected
        async with contextlib.aclosing(self.stream(request)) as events:
            async for event in events:
                completion.add(event)
        return completion

    async def run_job(self, job: Job, key: str | None = None):
        """Run a KV job (jobs.py) on the engine thread, its passes in the engine's steps beside other
        requests; returns its result or raises its error. Jobs with the same key run in submission order."""
        return await asyncio.wrap_future(self.submit_job(job, key))

    def submit_job(self, job: Job, key: str | None = None) -> concurrent.futures.Future:
        """Queue a KV job without waiting (background work such as a session re-encode)."""
        return self._submit(("job", job, key))

    async def call(self, fn, *args):
        """Run fn(engine, *args) on the engine thread (stats, admin) and return its result."""
        return await asyncio.wrap_future(self.call_soon(fn, *args))

    def call_soon(self, fn, *args) -> concurrent.futures.Future:
        """Queue fn(engine, *args) on the engine thread now, behind everything already queued, without
        waiting (background work such as a session re-encode)."""
        return self._submit(("call", fn, args))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._commands.put(("wake", concurrent.futures.Future()))
        self._thread.join(timeout)
        self.engine.shutdown()

    # ---- engine thread -------------------------------------------------------------------------
    def _submit(self, command: tuple) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopped.is_set():
            future.set_exception(EngineStoppedError("engine is shut down"))
            return future
        self._commands.put((*command, future))
        return future

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._drain_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._step_and_dispatch()
            except Exception:  # never let the engine thread die: every later request would hang
                log.exception("engine loop error")
        self._fail_all(EngineStoppedError("engine is shut down"))

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=None) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: tuple) -> None:
        kind, *args, future = command
        if not future.set_running_or_notify_cancel():  # the caller gave up while this was queued
            return
        try:
            if kind == "add":
                request, loop, events = args
                self.engine.add_request(request)
                self._streams[request.id] = (loop, events)
                future.set_result(None)
            elif kind == "abort":
                request_id = args[0]
                if request_id in self.engine.scheduler.sequences:
                    self._deliver(self.engine.abort(request_id))
                future.set_result(None)
            elif kind == "call":
                fn, fn_args = args
                future.set_result(fn(self.engine, *fn_args))
            elif kind == "job":
                job, key = args
                self.engine.submit_job(job, key, on_done=lambda handle: _settle(future, handle))
            else:
                future.set_result(None)
        except Exception as exc:  # the caller gets its own error; the engine goes on
            future.set_exception(exc)

    def _step_and_dispatch(self) -> None:
        try:
            events = self.engine.step()
        except Exception:
            # NOTE: a failed forward pass fails the requests in flight, never the engine thread:
            # the next request must still be served.
            log.exception("engine step failed; failing in-flight requests")
            self._fail_all(EngineError("engine step failed"))
            return
        for event in events:
            self._deliver(event)

    def _deliver(self, event: TokenEvent) -> None:
        target = self._streams.get(event.id)
        if target is None:
            return
        loop, events = target
        if event.finished:
            del self._streams[event.id]
        _post(loop, events, event)

    def _fail_all(self, error: Exception) -> None:
        self.engine.jobs.fail_all(error)
        for request_id in list(self.engine.scheduler.sequences):
            self.engine.abort(request_id)
        for loop, events in self._streams.values():
            _post(loop, events, error)
        self._streams.clear()


def _settle(future: concurrent.futures.Future, handle: JobHandle) -> None:
    if handle.error is not None:
        future.set_exception(handle.error)
    else:
        future.set_result(handle.result)


def _post(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, item) -> None:
    """Hand an item to a caller's event loop; a caller whose loop has closed just misses it (it left)."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, item)
    except RuntimeError:  # "Event loop is closed"
        pass
