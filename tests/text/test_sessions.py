"""Edit sessions over the real model: text edits, predictions, expiry, limits, drift re-encodes."""

from __future__ import annotations

import pytest
import torch

from longbow.services.config import EngineConfig, LongbowConfig, SessionsConfig
from longbow.services.engine.engine import LLMEngine
from longbow.services.engine.errors import CapacityError, InvalidRequestError, PromptTooLongError, UnknownRequestError
from longbow.services.engine.pie import UpdateMode
from longbow.services.text.sessions import SessionManager, TextEdit
from longbow.services.engine.types import SamplingParams

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
    manager = SessionManager(small, tokenizer, SessionsConfig())
    session = manager.open("def f(x):\n    return x + 1\n")
    with pytest.raises(CapacityError, match="session was closed"):
        manager.apply_edits(session.session_id, [TextEdit(0, 0, "y = [1, 2, 3]\n" * 12)])
    with pytest.raises(UnknownRequestError):
        manager.predict(session.session_id, 0)
    assert small.scheduler.pool.num_free == 4
