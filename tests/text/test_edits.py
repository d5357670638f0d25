"""Character edits -> token spans: the edited token list always equals a fresh tokenization."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longbow.services.text.edits import TokenizedText, apply_edit
from longbow.services.engine.errors import InvalidRequestError

CODE = '''import os


def read_config(path: str) -> dict:
    """Read key = value lines."""
    result = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition("=")
            result[key.strip()] = value.strip()  # ünïcödé 😀
    return result
'''

PIECES = ["x", " ", "\n", "    ", "return", "(", ")", "é", "😀", "def f():", "  ", "\t", "12", "_", "=", "\"", "ab cd"]


def _fresh(tokenizer, text):
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_edit_equals_fresh_tokenization(tokenizer, data):
    doc = TokenizedText.of(tokenizer, CODE)
    for _ in range(data.draw(st.integers(1, 3))):
        start = data.draw(st.integers(0, len(doc.text)))
        end = data.draw(st.integers(start, min(len(doc.text), start + 40)))
        replacement = "".join(data.draw(st.lists(st.sampled_from(PIECES), max_size=6)))
        edit = apply_edit(tokenizer, doc, start, end, replacement)
        expected_text = doc.text[:start] + replacement + doc.text[end:]
        assert edit.after.text == expected_text
        assert edit.after.token_ids == _fresh(tokenizer, expected_text)
        assert edit.after.token_ids == (*doc.token_ids[:edit.start], *edit.new_ids, *doc.token_ids[edit.end:])
        spans = edit.after.spans
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert not spans or (spans[0][0] == 0 and spans[-1][1] == len(expected_text))
        doc = edit.after


def test_minimal_span_for_a_one_word_change(tokenizer):
    doc = TokenizedText.of(tokenizer, CODE)
    where = CODE.index("result = {}")
    edit = apply_edit(tokenizer, doc, where, where + len("result"), "output")
    assert edit.end - edit.start <= 2 and len(edit.new_ids) <= 2
    assert edit.start > 10 and len(doc.token_ids) - edit.end > 10


def test_edit_outside_the_text_is_rejected(tokenizer):
    doc = TokenizedText.of(tokenizer, "abc")
    with pytest.raises(InvalidRequestError):
        apply_edit(tokenizer, doc, 2, 5, "x")
    with pytest.raises(InvalidRequestError):
        apply_edit(tokenizer, doc, 3, 1, "x")


def test_edits_of_an_empty_document(tokenizer):
    doc = TokenizedText.of(tokenizer, "")
    edit = apply_edit(tokenizer, doc, 0, 0, "def f(): pass")
    assert edit.after.token_ids == _fresh(tokenizer, "def f(): pass") == edit.new_ids
    cleared = apply_edit(tokenizer, edit.after, 0, len(edit.after.text), "")
    assert cleared.after.token_ids == () and cleared.start == 0 and cleared.end == len(edit.new_ids)
