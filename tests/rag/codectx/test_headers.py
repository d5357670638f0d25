"""Type-directed headers: which functions fit the goal, and their order."""

from __future__ import annotations

from longbow.rag.codectx.python.definitions import Definition
from longbow.rag.codectx.python.headers import MAX_HEADERS, RankingHints, rank_headers


def _function(name: str, returns: str, path: str = "lib.py", line: int = 1, params=(), owner="") -> Definition:
    return Definition(name, "method" if owner else "function", path, line, f"def {name}() -> {returns}: ...",
                      params=params, returns=returns, owner=owner)


def _ranked(goal: str, functions, **hints):
    return [(r.definition.name, r.reason) for r in rank_headers(goal, functions, RankingHints("use.py", **hints))]


def test_fit_levels_in_order():
    functions = [_function("container", "list[User]"), _function("wider", "Optional[User]"),
                 _function("exact", "User"), _function("codomain", "Callable[[str], User]"),
                 _function("codomain2", "Callable[[], Callable[[int], User]]"), _function("other", "Role"),
                 _function("anything", "Any")]
    assert _ranked("User", functions) == [("exact", "exact"), ("codomain", "codomain:1"), ("wider", "wider"),
                                          ("codomain2", "codomain:2"), ("container", "container")]


def test_union_goal_accepts_members_and_generics_by_constructor():
    functions = [_function("user", "User"), _function("nothing", "None"), _function("users", "list[int]")]
    assert _ranked("User | None", functions) == [("user", "member")]
    assert _ranked("list[User]", functions) == [("users", "constructor")]


def test_ties_break_by_file_receiver_prefix_then_location():
    functions = [_function("b", "User", "z.py", 1), _function("a", "User", "a.py", 9),
                 _function("local", "User", "use.py", 5), _function("meth", "User", "m.py", 1, owner="Repo"),
                 _function("find_user", "User", "q.py", 1)]
    assert [name for name, _ in _ranked("User", functions, receiver_classes=frozenset({"Repo"}), prefix="find")] == \
        ["find_user", "local", "meth", "a", "b"]


def test_builtin_goals_rank_below_user_types_and_top_8():
    functions = [_function(f"f{i}", "int", line=i) for i in range(20)]
    ranked = rank_headers("int", functions, RankingHints("use.py"))
    assert len(ranked) == MAX_HEADERS and ranked[0].score == 50.0
    assert rank_headers("Any", functions, RankingHints("use.py")) == []


def test_enclosing_function_is_left_out():
    functions = [_function("me", "User", "use.py", 3), _function("other", "User", "x.py", 1)]
    assert _ranked("User", functions, enclosing=("use.py", 3)) == [("other", "exact")]
