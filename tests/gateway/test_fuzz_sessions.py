"""Fuzzing edit sessions over the real socket: random documents (any Unicode), random edit ranges
(inside, straddling and outside the text), random cursors.

Properties: every call ends OK or with INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED /
DEADLINE_EXCEEDED, never INTERNAL or UNKNOWN; after every accepted edit the server's token count equals
a fresh tokenization of the text the client expects (edits are applied exactly, refused edits change
nothing); an edit outside the text is INVALID_ARGUMENT exactly; closing frees every KV block. The seed
is fixed (FUZZ_SEED, printed; LONGBOW_FUZZ_SEED explores others) and a stated share of the edits drawn
must be accepted, so the run exercises applied edits, not only refusals.
"""

from __future__ import annotations

import os

import grpc
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from longbow.services.client.sdk import Edit, LongbowClient, LongbowError

pytestmark = pytest.mark.slow

_EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ_SEED = int(os.environ.get("LONGBOW_FUZZ_SEED", "19"))
MIN_ACCEPTED_SHARE = 0.3  # of all edits drawn; measured with seed 19 in docs/testing.md
_TEXT = st.text(st.characters(codec="utf-8"), max_size=30)
_CODE = st.sampled_from(["def f(x):\n    return x\n", "print('héllo 😀')\n", "", "\t\n", "a = [1, 2]\n"])


@st.composite
def edits(draw, length_hint: int):
    start = draw(st.integers(-2, length_hint + 3))
    end = draw(st.one_of(st.integers(max(start, 0), max(start, 0) + 8), st.integers(-2, length_hint + 3)))
    return Edit(max(start, 0), max(end, 0), draw(st.one_of(_TEXT, _CODE))), start < 0 or end < 0


def test_sessions_survive_random_edits(gateway, tokenizer):
    print(f"hypothesis seed {FUZZ_SEED} (LONGBOW_FUZZ_SEED)")
    outcomes = {"accepted": 0, "refused": 0}

    @seed(FUZZ_SEED)
    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        _random_session(gateway, tokenizer, data, outcomes)

    check()
    print(f"seed {FUZZ_SEED}: {outcomes}")
    assert outcomes["accepted"] >= MIN_ACCEPTED_SHARE * sum(outcomes.values()), outcomes


def _random_session(gateway, tokenizer, data, outcomes: dict[str, int]) -> None:
    with LongbowClient(gateway.address, timeout_s=10) as client:
        text = data.draw(st.one_of(_TEXT, _CODE))
        session = client.open_session(text)
        try:
            for _ in range(data.draw(st.integers(1, 4))):
                edit, _negative = data.draw(edits(len(text)))
                try:
                    result = client.apply_edits(session, [edit])
                except LongbowError as exc:
                    outcomes["refused"] += 1
                    assert exc.code in _EXPECTED, exc
                    inside = 0 <= edit.start <= edit.end <= len(text)
                    assert (exc.code != grpc.StatusCode.INVALID_ARGUMENT) if inside else (
                        exc.code == grpc.StatusCode.INVALID_ARGUMENT), (exc, edit, len(text))
                    continue
                outcomes["accepted"] += 1
                assert 0 <= edit.start <= edit.end <= len(text)
                text = text[:edit.start] + edit.text + text[edit.end:]
                assert result.tokens == len(tokenizer(text, add_special_tokens=False).input_ids)
            cursor = data.draw(st.integers(0, len(text) + 2))
            try:
                client.predict(session, cursor, max_tokens=data.draw(st.integers(0, 3)))
                assert cursor <= len(text)
            except LongbowError as exc:
                assert exc.code in _EXPECTED, exc
        finally:
            client.close_session(session)
    assert gateway.wait_until_idle()["kv_blocks_used"] == 0
