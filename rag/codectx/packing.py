"""Deterministic packing of context items into a token budget.

Order is fixed: the expected type line, then type definitions (closure order), then headers (rank
order), then bindings. Items are taken greedily in that order; one that does not fit is skipped and
smaller later ones may still go in. Every item is preceded by a comment with its source location.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from longbow.rag.codectx.records import ContextItem, ExpectedType

TokenCounter = Callable[[str], int]


def approximate_tokens(text: str) -> int:
    """Cheap stand-in for a tokenizer: one token per 3.5 characters (measured on this repo's Python
    code with the bundled SmolLM2 tokenizer: 3.3-3.8 characters per token)."""
    return math.ceil(len(text) / 3.5)


@dataclass
class PackedContext:
    text: str = ""
    tokens: int = 0
    items: list[ContextItem] = field(default_factory=list)


def pack_context(expected: ExpectedType, type_definitions: list[ContextItem], headers: list[ContextItem],
                 bindings: list[ContextItem], budget: int, count_tokens: TokenCounter,
                 comment: str = "#") -> PackedContext:
    packed = PackedContext()
    parts: list[str] = []
    if expected.text:
        line = f"{comment} expected type of the hole: {expected.text}\n"
        cost = count_tokens(line)
        if cost <= budget:
            parts.append(line)
            packed.tokens += cost
    for item in [*type_definitions, *headers, *bindings]:
        rendered = render_item(item, comment)
        cost = count_tokens(rendered)
        if packed.tokens + cost <= budget:
            parts.append(rendered)
            packed.tokens += cost
            packed.items.append(item)
    packed.text = "".join(parts)
    return packed


def render_item(item: ContextItem, comment: str = "#") -> str:
    if item.kind == "binding":
        return f"{item.name}: {item.detail or 'unknown'}  {comment} in scope, {item.path}:{item.line}\n"
    return f"{comment} {item.path}:{item.line}\n{item.text}\n"
