"""Tolerant parsing: the hole becomes an AST node even when the file around it is broken."""

from __future__ import annotations

import ast

import pytest

from longbow.rag.codectx.errors import PositionError
from longbow.rag.codectx.python.parsing import SENTINEL, parse_with_hole


def _hole(source: str) -> tuple[str, int, int]:
    before = source[: source.index("<|>")]
    return source.replace("<|>", ""), before.count("\n") + 1, len(before.rsplit("\n", 1)[-1]) + 1


def _parsed(source: str):
    text, line, column = _hole(source)
    return parse_with_hole(text, line, column)


def test_clean_file_needs_no_recovery():
    parsed = _parsed("def f() -> int:\n    return <|>\n")
    assert not parsed.recovered
    assert isinstance(parsed.parents[parsed.hole], ast.Return)


def test_partial_identifier_is_replaced_and_kept_as_prefix():
    parsed = _parsed("def f(user_name: str) -> str:\n    return us<|>\n")
    assert parsed.prefix == "us"
    assert parsed.hole.id == SENTINEL


def test_open_call_is_closed():
    parsed = _parsed("def f() -> int:\n    return max(1, <|>\n\nx = 1\n")
    call = parsed.parents[parsed.hole]
    assert isinstance(call, ast.Call) and ast.unparse(call.func) == "max"


def test_broken_lines_elsewhere_are_blanked():
    parsed = _parsed("def g(:\n    pass\n\ndef f() -> int:\n    return <|>\n\ny = = 2\n")
    assert parsed.recovered
    assert any(isinstance(n, ast.FunctionDef) and n.name == "f" for n in ast.walk(parsed.tree))


def test_attribute_hole():
    parsed = _parsed("def f(u):\n    return u.<|>\n")
    assert isinstance(parsed.hole, ast.Attribute) and parsed.hole.attr == SENTINEL


def test_multiline_call_with_trailing_argument():
    parsed = _parsed("x = foo(a,\n        <|>\n        c)\n")
    assert isinstance(parsed.parents[parsed.hole], ast.Call)


@pytest.mark.parametrize("line,column", [(0, 1), (3, 1), (1, 99)])
def test_positions_outside_the_file_are_rejected(line, column):
    with pytest.raises(PositionError):
        parse_with_hole("x = 1\n", line, column)
