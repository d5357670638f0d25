"""Character edits -> token spans: the edited token list always equals a fresh tokenization."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longbow.services.text import edits
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


class _Recording:
    """The tokenizer, recording the length of every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)


@pytest.mark.parametrize("where,removed,replacement", [
    ("result = {}", "result", "output"),  # a word in the middle
    ("import os", "import", "from"),  # at the very start
    ("return result\n", "result", "res"),  # near the end
    ("key.strip()", ".strip()", ""),  # a deletion
    ("open(path", "", "  "),  # an insertion
])
def test_a_local_edit_re_tokenizes_a_small_window_once(tokenizer, where, removed, replacement):
    """The window around an edit (4 tokens each side) settles it: one tokenizer call on a short text, not
    a fallback to the whole document (which gives the same tokens, at the cost of the document's length)."""
    text = CODE * 8
    doc = TokenizedText.of(tokenizer, text)
    start = text.index(where, len(text) // 2 if where != "import os" else 0)
    recording = _Recording(tokenizer)
    edit = apply_edit(recording, doc, start, start + len(removed), replacement)
    assert edit.after.token_ids == _fresh(tokenizer, edit.after.text)
    assert len(recording.lengths) == 1 and recording.lengths[0] < 120, recording.lengths


def test_tokens_before_a_cursor_counts_the_tokens_that_end_there(tokenizer):
    doc = TokenizedText.of(tokenizer, CODE)
    assert doc.tokens_before(0) == 0 and doc.tokens_before(len(CODE)) == len(doc.token_ids)
    for k in (0, 5, 17, len(doc.spans) - 1):
        begin, end = doc.spans[k]
        assert doc.tokens_before(end) == k + 1
        if end - begin > 1:
            assert doc.tokens_before(end - 1) == k  # inside token k: it does not end before the cursor


def test_the_whole_text_fallback_alone_is_exact(tokenizer, monkeypatch):
    """With no windows to try, every edit takes the path a window that never settles ends in: the whole
    text re-tokenized. It must give the fresh tokenization too, at the text's start, middle and end."""
    monkeypatch.setattr(edits, "_WINDOW_STEPS", ())
    doc = TokenizedText.of(tokenizer, CODE)
    n = len(CODE)
    for start, end, replacement in [(0, 6, "from"), (0, 0, "#!"), (40, 52, "x = 1\n"), (n - 7, n, ""),
                                    (n, n, " tail"), (0, n, "z")]:
        edit = apply_edit(tokenizer, doc, start, end, replacement)
        expected = CODE[:start] + replacement + CODE[end:]
        assert edit.after.token_ids == _fresh(tokenizer, expected)
        assert edit.after.token_ids == (*doc.token_ids[:edit.start], *edit.new_ids, *doc.token_ids[edit.end:])
        spans = edit.after.spans
        assert spans[0][0] == 0 and spans[-1][1] == len(expected)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
