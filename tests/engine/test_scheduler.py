"""SplitFuse and prefill-first scheduling on CPU with hand-built step results (no model, no torch)."""

from __future__ import annotations

import sys

import pytest

from longbow.services.engine.errors import UnknownRequestError
from longbow.services.engine.scheduler import PrefillFirstScheduler, SplitFuseScheduler
from longbow.services.engine.types import FinishReason, Request, SampledToken, SamplingParams, StepPlan, StepResult

EOS = 2


def make(cls=SplitFuseScheduler, num_blocks=64, block_size=4, budget=16, max_seqs=8):
    return cls(num_blocks=num_blocks, block_size=block_size, token_budget=budget, max_seqs=max_seqs, eos_ids=(EOS,))


def add(s, rid, n_prompt, max_tokens=4, **kw):
    s.add(Request(rid, list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw)))


def run_step(s, token=7) -> tuple[StepPlan, list]:
    """Schedule, pretend the worker sampled `token` for every sampling chunk, update."""
    plan = s.schedule()
    result = StepResult(sampled={c.request_id: SampledToken(token, -0.5, 1.0) for c in plan.chunks if c.sample})
    return plan, s.update(plan, result)


def layout(plan):
    return [(c.request_id, len(c.token_ids)) for c in plan.chunks]


def test_scheduler_never_imports_torch():
    assert "longbow.services.engine.scheduler" in sys.modules
    import longbow.services.engine.scheduler as module

    assert "torch" not in module.__dict__ and "torch" not in vars(module).get("__builtins__", {})
    source = open(module.__file__).read()
    assert "import torch" not in source


def test_long_prompt_is_split_to_fill_budget_exactly_and_remainder_runs_first():
    s = make(budget=16)
    add(s, "a", 40)
    add(s, "b", 10)
    plan, _ = run_step(s)
    assert layout(plan) == [("a", 16)]
    plan, _ = run_step(s)
    assert layout(plan) == [("a", 16)]
    plan, _ = run_step(s)  # a's remainder (8) first, then b fills the rest exactly
    assert layout(plan) == [("a", 8), ("b", 8)]
    assert plan.num_tokens == 16
    assert plan.chunks[0].sample and not plan.chunks[1].sample
    assert plan.chunks[0].positions == list(range(32, 40))


def test_decode_first_then_prompts():
    s = make(budget=16)
    add(s, "a", 6)
    add(s, "b", 6)
    run_step(s)  # both prompts (12 tokens)
    add(s, "c", 30)
    plan, _ = run_step(s)
    assert layout(plan) == [("a", 1), ("b", 1), ("c", 14)]
    assert plan.num_tokens == 16


def test_positions_slots_and_block_table_are_consistent():
    s = make(budget=64, block_size=4)
    add(s, "a", 10)
    plan, _ = run_step(s)
    [chunk] = plan.chunks
    blocks = chunk.block_table
    assert len(blocks) == 3  # whole prompt admitted: ceil(10 / 4)
    assert chunk.slots == [blocks[p // 4] * 4 + p % 4 for p in range(10)]
    plan, _ = run_step(s)  # first decode token (position 10) lands in the third block
    assert plan.chunks[0].positions == [10]
    assert plan.chunks[0].slots == [blocks[2] * 4 + 2]


def test_admission_only_when_whole_prompt_fits():
    s = make(num_blocks=6, block_size=4, budget=8)
    add(s, "a", 16)  # 4 blocks
    add(s, "b", 12)  # 3 blocks: does not fit next to a
    plan, _ = run_step(s)
    assert layout(plan) == [("a", 8)]
    plan, _ = run_step(s)
    assert layout(plan) == [("a", 8)]
    assert [q.request_id for q in s.waiting] == ["b"]
    assert s.pool.num_free == 2


def test_preemption_frees_newest_and_recomputes_prompt_plus_output():
    s = make(num_blocks=5, block_size=2, budget=16)
    add(s, "a", 4, max_tokens=6)  # 2 blocks now, 5 at most: fits alone
    add(s, "b", 6, max_tokens=2)  # 3 blocks: the pool is now full
    run_step(s)  # prefill both, each samples its first token
    plan, _ = run_step(s)  # a needs a third block: b (newest) is preempted
    assert plan.preempted == ["b"]
    assert layout(plan) == [("a", 1)]
    assert s.num_preemptions == 1
    assert [q.request_id for q in s.waiting] == ["b"]
    b = s.sequences["b"]
    assert b.num_computed == 0 and b.blocks == [] and b.output_ids == [7]
    while "a" in s.sequences:
        run_step(s)
    plan, _ = run_step(s)  # b recomputes prompt + its generated token, then samples
    assert layout(plan) == [("b", 7)]
    assert plan.chunks[0].token_ids == [10, 11, 12, 13, 14, 15, 7] and plan.chunks[0].sample


def test_a_request_preempts_itself_when_it_is_the_newest():
    s = make(num_blocks=3, block_size=2, budget=16)
    add(s, "a", 2, max_tokens=2)
    add(s, "b", 2, max_tokens=2)
    run_step(s)
    plan, _ = run_step(s)  # a takes the last free block; b finds none and yields its own KV
    assert plan.preempted == ["b"] and layout(plan) == [("a", 1)]
    assert s.sequences["b"].blocks == []


def test_finish_by_eos_length_and_min_tokens():
    s = make()
    add(s, "eos", 3, max_tokens=5)
    add(s, "min", 3, max_tokens=5, min_tokens=2)
    _, events = run_step(s, token=EOS)
    by_id = {e.id: e for e in events}
    assert by_id["eos"].finished and by_id["eos"].reason == FinishReason.STOP
    assert not by_id["min"].finished  # eos below min_tokens does not stop
    _, events = run_step(s, token=EOS)
    assert events[0].reason == FinishReason.STOP
    add(s, "len", 3, max_tokens=2)
    run_step(s)
    _, events = run_step(s)
    assert events[0].reason == FinishReason.LENGTH and s.pool.num_free == s.pool.num_blocks


def test_abort_frees_blocks_and_unknown_id_raises():
    s = make(budget=4)
    add(s, "a", 12)
    add(s, "b", 4)
    run_step(s)
    assert s.kv_blocks_used == 3
    event = s.abort("a")
    assert event.finished and event.reason == FinishReason.ABORT
    assert s.kv_blocks_used == 0
    s.abort("b")  # still waiting
    assert not s.has_work()
    with pytest.raises(UnknownRequestError):
        s.abort("a")


def test_max_seqs_limits_running_requests():
    s = make(budget=64, max_seqs=2)
    for rid in "abc":
        add(s, rid, 3)
    plan, _ = run_step(s)
    assert layout(plan) == [("a", 3), ("b", 3)]


def test_scoring_request_finishes_after_prompt_and_collects_all_prompt_logprobs():
    s = make(budget=4)
    add(s, "score", 10, max_tokens=0, prompt_logprobs=True)
    events = []
    while s.has_work():
        plan = s.schedule()
        assert not any(c.sample for c in plan.chunks)
        result = StepResult(prompt_logprobs={
            c.request_id: [-float(p + 1) for p in c.positions[: len(c.token_ids) - (c.next_token_id is None)]]
            for c in plan.chunks
        })
        events += s.update(plan, result)
    [event] = events
    assert event.finished and event.token_id is None
    assert event.prompt_logprobs == [-float(p) for p in range(1, 10)]


def test_prefill_first_runs_whole_prompts_before_any_decode():
    s = make(PrefillFirstScheduler, budget=16)
    add(s, "a", 6)
    run_step(s)
    add(s, "b", 40)  # longer than the budget: runs alone, unsplit
    plan, _ = run_step(s)
    assert layout(plan) == [("b", 40)]
    plan, _ = run_step(s)
    assert layout(plan) == [("a", 1), ("b", 1)]


def test_splitfuse_steps_never_exceed_budget_under_random_load():
    import random

    rng = random.Random(0)
    s = make(num_blocks=40, block_size=4, budget=24, max_seqs=6)
    for i in range(30):
        add(s, f"r{i}", rng.randint(1, 60), max_tokens=rng.randint(1, 12))
    finished = set()
    for _ in range(2000):
        if not s.has_work():
            break
        plan, events = run_step(s, token=rng.choice([7, 8, EOS]))
        assert plan.num_tokens <= 24
        assert len({c.request_id for c in plan.chunks}) == len(plan.chunks)
        finished |= {e.id for e in events if e.finished}
        used = sum(len(q.blocks) for q in s.running)
        assert used + s.pool.num_free == 40
    assert finished == {f"r{i}" for i in range(30)}
