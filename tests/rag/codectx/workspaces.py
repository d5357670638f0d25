"""Hand-made workspaces for code-context tests: files written under a directory, the cursor marked `<|>`.
Shared by the unit tests (through the `workspace` fixture) and tests/integration/test_code_assist.py."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

CURSOR = "<|>"


@dataclass
class Hole:
    root: Path
    path: str
    line: int
    column: int


def write_workspace(root: Path, files: dict[str, str]) -> Hole | None:
    """Writes `files` (dedented); returns the hole of the one file that holds the cursor marker."""
    hole = None
    for relative, text in files.items():
        text = textwrap.dedent(text).lstrip("\n")
        if CURSOR in text:
            before = text[: text.index(CURSOR)]
            hole = Hole(root, relative, before.count("\n") + 1, len(before.rsplit("\n", 1)[-1]) + 1)
            text = text.replace(CURSOR, "")
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return hole


MODELS = textwrap.dedent("""
    from dataclasses import dataclass
    from enum import Enum
    from typing import Optional, Protocol, TypedDict

    class Role(Enum):
        ADMIN = "admin"
        MEMBER = "member"

    @dataclass
    class Address:
        street: str
        resident: "User | None"

    @dataclass
    class User:
        name: str
        role: Role
        address: Optional[Address]

    class UserRow(TypedDict):
        name: str
        role: str

    class Greeter(Protocol):
        def greet(self, user: User) -> str: ...

    UserList = list[User]
""").lstrip()
