"""Expected type of a Python hole, one test per context rule."""

from __future__ import annotations

import pytest

from longbow.rag.codectx.service import build_context

from .workspaces import MODELS


@pytest.mark.parametrize("code,expected,source", [
    ("def f() -> User:\n    return <|>\n", "User", "return"),
    ("def f():\n    u: Optional[User] = <|>\n", "Optional[User]", "annotated_assignment"),
    ("def f(r: Role):\n    x: Role = r\n    x = <|>\n", "Role", "declaration"),
    ("def f(r: Role):\n    return User('a', <|>)\n", "Role", "call_argument"),
    ("def f():\n    return User(name='a', role=Role.ADMIN, address=<|>)\n", "Optional[Address]", "call_argument"),
    ("def take(u: User, n: int) -> None: ...\ndef f():\n    take(u, <|>)\n", "int", "call_argument"),
    ("def f(u: User):\n    return u.role == <|>\n", "Role", "comparison"),
    ("def f(n: int):\n    return n + <|>\n", "int", "operator"),
    ("def f(r: Role = <|>): ...\n", "Role", "default"),
    ("def f() -> list[User]:\n    return [<|>]\n", "User", "return"),
    ("def f() -> UserList:\n    return <|>\n", "UserList", "return"),
    ("def f():\n    print(<|>)\n", "", "call_argument"),  # builtins are not indexed: rule known, type not
    ("def f():\n    x = 1\n    <|>\n", "", ""),
    ("def f() -> Role:\n    \"\"\"Doc.\"\"\"\n    <|>\n", "Role", "body"),
    ("def f() -> User:\n    return (<|>\n", "User", "return"),
])
def test_expected_type_rules(workspace, code, expected, source):
    hole = workspace({"app/models.py": MODELS, "app/use.py": "from app.models import *\nfrom app.models import User, Role, Address, UserList\nfrom typing import Optional\n" + code})
    found = build_context(str(hole.root), hole.path, hole.line, hole.column).expected_type
    assert (found.text, found.source) == (expected, source)


def test_method_call_argument_through_self(workspace):
    hole = workspace({"svc.py": """
        class Store:
            def save(self, key: str, size: int) -> None: ...

        class Service:
            def __init__(self, store: Store) -> None:
                self.store: Store = store

            def run(self) -> None:
                self.store.save("k", <|>)
        """})
    found = build_context(str(hole.root), hole.path, hole.line, hole.column).expected_type
    assert (found.text, found.source) == ("int", "call_argument")
