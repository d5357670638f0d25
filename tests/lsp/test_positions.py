"""LSP code units <-> code points, with characters outside the BMP (2 UTF-16 units, 4 UTF-8 bytes)."""

from __future__ import annotations

import pytest

from longbow.services.lsp.positions import (UTF8, UTF16, UTF32, column_in_code_points, hole_of, line_starts,
                                            offset_of, position_of)

LINE = 'x = "😋é" + y'  # 😋: U+1F60B (2 UTF-16 units, 4 bytes); é: 1 UTF-16 unit, 2 bytes


@pytest.mark.parametrize("encoding,units_before_y", [(UTF16, 12), (UTF8, 15), (UTF32, 11)])
def test_the_same_character_in_each_encoding(encoding, units_before_y):
    assert LINE[11] == "y"
    assert column_in_code_points(LINE, units_before_y, encoding) == 11
    assert position_of(LINE, 11, encoding) == (0, units_before_y)


def test_inside_a_surrogate_pair_snaps_to_the_character_and_past_the_end_clamps():
    assert column_in_code_points(LINE, 6, UTF16) == 5  # between the two halves of 😋 (which starts at unit 5)
    assert column_in_code_points(LINE, 7, UTF16) == 6
    assert column_in_code_points(LINE, 999, UTF16) == len(LINE)


def test_three_line_endings_and_nothing_else():
    text = "a\r\nb\rc\nd\x0ce\u2028f"
    assert line_starts(text) == [0, 3, 5, 7]
    assert offset_of(text, 3, 4, UTF16) == text.index("f")  # form feed and U+2028 are ordinary characters
    assert offset_of(text, 9, 0, UTF16) == len(text)


def test_hole_is_one_based_code_points():
    text = "def f() -> str:\n    return '🎉🎉' + \n"
    line, character = 1, len("    return '🎉🎉' + ".encode("utf-16-le")) // 2
    assert hole_of(text, line, character, UTF16) == (2, len("    return '🎉🎉' + ") + 1)
