"""Edit sessions over the real model: text edits, predictions, expiry, limits, drift re-encodes."""

from __future__ import annotations

import pytest
import torch

from longbow.services.config import EngineConfig, LongbowConfig, SessionsConfig
from longbow.services.engine.engine import LLMEngine
from longbow.services.engine.errors import CapacityError, InvalidRequestError, PromptTooLongError, UnknownRequestError
from longbow.services.engine.pie import UpdateMode
from longbow.services.text.sessions import SessionManager, TextEdit
from longbow.services.engine.types import FinishReason, Request, SamplingParams

pytestmark = pytest.mark.slow

SOURCE = (
    "class Stack:\n"
    "    def __init__(self):\n"
    "        self.items = []\n\n"
    "    def push(self, item):\n"
    "        self.items.append(item)\n\n"
    "    def pop(self):\n"
    "        return self.items.pop()\n\n"
    "    def peek(self):\n"
)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def engine(loaded_model):
    return LLMEngine(LongbowConfig(engine=EngineConfig(token_budget=128, block_size=16, num_blocks=256)), loaded_model)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def manager(engine, tokenizer, clock):
    config = SessionsConfig(idle_timeout_s=60, max_sessions_per_client=2, max_sessions=3,
                            max_document_tokens=2048, drift_budget_tokens=20)
    manager = SessionManager(engine, tokenizer, config, clock)
    yield manager
    manager.close_all()
    assert engine.scheduler.kv_blocks_used == 0


def test_full_mode_predictions_equal_a_fresh_encoding(manager, engine, tokenizer):
    session = manager.open(SOURCE, mode=UpdateMode.FULL)
    edits = [TextEdit(6, 11, "Queue"), TextEdit(len(SOURCE) - 5, len(SOURCE) - 5, "ek_or_pe")]
    manager.apply_edits(session.session_id, edits)
    text = manager.text(session.session_id)
    assert text == SOURCE[:6] + "Queue" + SOURCE[11:len(SOURCE) - 5] + "ek_or_pe" + SOURCE[len(SOURCE) - 5:]
    assert session.kv.token_ids == list(tokenizer(text, add_special_tokens=False).input_ids)
    fresh = manager.open(text)
    cursor = text.index("self.items.append") + len("self.it")  # mid-token cursor
    for at, max_tokens in [(len(text), 0), (cursor, 5), (text.index("    def pop"), 6)]:
        assert manager.predict(session.session_id, at, max_tokens) == manager.predict(fresh.session_id, at, max_tokens)


def test_token_healing_at_a_line_start(manager, engine, tokenizer):
    """A cursor right after a newline takes the newline back and lets the model pick a token that starts
    with it (newline + indentation is usually one token): the body gets indented."""
    text = "def double(x):\n    return 2 * x\n\n\ndef triple(x):\n"
    session = manager.open(text)
    indent_token = tokenizer("\n    ", add_special_tokens=False).input_ids
    assert len(indent_token) == 1 and indent_token[0] in manager._tokens_starting_with("\n")
    line = manager.predict(session.session_id, len(text))
    assert line.startswith("    ") and not line.strip().startswith("#"), line
    # without healing the engine's own greedy continuation of the same tokens starts elsewhere
    [plain] = engine.generate([session.kv.token_ids], SamplingParams(max_tokens=1))
    assert plain.token_ids[0] not in manager._tokens_starting_with("\n    ")


def test_pie_session_keeps_positions_and_counts_work(manager, tokenizer):
    session = manager.open(SOURCE)
    before = len(session.kv.token_ids)
    outcome = manager.apply_edits(session.session_id, [TextEdit(0, 0, "import typing\n\n")])
    assert outcome.tokens == len(tokenizer(manager.text(session.session_id), add_special_tokens=False).input_ids)
    assert 0 < outcome.tokens_encoded < 8 and outcome.tokens > before
    assert session.kv.positions() == list(range(outcome.tokens))
    assert manager.predict(session.session_id, len(manager.text(session.session_id)), max_tokens=3)


def test_drift_budget_triggers_an_exact_reencode(manager, engine, tokenizer):
    session = manager.open(SOURCE)
    outcome = manager.apply_edits(session.session_id, [TextEdit(0, 0, "# header\n")])
    assert not outcome.reencode_due
    outcome = manager.apply_edits(session.session_id, [TextEdit(0, 0, "# a much longer header comment line, long enough to spend the whole drift budget of twenty tokens\n")])
    assert outcome.reencode_due and manager.reencode(session.session_id)
    assert not manager.reencode(session.session_id)  # nothing due any more
    fresh = manager.open(manager.text(session.session_id), mode=UpdateMode.FULL)
    for layer in (0, engine.loaded.args.n_layers - 1):
        torch.testing.assert_close(session.kv.keys(layer), fresh.kv.keys(layer), atol=1e-4, rtol=1e-5)


def test_bad_edits_change_nothing(manager):
    session = manager.open(SOURCE)
    ids = list(session.kv.token_ids)
    with pytest.raises(InvalidRequestError):
        manager.apply_edits(session.session_id, [TextEdit(0, 1, "x"), TextEdit(5, 10_000, "y")])
    assert manager.text(session.session_id) == SOURCE and session.kv.token_ids == ids
    with pytest.raises(InvalidRequestError):
        manager.predict(session.session_id, len(SOURCE) + 1)
    with pytest.raises(PromptTooLongError):
        manager.apply_edits(session.session_id, [TextEdit(0, 0, "x = 1\n" * 2000)])
    assert manager.text(session.session_id) == SOURCE


def test_unknown_sessions_limits_and_expiry(manager, clock, engine):
    with pytest.raises(UnknownRequestError):
        manager.predict("nope", 0)
    a = manager.open("a = 1\n", client="alice")
    manager.open("b = 2\n", client="alice")
    with pytest.raises(CapacityError):
        manager.open("c = 3\n", client="alice")
    manager.open("d = 4\n", client="bob")
    with pytest.raises(CapacityError):  # the server-wide limit
        manager.open("e = 5\n", client="carol")
    clock.now += 30
    manager.predict(a.session_id, 0, max_tokens=1)  # touching a session keeps it alive
    clock.now += 45
    gone = manager.expire()
    assert len(gone) == 2 and a.session_id not in gone and list(manager.sessions) == [a.session_id]
    manager.close(a.session_id)
    with pytest.raises(UnknownRequestError):
        manager.close(a.session_id)
    assert engine.scheduler.kv_blocks_used == 0


def test_a_client_idle_timeout_is_capped_by_the_server(engine, tokenizer, clock):
    config = SessionsConfig(idle_timeout_s=60, max_idle_timeout_s=120)
    manager = SessionManager(engine, tokenizer, config, clock)
    forever = manager.open("a = 1\n", idle_timeout_s=4294967295)
    short = manager.open("b = 2\n", idle_timeout_s=10)
    assert (forever.idle_timeout_s, short.idle_timeout_s) == (120, 10)
    clock.now += 121
    assert sorted(manager.expire()) == sorted([forever.session_id, short.session_id])
    assert engine.scheduler.kv_blocks_used == 0


def test_an_edit_that_overflows_the_cache_closes_the_session(loaded_model, tokenizer):
    small = LLMEngine(LongbowConfig(engine=EngineConfig(token_budget=64, block_size=16, num_blocks=4)), loaded_model)
    # the cache fills, not the sessions' budget
    manager = SessionManager(small, tokenizer, SessionsConfig(max_kv_fraction=1.0))
    session = manager.open("def f(x):\n    return x + 1\n")
    small.add_request(Request("holder", list(range(100, 148)), SamplingParams(max_tokens=8)))
    small.step()  # a request holds the other 3 blocks
    assert small.scheduler.pool.num_free == 0
    with pytest.raises(CapacityError, match="session was closed"):
        manager.apply_edits(session.session_id, [TextEdit(0, 0, "y = [1, 2, 3]\n" * 2)])
    with pytest.raises(UnknownRequestError, match="KV cache filled up during an edit"):
        manager.predict(session.session_id, 0)
    small.abort("holder")
    assert small.scheduler.pool.num_free == 4


# ---- budgets: the KV all sessions hold, eviction when KV is needed, failing fast (issue 16, item 3) ------
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau"


def _document(tokenizer, tokens: int) -> str:
    """A text of exactly `tokens` tokens."""
    ids = tokenizer((WORDS + " ") * (tokens // 10 + 2), add_special_tokens=False).input_ids[:tokens]
    text = tokenizer.decode(ids)
    assert len(tokenizer(text, add_special_tokens=False).input_ids) == tokens
    return text


@pytest.fixture
def small_engine(loaded_model):
    """32 blocks of 16: a 512-token cache."""
    config = LongbowConfig(engine=EngineConfig(token_budget=128, block_size=16, num_blocks=32))
    return LLMEngine(config, loaded_model)


def _budgeted(small_engine, tokenizer, clock, fraction: float) -> SessionManager:
    config = SessionsConfig(max_kv_fraction=fraction, evict_idle_after_s=10, idle_timeout_s=4294967295,
                            max_idle_timeout_s=4294967295)  # the "forever": only budgets bound them
    return SessionManager(small_engine, tokenizer, config, clock)


def test_sessions_stay_within_their_kv_budget(small_engine, tokenizer, clock):
    manager = _budgeted(small_engine, tokenizer, clock, fraction=0.5)  # 16 of 32 blocks
    a, b = manager.open(_document(tokenizer, 100)), manager.open(_document(tokenizer, 100))  # 7 blocks each
    assert manager.kv_blocks_held == 14 and manager.kv_budget_blocks == 16
    with pytest.raises(CapacityError, match="max_kv_fraction"):  # both in use: nothing to evict
        manager.open(_document(tokenizer, 40))
    with pytest.raises(PromptTooLongError):  # more than the whole budget: never
        manager.open(_document(tokenizer, 16 * 16 + 1))
    clock.now += 11
    manager.predict(b.session_id, 0, max_tokens=1)  # b is in use again, a is idle
    c = manager.open(_document(tokenizer, 40))
    assert list(manager.sessions) == [b.session_id, c.session_id] and manager.kv_blocks_held <= 16
    with pytest.raises(UnknownRequestError, match="evicted to free KV"):
        manager.predict(a.session_id, 0, max_tokens=1)
    manager.close_all()
    assert small_engine.scheduler.kv_blocks_used == 0


def test_a_request_evicts_idle_sessions_least_recently_used(small_engine, tokenizer, clock):
    manager = _budgeted(small_engine, tokenizer, clock, fraction=0.75)
    old, middle, recent = (manager.open(_document(tokenizer, 100)) for _ in range(3))  # 21 held, 11 free
    clock.now += 11
    manager.predict(recent.session_id, 0, max_tokens=1)  # in use: never evicted for a request
    prompt = tokenizer((WORDS + " ") * 40, add_special_tokens=False).input_ids[:250]  # 16 blocks
    small_engine.add_request(Request("needs-kv", prompt, SamplingParams(max_tokens=4, min_tokens=4)))
    events = [e for _ in range(8) for e in small_engine.step()]  # 2 prompt chunks + 3 decodes, bounded
    assert [e.token_id is not None for e in events] == [True] * 4 and events[-1].reason == FinishReason.LENGTH
    assert list(manager.sessions) == [middle.session_id, recent.session_id]  # only as many as needed
    assert manager.evictions == 1
    with pytest.raises(UnknownRequestError, match="evicted to free KV"):
        manager.apply_edits(old.session_id, [TextEdit(0, 0, "x")])
    assert manager.predict(middle.session_id, 0, max_tokens=1) is not None
    manager.close_all()
    assert small_engine.scheduler.kv_blocks_used == 0


def test_a_request_that_cannot_fit_beside_sessions_in_use_fails_at_once(small_engine, tokenizer, clock):
    manager = _budgeted(small_engine, tokenizer, clock, fraction=0.75)
    sessions = [manager.open(_document(tokenizer, 100)) for _ in range(3)]
    prompt = tokenizer((WORDS + " ") * 40, add_special_tokens=False).input_ids[:250]
    steps, used = small_engine.steps, small_engine.scheduler.kv_blocks_used
    with pytest.raises(CapacityError, match="held by edit sessions"):
        small_engine.add_request(Request("big", prompt, SamplingParams(max_tokens=4)))
    assert (small_engine.steps, small_engine.scheduler.kv_blocks_used) == (steps, used)  # no step, no KV
    assert not small_engine.has_unfinished() and list(manager.sessions) == [s.session_id for s in sessions]
    # a request that fits beside them is served as usual
    [small] = small_engine.generate([prompt[:100]], SamplingParams(max_tokens=2, min_tokens=2))
    assert len(small.token_ids) == 2
    manager.close_all()


def test_a_waiting_request_is_refused_when_sessions_took_its_kv(loaded_model, tokenizer, clock):
    """Admitted when KV was free, then sessions took it while the request queued: refused at admission
    (FinishReason.REFUSED, RESOURCE_EXHAUSTED through the gateway), not left waiting."""
    engine = LLMEngine(LongbowConfig(engine=EngineConfig(token_budget=128, block_size=16, num_blocks=32,
                                                         max_seqs=1)), loaded_model)
    manager = _budgeted(engine, tokenizer, clock, fraction=0.75)
    prompt = tokenizer((WORDS + " ") * 40, add_special_tokens=False).input_ids[:250]  # 16 blocks
    engine.add_request(Request("running", prompt[:20], SamplingParams(max_tokens=100, min_tokens=100)))
    engine.add_request(Request("queued", prompt, SamplingParams(max_tokens=4)))  # waits for max_seqs
    assert [e.id for e in engine.step()] == ["running"] and engine.stats()["waiting"] == 1
    manager.open(_document(tokenizer, 150))
    manager.open(_document(tokenizer, 150))  # 20 blocks held by sessions in use: 12 left for requests
    engine.abort("running")
    # The opens' passes rode in steps beside "running", whose tokens come out of the next step first.
    *running, refused = engine.step()
    assert running and {e.id for e in running} == {"running"} and not any(e.finished for e in running)
    assert (refused.id, refused.reason) == ("queued", FinishReason.REFUSED)
    assert "edit sessions" in refused.error
    assert not engine.has_unfinished() and engine.scheduler.kv_blocks_used == manager.kv_blocks_held
    manager.close_all()
