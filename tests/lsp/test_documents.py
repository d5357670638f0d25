"""Buffers follow didChange like the editor's, and each change becomes the session edit that makes the
same text (code points over the text before it)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from longbow.services.lsp.documents import TextDocument, apply_edits, minimal_edit
from longbow.services.lsp.positions import UTF16, position_of


def _document(text: str) -> TextDocument:
    return TextDocument("file:///w/a.py", None, "python", 1, text)


def test_a_utf16_range_after_an_emoji_edits_the_right_characters():
    document = _document("s = '🐍'\nreturn s\n")
    start = (1, 7)  # "s" on line 2
    edit = document.apply(start, (1, 8), "s.upper()", UTF16)
    assert document.text == "s = '🐍'\nreturn s.upper()\n"
    assert (edit.start, edit.end) == (15, 16)
    document.apply((0, 5), (0, 7), "🦀", UTF16)  # the emoji is 2 units wide
    assert document.text == "s = '🦀'\nreturn s.upper()\n"


def test_full_text_changes_become_minimal_edits():
    edit = minimal_edit("abcdef", "abXYef")
    assert (edit.start, edit.end, edit.text) == (2, 4, "XY")


@given(st.text(alphabet="ab\n😋é", max_size=12), st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 8), st.integers(0, 3), st.integers(0, 8),
              st.text(alphabet="ab\n😋", max_size=4)), max_size=5))
def test_recorded_edits_replay_to_the_same_text(text, changes):
    document = _document(text)
    for start_line, start_char, extra_lines, extra_chars, new in changes:
        start = (start_line, start_char)
        end = (start_line + extra_lines, start_char + extra_chars) if extra_lines == 0 else (start_line + extra_lines, extra_chars)
        before = document.text
        edit = document.apply(start, end, new, UTF16)
        assert document.text == before[:edit.start] + new + before[edit.end:]
    assert apply_edits(text, document.pending_edits) == document.text


def test_position_round_trip():
    text = "😋\n  x😋y\n"
    assert position_of(text, text.index("y"), UTF16) == (1, 5)
