"""Type-directed headers: functions whose return type fits the hole's goal type, best first.

Fit levels (score): exact type (100); one member of a union goal, or a narrower union (90/85); same
type constructor, different arguments (70); a wider union that contains the goal, i.e. it needs a None
check (50); a container of the goal (35); and codomains: a returned Callable whose result fits, at
depth 1 or 2 (the inner fit's score minus 30 per level: exact at depth 1 is 70, at depth 2 is 40). Goals that are builtin scalars (int,
str, ...) halve the score: thousands of functions return str and say little.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from longbow.rag.codectx.python.annotations import BUILTIN_SCALARS, UNSPECIFIC, TypeShape, shape_from_text
from longbow.rag.codectx.python.definitions import Definition

MAX_HEADERS = 8
MAX_CODOMAIN_DEPTH = 2
_CONTAINERS = frozenset({"list", "set", "frozenset", "tuple", "Sequence", "Iterable", "Iterator", "dict",
                         "Mapping", "Generator", "Collection"})


@dataclass(frozen=True)
class RankedHeader:
    definition: Definition
    score: float
    reason: str


@dataclass(frozen=True)
class RankingHints:
    """What breaks ties among equally fitting functions: the hole's file and its imports, the classes
    of values in scope (their methods are callable right away), the identifier typed so far, and the
    function around the hole (left out: recursion is rarely the completion)."""

    path: str
    imported_paths: frozenset[str] = frozenset()
    receiver_classes: frozenset[str] = frozenset()
    prefix: str = ""
    enclosing: tuple[str, int] = ("", 0)


@functools.lru_cache(maxsize=65536)
def _shape(text: str) -> TypeShape | None:
    return shape_from_text(text)


def rank_headers(goal_text: str, functions: list[Definition], hints: RankingHints,
                 limit: int = MAX_HEADERS) -> list[RankedHeader]:
    goal = _shape(goal_text)
    if goal is None:
        return []
    members = [m for m in goal.members() if m.head != "None"]
    if not members or all(m.head in UNSPECIFIC for m in members):
        return []
    needles = {m.head for m in members} | {"Callable"}
    ranked = []
    for function in functions:
        if not function.returns or (function.path, function.line) == hints.enclosing:
            continue
        if not any(needle in function.returns for needle in needles):  # cheap filter before parsing
            continue
        fit = _fit(_shape(function.returns), goal, 0)
        if fit is not None:
            ranked.append(RankedHeader(function, _adjusted(fit[0], function, members, hints), fit[1]))
    ranked.sort(key=lambda r: (-r.score, r.definition.path, r.definition.line))
    return ranked[:limit]


def _fit(returned: TypeShape | None, goal: TypeShape, depth: int) -> tuple[float, str] | None:
    if returned is None or returned.head in UNSPECIFIC:
        return None
    goal_members = [m for m in goal.members() if m.head != "None"] or list(goal.members())
    if returned == goal:
        return 100.0, "exact"
    if returned in goal_members:
        return 90.0, "member"
    if returned.head == "Union" and all(m in goal.members() for m in returned.members()):
        return 85.0, "member"
    if any(returned.head == m.head for m in goal_members):
        return 70.0, "constructor"
    if returned.head == "Union" and any(m in returned.members() for m in goal_members):
        return 50.0, "wider"
    if depth < MAX_CODOMAIN_DEPTH and returned.head == "Callable" and len(returned.args) == 2:
        inner = _fit(returned.args[1], goal, depth + 1)
        if inner is not None:
            return inner[0] - 30.0, inner[1] if inner[1].startswith("codomain") else f"codomain:{depth + 1}"
    if depth == 0 and returned.head in _CONTAINERS and any(m in returned.args for m in goal_members):
        return 35.0, "container"
    return None


def _adjusted(score: float, function: Definition, members: list[TypeShape], hints: RankingHints) -> float:
    if all(m.head in BUILTIN_SCALARS for m in members):
        score *= 0.5
    if function.path == hints.path:
        score += 5
    elif function.path in hints.imported_paths:
        score += 3
    if function.owner and function.owner in hints.receiver_classes:
        score += 4
    if hints.prefix and function.name.startswith(hints.prefix):
        score += 10
    return score - 0.5 * len(function.params)
