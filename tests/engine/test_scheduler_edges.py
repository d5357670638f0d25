"""Scheduler edges the main scheduler tests left open (found by scripts/mutation.sh, docs/testing.md): the
sharded block pool's arithmetic, what a plan announces to the executor, the kv_reclaimer's requests and a
refusal, a failed step, prompt logprobs across chunks, decode slots, preemption, exact budgets.
CPU only, hand-built step results, no model."""

from __future__ import annotations

import pytest

from longbow.services.engine.scheduler import (
    BlockPool,
    PrefillFirstScheduler,
    Sequence,
    SplitFuseScheduler,
    make_scheduler,
)
from longbow.services.engine.types import FinishReason, Request, SampledToken, SamplingParams, StepResult

EOS = 2


def make(cls=SplitFuseScheduler, num_blocks=64, block_size=4, budget=16, max_seqs=8):
    return cls(num_blocks=num_blocks, block_size=block_size, token_budget=budget, max_seqs=max_seqs,
               eos_ids=(EOS,))


def add(s, rid, n_prompt, max_tokens=4, **kw):
    s.add(Request(rid, list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw)))


def step(s, plan=None, **result):
    plan = plan or s.schedule()
    sampled = {c.request_id: SampledToken(7, -0.5, 1.0) for c in plan.chunks if c.sample}
    return plan, s.update(plan, StepResult(sampled=sampled, **result))


def layout(plan):
    return [(c.request_id, len(c.token_ids)) for c in plan.chunks]


# ---- the block pool ------------------------------------------------------------------------------
def test_block_pool_arithmetic_over_shards():
    pool = BlockPool(4, 3)
    assert pool.num_blocks == 12 and pool.num_free == 12
    assert pool.demand(2) == [1, 1, 0] and pool.demand(2, 1) == [0, 1, 1] and pool.demand(7) == [3, 2, 2]
    assert pool.could_ever_hold(12) and not pool.could_ever_hold(13)  # 5 blocks on shard 0 of 4
    assert pool.allocate(4) == [0, 4, 8, 1]  # block j on shard j % 3
    single = BlockPool(5)
    assert single.num_blocks == 5 and single.allocate(5) == [0, 1, 2, 3, 4] and not single.can_allocate(1)


def test_can_allocate_counts_from_block_zero_by_default():
    pool = BlockPool(1, 2)
    assert pool.allocate_on_shard(1) == 1 and pool.allocate_on_shard(1) is None  # shard 1 full, shard 0 not
    assert pool.can_allocate(1) and not pool.can_allocate(1, 1) and not pool.can_allocate(2)


def test_is_decoding_needs_an_output_and_one_pending_token():
    seq = Sequence("r", [5], SamplingParams(), 0)
    assert seq.num_pending == 1 and not seq.is_decoding  # a one-token prompt not yet computed
    seq.num_computed, seq.output_ids = 1, [9]
    assert seq.is_decoding
    seq.num_computed = 0  # preempted: the whole prefix is recomputed first
    assert not seq.is_decoding


# ---- what a plan tells the executor ----------------------------------------------------------------
def test_plan_announces_new_requests_once_and_endings_with_the_next_plan_that_has_chunks():
    s = make()
    add(s, "a", 4, max_tokens=10)
    first = s.plan()
    assert set(first.new_requests) == {"a"} and first.finished == []
    step(s, first)
    s.abort("a")
    empty = s.plan()  # nothing to run: the ending waits for a plan the executor will see
    assert empty.chunks == [] and empty.finished == []
    add(s, "b", 4)
    add(s, "c", 4)
    s.abort("c")  # never announced: the executor need not hear of it at all
    nxt = s.plan()
    assert set(nxt.new_requests) == {"b"} and nxt.finished == ["a"]
    assert s.plan().finished == []  # said once


# ---- KV held outside requests -------------------------------------------------------------------------
def _outside(s, n):
    return s.pool.allocate(n)  # what edit sessions hold


def test_admission_asks_the_reclaimer_for_what_is_missing_and_admits():
    s = make(num_blocks=8)
    held = _outside(s, 6)  # 2 free
    asked = []

    def reclaim(wanted):
        asked.append(wanted)
        s.pool.release([held.pop() for _ in range(wanted)])
        return wanted

    s.kv_reclaimer = reclaim
    add(s, "a", 12)  # 3 blocks
    plan, _ = step(s)
    assert asked == [1] and layout(plan) == [("a", 12)] and s.kv_blocks_held_outside == 5


def test_refused_when_kv_held_outside_is_kept():
    s = make(num_blocks=8)
    _outside(s, 5)
    asked = []
    s.kv_reclaimer = lambda wanted: asked.append(wanted) or 0  # sessions in use: nothing freed
    add(s, "a", 4, max_tokens=20)
    step(s)  # a's prompt on 1 block; 2 free
    add(s, "b", 16)  # 4 blocks
    plan, _ = step(s)  # a's first output takes a second block: 1 free
    assert asked == [3, 1]  # at admission: 4 - 1 free; then beside running requests: 4 - 1 - a's 2
    assert layout(plan) == [("a", 1)] and "b" not in s.sequences and not s.waiting
    [refused] = s.take_refused()
    assert refused.id == "b" and refused.finished and refused.reason == FinishReason.REFUSED
    assert "needs 4 blocks but 5 of 8 are held by edit sessions" in refused.error
    assert s.take_refused() == []


def test_on_shards_the_reclaimer_is_asked_for_at_least_one_block():
    """Two shards of 2 blocks; sessions hold all of shard 0. A 2-block request needs one block on each shard:
    as many blocks are free as it needs, yet it does not fit, so the reclaimer is asked for one, not zero."""
    s = SplitFuseScheduler(num_blocks=2, block_size=4, token_budget=16, max_seqs=4, eos_ids=(EOS,),
                           num_shards=2)
    assert [s.pool.allocate_on_shard(0) for _ in range(2)] == [0, 1]
    asked = []
    s.kv_reclaimer = lambda wanted: asked.append(wanted) or 0
    add(s, "a", 8)
    assert s.schedule().chunks == [] and asked == [1, 1]  # at admission, then beside running requests
    assert [e.id for e in s.take_refused()] == ["a"]


# ---- step results -------------------------------------------------------------------------------------
def test_a_failed_request_ends_alone_and_frees_its_kv():
    s = make()
    add(s, "a", 4)
    add(s, "b", 4)
    plan = s.schedule()
    _, events = step(s, plan, failed={"a": "worker raised"})
    [failed] = [e for e in events if e.id == "a"]
    assert failed.finished and failed.reason == FinishReason.ERROR and failed.error == "worker raised"
    assert "a" not in s.sequences and [q.request_id for q in s.running] == ["b"]
    assert s.kv_blocks_used == 1  # b's block only


def test_prompt_logprobs_across_chunks_are_sent_once():
    s = make(budget=4)
    add(s, "a", 6, max_tokens=3, prompt_logprobs=True)
    _, events = step(s, prompt_logprobs={"a": [-1.0, -2.0, -3.0, -4.0]})  # tokens 1..4 given their prefix
    assert events == []
    # the second chunk (tokens 4, 5) reports tokens 5 and 6: 6 is the first output, not a prompt token
    _, events = step(s, prompt_logprobs={"a": [-5.0, -6.0]})
    assert events[0].prompt_logprobs == [-1.0, -2.0, -3.0, -4.0, -5.0]
    _, events = step(s)
    assert events[0].prompt_logprobs is None


# ---- decode slots and preemption ----------------------------------------------------------------------
def test_decode_takes_a_new_block_only_when_the_last_one_is_full():
    s = make(block_size=4)
    add(s, "a", 3, max_tokens=5)
    step(s)  # prompt: positions 0-2 in block 0
    step(s)  # the first output (position 3) still fits block 0
    assert len(s.sequences["a"].blocks) == 1
    step(s)  # position 4: a second block
    assert len(s.sequences["a"].blocks) == 2


def test_preempted_request_leaves_running_and_goes_first_in_the_queue():
    s = make(num_blocks=2, block_size=4)
    add(s, "a", 4, max_tokens=8)
    add(s, "b", 4, max_tokens=8)
    step(s)  # both prompts: one block each, pool full
    plan, _ = step(s)  # a's first output needs a second block: b, the newest, is preempted
    assert plan.preempted == ["b"] and layout(plan) == [("a", 1)]
    assert [q.request_id for q in s.running] == ["a"] and s.waiting[0].request_id == "b"
    assert s.sequences["b"].num_computed == 0 and s.num_preemptions == 1


# ---- exact budgets ---------------------------------------------------------------------------------
def test_splitfuse_uses_the_last_token_of_the_budget_for_decodes():
    s = make(budget=2, block_size=2)
    add(s, "a", 1, max_tokens=5)
    add(s, "b", 1, max_tokens=5)
    step(s)  # both one-token prompts (position 0)
    for _ in range(2):  # positions 1, then 2: the second decode needs a new block for each request
        plan, _ = step(s)
        assert layout(plan) == [("a", 1), ("b", 1)]  # two decodes fill a budget of 2
    assert [len(s.sequences[r].blocks) for r in "ab"] == [2, 2]
    s2 = make(budget=1)
    add(s2, "x", 3)
    assert layout(s2.schedule()) == [("x", 1)]  # a budget of one still admits a prompt


def test_splitfuse_prompt_remainder_takes_the_last_budget_token():
    s = make(budget=2)
    add(s, "a", 1, max_tokens=5)
    add(s, "b", 3)
    plan, _ = step(s)
    assert layout(plan) == [("a", 1), ("b", 1)]  # b's prompt split: 1 of 3
    plan, _ = step(s)
    assert layout(plan) == [("a", 1), ("b", 1)]  # a's decode, then 1 more token of b's remainder


@pytest.mark.parametrize("prompts, expected", [
    ([8, 8], [("a", 8), ("b", 8)]),  # exactly the budget: both
    ([8, 9], [("a", 8)]),  # one token over: the second waits
    ([8, 8, 1], [("a", 8), ("b", 8)]),
])
def test_prefill_first_fills_the_budget_exactly(prompts, expected):
    s = make(PrefillFirstScheduler, budget=16)
    for rid, n in zip("abc", prompts):
        add(s, rid, n)
    assert layout(s.schedule()) == expected


def test_make_scheduler_by_name():
    assert isinstance(make_scheduler("splitfuse", num_blocks=4, block_size=4, token_budget=8, max_seqs=2),
                      SplitFuseScheduler)
    assert isinstance(make_scheduler("prefill_first", num_blocks=4, block_size=4, token_budget=8, max_seqs=2),
                      PrefillFirstScheduler)
    with pytest.raises(ValueError, match="unknown scheduling policy 'fifo'"):
        make_scheduler("fifo", num_blocks=4, block_size=4, token_budget=8, max_seqs=2)
