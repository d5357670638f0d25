"""KV jobs (services/engine/jobs.py): document passes ride in the engine's steps beside requests.

Unit tests drive `KVJobs` with a recording executor (what chunks it cuts, what it sends back, ordering by
key, errors); the integration tests run the real model: a document encoded beside a decoding request
leaves the request's greedy output unchanged and the document's keys equal a document encoded alone,
every step carries the request's token and at most `document_tokens` document tokens, and through the
asyncio engine a stream keeps getting tokens while a session opens.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from longbow.services.config import EngineConfig, LongbowConfig, SessionsConfig
from longbow.services.engine.engine import AsyncLLMEngine, LLMEngine
from longbow.services.engine.errors import EngineError
from longbow.services.engine.jobs import ExecutorCall, KVJobs, KVPass, immediate
from longbow.services.engine.pie import DocumentKV
from longbow.services.engine.types import Request, SamplingParams, StepResult
from longbow.services.text.sessions import SessionManager


# ---- KVJobs alone -----------------------------------------------------------------------------------
class Recorder:
    """An executor stand-in for slot operations: records calls, returns what it is told."""

    def __init__(self):
        self.calls = []

    def read_positions(self, slots):
        self.calls.append(("read_positions", list(slots)))
        return {s: i for i, s in enumerate(slots)}


def _encode(n: int, visible: list[int], log: list, want_logits: bool = False):
    slots = list(range(100, 100 + n))
    got = yield KVPass(list(range(n)), list(range(len(visible), len(visible) + n)), slots, visible,
                       want_logits=want_logits, in_order=True)
    log.append(got)
    return "done"


def _result_for(chunks, logits_value=None) -> StepResult:
    result = StepResult()
    for chunk in chunks:
        if chunk.want_logits:
            result.logits[chunk.request_id] = logits_value
    return result


def test_a_pass_is_cut_to_the_allowance_and_resumed_once_with_its_logits():
    jobs, log = KVJobs(Recorder()), []
    handle = jobs.submit(_encode(10, [7, 8], log, want_logits=True))
    seen = []
    for allowance in (4, 4, 4):
        [chunk] = jobs.chunks(allowance)
        seen.append(chunk)
        jobs.complete([chunk], _result_for([chunk], logits_value="LOGITS"))
    assert [c.token_ids for c in seen] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [c.positions[0] for c in seen] == [2, 6, 10]
    # each chunk sees the visible slots and every slot of the pass up to its own last token
    assert [c.kv_slots for c in seen] == [(7, 8, *range(100, 104)), (7, 8, *range(100, 108)),
                                          (7, 8, *range(100, 110))]
    assert [c.want_logits for c in seen] == [False, False, True] and seen[-1].sample
    assert all(c.kv_in_order for c in seen)
    assert log == ["LOGITS"] and handle.done and handle.result == "done" and not jobs.has_work()


def test_key_rows_shrink_chunks_as_the_document_grows_but_never_stop_it():
    jobs, log = KVJobs(Recorder()), []
    jobs.submit(_encode(40, list(range(8)), log))
    sizes = []
    while jobs.has_work():
        [chunk] = jobs.chunks(16, key_rows=96)
        seen_before = len(chunk.kv_slots) - len(chunk.token_ids)
        assert len(chunk.token_ids) == min(16, max(1, 96 // seen_before), 40 - sum(sizes))
        sizes.append(len(chunk.token_ids))
        jobs.complete([chunk], _result_for([chunk]))
    # 8 keys seen: 12 rows; then 20 keys: 4; 24: 4; ... past 96 keys seen it would still give 1 row
    assert sizes[:3] == [12, 4, 4] and sum(sizes) == 40 and sizes == sorted(sizes, reverse=True)
    jobs.submit(_encode(40, list(range(8)), log))
    assert len(jobs.chunks(16)[0].token_ids) == 16  # without key_rows: the whole allowance


def test_executor_calls_run_between_passes_and_their_results_come_back():
    def job():
        positions = yield ExecutorCall(lambda executor: executor.read_positions([5, 6]))
        return positions

    recorder = Recorder()
    handle = KVJobs(recorder).submit(job())
    assert handle.done and handle.result == {5: 0, 6: 1} and recorder.calls == [("read_positions", [5, 6])]


def test_jobs_with_one_key_run_in_order_while_other_keys_interleave():
    jobs, order = KVJobs(Recorder()), []

    def job(name, n):
        order.append(f"{name} starts")
        yield KVPass(list(range(n)), list(range(n)), list(range(n)), [])
        order.append(f"{name} ends")

    first = jobs.submit(job("a1", 4), key="a")
    second = jobs.submit(job("a2", 4), key="a")  # parked behind a1: not started
    other = jobs.submit(job("b", 4), key="b")
    assert order == ["a1 starts", "b starts"] and not second.done
    chunks = jobs.chunks(100)
    assert len(chunks) == 2  # a1 and b in the same step
    jobs.complete(chunks, StepResult())
    assert first.done and other.done and order == ["a1 starts", "b starts", "a1 ends", "a2 starts", "b ends"]
    jobs.complete(jobs.chunks(100), StepResult())
    assert second.done and order[-1] == "a2 ends"


def test_a_failed_step_raises_inside_its_jobs_and_shutdown_ends_parked_ones():
    jobs, cleaned = KVJobs(Recorder()), []

    def job():
        try:
            yield KVPass([1, 2], [0, 1], [10, 11], [])
        finally:
            cleaned.append(True)

    running = jobs.submit(job(), key="k")
    parked = jobs.submit(job(), key="k")
    chunks = jobs.chunks(8)
    jobs.fail(chunks, EngineError("shard lost"))
    assert running.done and isinstance(running.error, EngineError) and cleaned == [True]
    assert not parked.done and jobs.has_work()  # the next job of the key started
    jobs.fail_all(EngineError("engine is shut down"))
    assert parked.done and isinstance(parked.error, EngineError) and not jobs.has_work()


def test_a_job_that_raises_reports_its_error_and_a_passless_job_ends_at_submit():
    def bad():
        raise ValueError("bad edit")
        yield  # pragma: no cover

    jobs = KVJobs(Recorder())
    handle = jobs.submit(bad())
    assert handle.done and isinstance(handle.error, ValueError)
    assert jobs.submit(immediate(lambda x: x * 2, 21)).result == 42


# ---- the real model ----------------------------------------------------------------------------------
class PlanLog:
    """Wraps the engine's executor and records each executed plan's chunks."""

    def __init__(self, inner):
        self.inner, self.plans = inner, []

    def execute(self, plan):
        self.plans.append([(c.request_id, len(c.token_ids)) for c in plan.chunks])
        return self.inner.execute(plan)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _engine(loaded_model, document_tokens=16):
    config = LongbowConfig(engine=EngineConfig(token_budget=128, block_size=16, num_blocks=256,
                                               document_tokens=document_tokens))
    return LLMEngine(config, loaded_model)


@pytest.mark.slow
def test_a_document_encoded_beside_a_decoding_request_changes_neither(loaded_model, tokenizer):
    prompt = tokenizer("The history of the lighthouse begins", add_special_tokens=False).input_ids
    document = tokenizer("def area(radius):\n    return 3.14159 * radius ** 2\n" * 8,
                         add_special_tokens=False).input_ids[:150]
    params = SamplingParams(max_tokens=24, ignore_eos=True)

    alone = _engine(loaded_model)
    [expected] = alone.generate([prompt], params)
    reference = DocumentKV.for_engine(alone, chunk_tokens=len(document))
    reference.encode(document)  # one pass, no other work

    engine = _engine(loaded_model, document_tokens=16)
    engine.executor = recorder = PlanLog(engine.executor)
    engine.jobs.executor = recorder
    engine.add_request(Request("r", prompt, params))
    tokens = [e.token_id for e in engine.step() if e.token_id is not None]  # prompt prefill, first token
    doc = DocumentKV.for_engine(engine)
    handle = engine.submit_job(doc.encode_job(document))
    shared_steps = 0
    while not handle.done:
        events = engine.step()
        tokens += [e.token_id for e in events if e.token_id is not None]
        shared_steps += 1
    assert handle.error is None
    while engine.has_unfinished():
        tokens += [e.token_id for e in engine.step() if e.token_id is not None]

    # every step while the document encoded carried the request's decode and <= 16 document tokens
    during = recorder.plans[1:1 + shared_steps]
    assert all(("r", 1) in plan for plan in during)
    assert all(sum(n for rid, n in plan if rid != "r") <= 16 for plan in during)
    assert shared_steps == -(-len(document) // 16)
    assert tokens == expected.token_ids  # the request's greedy output is unchanged
    try:
        for layer in (0, 15, 29):
            torch.testing.assert_close(doc.keys(layer), reference.keys(layer), atol=1e-4, rtol=1e-4)
    finally:
        doc.release()
        reference.release()


@pytest.mark.slow
def test_a_stream_keeps_getting_tokens_while_a_session_opens(loaded_model, tokenizer):
    llm = _engine(loaded_model, document_tokens=32)
    engine = AsyncLLMEngine(llm)
    manager = SessionManager(llm, tokenizer, SessionsConfig())
    text = "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n" * 20
    prompt = tokenizer("Once upon a time", add_special_tokens=False).input_ids

    async def scenario():
        arrivals = []  # how many tokens the stream had when each arrived, read by a consumer task

        async def consume(stream):
            async for event in stream:
                arrivals.append(event)
                if len(arrivals) >= 200:
                    return

        stream = engine.stream(Request("s", prompt, SamplingParams(max_tokens=200, ignore_eos=True)))
        consumer = asyncio.create_task(consume(stream))
        while not arrivals:
            await asyncio.sleep(0.01)
        before, steps_before = len(arrivals), llm.steps
        session = await engine.run_job(manager.open_job(text))
        # tokens the consumer had received by the time the open returned: 0 if the open held the engine
        during, open_steps = len(arrivals) - before, llm.steps - steps_before
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await stream.aclose()
        return session, open_steps, during

    try:
        session, open_steps, during = asyncio.run(scenario())
        document_tokens = len(session.document.token_ids)
        assert open_steps >= -(-document_tokens // 32)  # the open took many steps ...
        assert during >= open_steps - 2  # ... and the stream got its token of each while the open ran
        assert asyncio.run(engine.run_job(immediate(manager.close, session.session_id))) is None
        assert asyncio.run(engine.call(lambda e: e.scheduler.kv_blocks_used)) == 0
    finally:
        engine.shutdown()
