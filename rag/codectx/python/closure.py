"""The transitive closure of type definitions: start from the type names the hole's expected type and
its typing context mention, follow each definition's own mentions (fields, bases, alias targets,
Protocol signatures), breadth first so nearer types come first. Cycle-safe: each definition is visited
once, so `Tree = list[Tree]` or mutually recursive classes terminate."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from longbow.rag.codectx.python.definitions import Definition

MAX_CLOSURE = 64


def type_closure(seeds: list[tuple[str, str]], resolve: Callable[[str, str], Definition | None],
                 limit: int = MAX_CLOSURE) -> list[Definition]:
    """seeds: (type name, path it is mentioned from), most important first. `resolve(name, from_path)`
    finds the definition a name refers to from a file. Returns type definitions in breadth-first order."""
    queue = deque(seeds)
    visited: set[tuple[str, int]] = set()
    closure: list[Definition] = []
    while queue and len(closure) < limit:
        name, from_path = queue.popleft()
        definition = resolve(name, from_path)
        if definition is None or not definition.is_type or (definition.path, definition.line) in visited:
            continue
        visited.add((definition.path, definition.line))
        closure.append(definition)
        queue.extend((mention, definition.path) for mention in definition.mentions)
    return closure
