"""LSP positions <-> the API's. LSP counts `character` in code units of the negotiated encoding (UTF-16
unless the client offers UTF-8 or UTF-32), lines 0-based; the API counts Unicode code points, and its
holes are 1-based (line, column). An emoji before the cursor is 2 UTF-16 units, 4 UTF-8 bytes, 1 code point.

Lines end at "\\n", "\\r\\n" or "\\r" (LSP's three line endings, nothing else: str.splitlines would also split
on form feeds and U+2028, which editors treat as ordinary characters).
"""

from __future__ import annotations

import bisect
import re

UTF8, UTF16, UTF32 = "utf-8", "utf-16", "utf-32"
_LINE_END = re.compile(r"\r\n|\r|\n")


def code_units(char: str, encoding: str) -> int:
    point = ord(char)
    if encoding == UTF16:
        return 2 if point > 0xFFFF else 1
    if encoding == UTF8:
        return 1 if point < 0x80 else 2 if point < 0x800 else 3 if point < 0x10000 else 4
    return 1


def line_starts(text: str) -> list[int]:
    """Code-point offset where each line begins (always at least one line)."""
    return [0, *(match.end() for match in _LINE_END.finditer(text))]


def line_text(text: str, starts: list[int], line: int) -> str:
    """The line's characters without its line ending."""
    end = starts[line + 1] if line + 1 < len(starts) else len(text)
    return _LINE_END.sub("", text[starts[line]:end])


def column_in_code_points(line: str, character: int, encoding: str) -> int:
    """Code points before `character` code units of `line`. Past the end clamps to the end (the spec says
    so); a position inside one character (half a surrogate pair) snaps to that character's start."""
    if encoding == UTF32:
        return min(character, len(line))
    units = 0
    for index, char in enumerate(line):
        units += code_units(char, encoding)
        if units > character:
            return index
    return len(line)


def column_in_code_units(line: str, column: int, encoding: str) -> int:
    return sum(code_units(char, encoding) for char in line[:column])


def offset_of(text: str, line: int, character: int, encoding: str, starts: list[int] | None = None) -> int:
    """Code-point offset in `text` of an LSP position; a line past the end means the end of the text."""
    starts = starts if starts is not None else line_starts(text)
    if line >= len(starts):
        return len(text)
    return starts[line] + column_in_code_points(line_text(text, starts, line), character, encoding)


def hole_of(text: str, line: int, character: int, encoding: str) -> tuple[int, int]:
    """The API's 1-based (line, column in code points) for an LSP position."""
    starts = line_starts(text)
    line = min(line, len(starts) - 1)
    return line + 1, column_in_code_points(line_text(text, starts, line), character, encoding) + 1


def position_of(text: str, offset: int, encoding: str) -> tuple[int, int]:
    """The LSP (line, character) of a code-point offset."""
    starts = line_starts(text)
    line = bisect.bisect_right(starts, offset) - 1
    return line, column_in_code_units(text[starts[line]:offset], offset - starts[line], encoding)
