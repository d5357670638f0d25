"""Error-tolerant parsing of a file being edited, with the hole at the cursor.

The cursor's partial identifier is replaced by a sentinel name, so the hole is an AST node. When the
file does not parse (the user is mid-edit), recovery tries, in order: the hole line as typed; the hole line cut
after the sentinel with its open brackets closed; the file cut after that line. Each try also blanks
every other line the parser rejects (`pass` at the same indentation). The hole line is never blanked.
"""

from __future__ import annotations

import ast
import keyword
from dataclasses import dataclass

from longbow.rag.codectx.errors import PositionError

SENTINEL = "__longbow_hole__"
MAX_RECOVERY_STEPS = 40
_CLOSERS = {"(": ")", "[": "]", "{": "}"}


@dataclass
class ParsedHole:
    """The parsed file; `hole` is the sentinel's Name (or the Attribute whose attr is the sentinel:
    `obj.<cursor>`); `parents` maps each node to its parent; `prefix` is what the user had typed of the
    identifier at the cursor; `line` is the 1-based hole line."""

    tree: ast.Module
    hole: ast.expr
    parents: dict[ast.AST, ast.AST]
    prefix: str
    line: int
    recovered: bool

    def ancestors(self, node: ast.AST | None = None):
        node = self.parents.get(node if node is not None else self.hole)
        while node is not None:
            yield node
            node = self.parents.get(node)


def parse_with_hole(source: str, line: int, column: int) -> ParsedHole:
    """Parse `source` with a hole at 1-based (line, column); column counts characters."""
    lines = source.split("\n")
    if not 1 <= line <= len(lines):
        raise PositionError(f"line {line} is outside the file (1..{len(lines)})")
    text = lines[line - 1]
    if not 1 <= column <= len(text) + 1:
        raise PositionError(f"column {column} is outside line {line} (1..{len(text) + 1})")
    start, end = _identifier_span(text, column - 1)
    before, after = text[:start], text[end:]
    for attempt, candidate in enumerate(_candidates(lines, line - 1, before, after)):
        tree, blanked = _parse_recovering(candidate, line - 1)
        if tree is not None:
            return _located(tree, text[start:column - 1], line, attempt > 0 or blanked > 0)
    raise PositionError(f"could not parse around line {line}")  # unreachable in practice: see _candidates


def _identifier_span(text: str, index: int) -> tuple[int, int]:
    start = index
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        start -= 1
    end = index
    while end < len(text) and (text[end].isalnum() or text[end] == "_"):
        end += 1
    if keyword.iskeyword(text[start:end]) or (start < end and text[start].isdigit()):
        return index, index  # `return|` or `12|`: insert, do not replace
    return start, end


def _candidates(lines: list[str], index: int, before: str, after: str):
    hole = before + (" " if before[-1:].isalnum() else "") + SENTINEL
    yield [*lines[:index], hole + after, *lines[index + 1:]]
    closed = hole + _closers("\n".join([*lines[_statement_start(lines, index):index], before]))
    yield [*lines[:index], closed, *lines[index + 1:]]
    # NOTE: last resort, the file cut after the hole: trailing garbage can no longer matter.
    yield [*lines[:index], closed]
    yield [*lines[:index], " " * _indent(lines[index]) + SENTINEL]


def _statement_start(lines: list[str], index: int) -> int:
    """The nearest line at or above `index` that starts a top-level statement."""
    for i in range(index, -1, -1):
        text = lines[i]
        if text[:1] and not text[:1].isspace() and text[:1] not in ")]}#" and i != index:
            return i
    return 0


def _closers(text: str) -> str:
    stack: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif text.startswith(quote, i):
                i += len(quote) - 1
                quote = ""
        elif char == "#":
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
            continue
        elif char in "'\"":
            quote = char * 3 if text.startswith(char * 3, i) else char
            i += len(quote) - 1
        elif char in _CLOSERS:
            stack.append(_CLOSERS[char])
        elif char in ")]}" and stack:
            stack.pop()
        i += 1
    return "".join(reversed(stack))


def _parse_recovering(lines: list[str], hole_index: int) -> tuple[ast.Module | None, int]:
    """The tree and how many lines had to be blanked; (None, n) when the hole line itself is broken."""
    lines = list(lines)
    for blanked in range(MAX_RECOVERY_STEPS):
        try:
            return ast.parse("\n".join(lines)), blanked
        except SyntaxError as error:
            bad = (error.lineno or 1) - 1
            if bad == hole_index or not 0 <= bad < len(lines) or not lines[bad].strip():
                return None, blanked
            lines[bad] = _blanked(lines[bad], error)
        except (ValueError, RecursionError, MemoryError):
            return None, blanked
    return None, MAX_RECOVERY_STEPS


def _blanked(line: str, error: SyntaxError) -> str:
    """A stand-in for a broken line. NOTE: a broken block header (`def g(:`) becomes `if True:` so its
    body stays a valid block instead of failing line by line."""
    if isinstance(error, IndentationError) and "unexpected indent" in str(error):
        return ""
    indent = " " * _indent(line)
    return indent + ("if True:" if line.split("#")[0].rstrip().endswith(":") else "pass")


def _indent(text: str) -> int:
    return len(text) - len(text.lstrip(" \t"))


def _located(tree: ast.Module, prefix: str, line: int, recovered: bool) -> ParsedHole:
    # NOTE: parents are mapped only inside the top-level statement holding the hole: walking a whole
    # 3k-line module cost ~100 ms, most of the per-keystroke budget.
    enclosing = [n for n in tree.body if n.lineno <= line <= (n.end_lineno or n.lineno)]
    parents: dict[ast.AST, ast.AST] = {n: tree for n in tree.body}
    hole: ast.expr | None = None
    for node in _walk_toward(enclosing, line):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
        if isinstance(node, ast.Name) and node.id == SENTINEL or \
                isinstance(node, ast.Attribute) and node.attr == SENTINEL:
            hole = node
    if hole is None:  # the sentinel landed in a string or comment: the hole is the statement at that line
        hole = ast.Name(SENTINEL, ast.Load(), lineno=line, col_offset=0)
        parents[hole] = _statement_at(tree, line)
    return ParsedHole(tree, hole, parents, prefix, line, recovered)


def _walk_toward(roots: list[ast.AST], line: int):
    """Nodes on the way down to `line`: children whose line span misses it are not entered."""
    stack = list(roots)
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            start = getattr(child, "lineno", None)
            if start is None or start <= line <= (getattr(child, "end_lineno", None) or start):
                stack.append(child)


def _statement_at(tree: ast.Module, line: int) -> ast.AST:
    best: ast.AST = tree
    for node in ast.walk(tree):
        inside = isinstance(node, ast.stmt) and node.lineno <= line <= (node.end_lineno or node.lineno)
        if inside and (best is tree or node.lineno >= getattr(best, "lineno", 0)):
            best = node
    return best
