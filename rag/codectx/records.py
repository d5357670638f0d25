"""The typed objects code context hands out: what goes into a model's prompt and where each piece came
from. Language-neutral: the Python and TypeScript front ends both produce these."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ContextItem:
    """One piece of context with its source location (path relative to the workspace root, 1-based line).

    kind: "type_definition", "header" or "binding". For a binding, `detail` is its type; for a header,
    the reason it fits the goal ("exact", "member", "codomain:1", ...)."""

    kind: str
    name: str
    text: str
    path: str
    line: int
    detail: str = ""


@dataclass(frozen=True)
class ExpectedType:
    """The type the hole must have, rendered in the file's language; `source` names the rule that gave it
    ("return", "annotated_assignment", "call_argument", "comparison", "operator", "default", "declaration",
    or "" when unknown)."""

    text: str = ""
    source: str = ""


@dataclass
class CodeContext:
    """Everything known about one hole, and the part of it that fits the token budget (`packed`)."""

    language: str
    path: str
    line: int
    column: int
    expected_type: ExpectedType = field(default_factory=ExpectedType)
    bindings: list[ContextItem] = field(default_factory=list)
    type_definitions: list[ContextItem] = field(default_factory=list)
    headers: list[ContextItem] = field(default_factory=list)
    packed_text: str = ""
    packed_tokens: int = 0
    packed_items: list[ContextItem] = field(default_factory=list)


@dataclass(frozen=True)
class Diagnostic:
    """A type-checker finding, positions 1-based in the checked file."""

    message: str
    line: int
    column: int
    severity: str = "error"


@dataclass
class Completion:
    """A model's fill for a hole after at most `rounds_used` type-check rounds."""

    fill: str
    diagnostics: list[Diagnostic] = field(default_factory=list)
    rounds_used: int = 0
    context: CodeContext | None = None
