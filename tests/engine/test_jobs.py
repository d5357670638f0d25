"""KV jobs (services/engine/jobs.py): document passes ride in the engine's steps beside requests.

Unit tests drive `KVJobs` with a recording executor (what chunks it cuts, what it sends back, ordering by
key, errors); the integration tests run the real model: a document encoded beside a decoding request
leaves the request's greedy output unchanged and the document's keys equal a document encoded alone,
every step carries the request's token and at most `document_tokens` document tokens (paced by step time:
`DocumentPacer`, tested on a cost model), and through the
asyncio engine a stream keeps getting tokens while a session opens.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from longbow.services.config import EngineConfig, LongbowConfig, SessionsConfig
from longbow.services.engine.engine import AsyncLLMEngine, LLMEngine
from longbow.services.engine.errors import EngineError
from longbow.services.engine.jobs import DocumentPacer, ExecutorCall, KVJobs, KVPass, immediate
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


def _simulate(pacer, steps, base=0.060, fixed=lambda done: 0.0, per_row=lambda done: 0.004, mix=(1, 1),
              alone_noise=()):
    """Drive `pacer` over a document on a cost model: a step takes base + fixed + rows x per_row (the last
    two growing with the tokens done). Returns (rows, seconds) per step."""
    done, out, noise = 0, [], list(alone_noise)
    for _ in range(steps):
        rows = pacer.rows(mix)
        seconds = base + (fixed(done) + rows * per_row(done) if rows else (noise.pop(0) if noise else 0.0))
        pacer.observe(mix, rows, seconds)
        out.append((rows, seconds))
        done += rows
    return out


def test_the_pacer_keeps_shared_steps_within_the_ratio_and_documents_moving():
    pacer = DocumentPacer(max_rows=32, ratio=1.5)
    # the per-row cost and the fixed cost of reading the document's keys grow with the document
    steps = _simulate(pacer, 400, fixed=lambda done: 0.002 * done / 512, per_row=lambda done: 0.003 + done / 4e6)
    rows = [r for r, _ in steps]
    assert rows[:2] == [1, 0]  # one row while no base is known, then the requests alone to measure it
    assert all(r >= 1 for r in rows[2:] if r) and sum(rows) > 2000  # documents keep moving
    assert all(not (a == 0 and b == 0) for a, b in zip(rows, rows[1:]))  # never two steps without them
    assert all(b <= max(2 * a, 1) for a, b in zip(rows, rows[1:]) if a)  # growth at most doubles
    assert max(rows) <= 32
    late = [s for r, s in steps[8:] if r]
    # every shared step after warm-up within 1.5x the step alone (+1%: the row cost it uses is the last
    # step's, and the document has grown since)
    assert max(late) <= 1.5 * 0.060 * 1.01
    assert min(late) >= 1.3 * 0.060  # and uses most of the allowance
    probes = [i for i, (r, _) in enumerate(steps) if r == 0]
    assert all(b - a <= 33 for a, b in zip(probes, probes[1:]))  # the base is re-measured every 32 steps


def test_the_pacer_gives_one_row_when_even_one_exceeds_the_allowance_and_ignores_slow_alone_steps():
    pacer = DocumentPacer(max_rows=32, ratio=1.5)
    steps = _simulate(pacer, 50, fixed=lambda done: 0.050)  # the document's keys alone cost 50 ms > 30 ms
    assert all(r == 1 for r, _ in steps[2:] if r)
    noisy = DocumentPacer(max_rows=32, ratio=2.0, probe_every=4)
    # one slow alone step among quick ones (noise) does not move the base: the median of the last five
    steps = _simulate(noisy, 40, alone_noise=[0.0, 0.0, 0.5, 0.0, 0.0], per_row=lambda done: 0.010)
    assert max(s for r, s in steps[8:] if r) <= 2.0 * 0.060 + 1e-9


def test_under_noise_the_pacer_stays_near_its_target_and_keeps_most_of_the_rows():
    import random

    rng = random.Random(0)
    pacer, done, shared = DocumentPacer(max_rows=32, ratio=1.5), 0, []
    for _ in range(2000):  # every step's time off by up to +-20%, alone or shared
        rows = pacer.rows((1, 1))
        seconds = (0.060 + rows * 0.003) * rng.uniform(0.8, 1.2)
        pacer.observe((1, 1), rows, seconds)
        if rows:
            shared.append((rows, seconds))
    mean_rows = sum(r for r, _ in shared) / len(shared)
    assert mean_rows >= 0.75 * 10  # without noise: 10 rows (30 ms of allowance / 3 ms a row)
    times = sorted(s for _, s in shared)
    # the tail: the target times the worst noise (1.2), and at most 15% of the pacer's own overshoot
    assert times[int(0.99 * len(times))] <= 1.5 * 0.060 * 1.2 * 1.15


def test_the_pacer_measures_each_request_mix_once_and_can_be_switched_off():
    pacer = DocumentPacer(max_rows=32, ratio=1.5)
    _simulate(pacer, 5, mix=(1, 1))
    assert pacer.rows((2, 2)) == 0  # a new mix of requests: measured alone first
    pacer.observe((2, 2), 0, 0.070)
    assert pacer.rows((2, 2)) > 0 and pacer.rows((1, 1)) > 0  # both known now
    assert DocumentPacer(max_rows=24, ratio=0).rows((1, 1)) == 24
    with pytest.raises(ValueError, match="document_step_ratio"):
        DocumentPacer(max_rows=24, ratio=1.0)


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


def _engine(loaded_model, document_tokens=16, ratio=1.5):
    config = LongbowConfig(engine=EngineConfig(token_budget=128, block_size=16, num_blocks=256,
                                               document_tokens=document_tokens, document_step_ratio=ratio))
    return LLMEngine(config, loaded_model)


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0, 1.5], ids=["fixed-share", "paced"])
def test_a_document_encoded_beside_a_decoding_request_changes_neither(loaded_model, tokenizer, ratio):
    prompt = tokenizer("The history of the lighthouse begins", add_special_tokens=False).input_ids
    document = tokenizer("def area(radius):\n    return 3.14159 * radius ** 2\n" * 8,
                         add_special_tokens=False).input_ids[:150]
    params = SamplingParams(max_tokens=24, ignore_eos=True)

    alone = _engine(loaded_model)
    [expected] = alone.generate([prompt], params)
    reference = DocumentKV.for_engine(alone, chunk_tokens=len(document))
    reference.encode(document)  # one pass, no other work

    engine = _engine(loaded_model, document_tokens=16, ratio=ratio)
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
    # (paced, the request may finish first: then the document's last steps are its own)
    during = recorder.plans[1:1 + shared_steps]
    beside = [plan for plan in during if ("r", 1) in plan]
    assert beside == during[:len(beside)] and len(beside) >= min(len(during), params.max_tokens - 1)
    document_rows = [sum(n for rid, n in plan if rid != "r") for plan in beside]
    assert all(n <= 16 for n in document_rows)
    assert sum(sum(n for _, n in plan) for plan in during[len(beside):]) + sum(document_rows) == len(document)
    if ratio:  # paced: some steps measure the request alone, never two in a row
        assert 0 in document_rows and all(a or b for a, b in zip(document_rows, document_rows[1:]))
    else:
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
                if len(arrivals) >= 2000:
                    return

        # (longer than the open: cancelled when it returns)
        stream = engine.stream(Request("s", prompt, SamplingParams(max_tokens=2000, ignore_eos=True)))
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
