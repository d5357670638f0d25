"""The whole context of one Python hole: parse, expected type, bindings, type closure, headers, pack."""

from __future__ import annotations

import ast

from longbow.rag.codectx.packing import TokenCounter, pack_context
from longbow.rag.codectx.python.annotations import mentioned_names, parse_annotation
from longbow.rag.codectx.python.closure import type_closure
from longbow.rag.codectx.python.definitions import Definition
from longbow.rag.codectx.python.expected import expected_type
from longbow.rag.codectx.python.headers import RankingHints, rank_headers
from longbow.rag.codectx.python.index import PythonIndex
from longbow.rag.codectx.python.parsing import parse_with_hole
from longbow.rag.codectx.python.scope import Binding, ScopeResolver
from longbow.rag.codectx.records import CodeContext, ContextItem

MAX_BINDINGS = 80


def python_context(index: PythonIndex, path: str, line: int, column: int, budget: int,
                   count_tokens: TokenCounter) -> CodeContext:
    """`path` is relative to the workspace root. Refreshes the index, reusing the hole file's parse
    when it needed no recovery (the sentinel is just one more name to the index)."""
    text = index.workspace.read(path)
    parsed = parse_with_hole(text, line, column)
    index.refresh({path: parsed.tree} if not parsed.recovered and path in index.workspace.open_files else None)
    resolver = ScopeResolver(parsed, index, path)
    expected = expected_type(resolver)
    bindings = _ordered_bindings(resolver)
    closure = type_closure(_closure_seeds(expected.text, resolver, bindings), index.resolve)
    headers = rank_headers(expected.text, index.functions(), _hints(resolver, bindings))
    context = CodeContext("python", path, line, column, expected)
    context.bindings = [_binding_item(b, path) for b in bindings]
    context.type_definitions = [definition_item(d, "type_definition") for d in closure]
    context.headers = [definition_item(h.definition, "header", h.reason) for h in headers]
    packed = pack_context(expected, context.type_definitions, context.headers, context.bindings, budget,
                          count_tokens)
    context.packed_text, context.packed_tokens, context.packed_items = packed.text, packed.tokens, packed.items
    return context


def definition_item(definition: Definition, kind: str, detail: str = "") -> ContextItem:
    text = definition.text
    if definition.owner:
        text = f"{text}  # method of {definition.owner}"
    return ContextItem(kind, definition.name, text, definition.path, definition.line, detail or definition.kind)


def _ordered_bindings(resolver: ScopeResolver) -> list[Binding]:
    """Locals first (parameters, then by line), then module names with a known type, then the rest."""
    bindings = [b for b in resolver.bindings().values() if b.name != "__longbow_hole__"]
    bindings.sort(key=lambda b: (b.scope != "local", b.type_text == "", b.kind == "import", b.line, b.name))
    return bindings[:MAX_BINDINGS]


def _binding_item(binding: Binding, path: str) -> ContextItem:
    return ContextItem("binding", binding.name, "", path, binding.line, binding.type_text)


def _closure_seeds(expected: str, resolver: ScopeResolver, bindings: list[Binding]) -> list[tuple[str, str]]:
    path = resolver.path
    seeds = [(name, path) for name in mentioned_names(parse_annotation(expected))]
    hole = resolver.parsed.hole
    if isinstance(hole, ast.Attribute):  # `obj.<cursor>`: the receiver's class is what the user needs
        seeds += [(name, path) for name in mentioned_names(parse_annotation(resolver.type_of(hole.value)))]
    for binding in bindings:
        if binding.kind != "import" and binding.type_text and not binding.type_text.startswith("("):
            seeds += [(name, path) for name in mentioned_names(parse_annotation(binding.type_text))]
    return seeds


def _hints(resolver: ScopeResolver, bindings: list[Binding]) -> RankingHints:
    index, path = resolver.index, resolver.path
    imported = {index.module_path(module) for module, _ in index.imports_of(path).values()}
    receivers = {t.split("[")[0].split(".")[-1] for t in (b.type_text for b in bindings if b.scope == "local") if t}
    enclosing = next((f for f in resolver.functions if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    return RankingHints(path, frozenset(p for p in imported if p), frozenset(receivers), resolver.parsed.prefix,
                        (path, enclosing.lineno) if enclosing is not None else ("", 0))
