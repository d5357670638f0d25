"""Type closure: transitive over fields, bases and alias targets; cycles terminate; breadth first."""

from __future__ import annotations

from longbow.rag.codectx.python.closure import type_closure
from longbow.rag.codectx.python.index import PythonIndex
from longbow.rag.codectx.workspace import Workspace

from .workspaces import MODELS


def _closure(root, seeds, path="app/models.py"):
    index = PythonIndex(Workspace(root))
    index.refresh()
    return [d.name for d in type_closure([(s, path) for s in seeds], index.resolve)]


def test_closure_follows_fields_breadth_first(workspace, tmp_path):
    workspace({"app/models.py": MODELS})
    assert _closure(tmp_path, ["User"]) == ["User", "Role", "Address"]


def test_alias_cycles_terminate(workspace, tmp_path):
    workspace({"t.py": """
        from typing import Union
        Json = Union[str, int, "JsonList", "JsonDict"]
        JsonList = list["Json"]
        JsonDict = dict[str, "Json"]
        """})
    assert _closure(tmp_path, ["Json"], "t.py") == ["Json", "JsonList", "JsonDict"]


def test_mutually_recursive_classes_across_files(workspace, tmp_path):
    workspace({"a.py": "from b import B\nclass A:\n    b: 'B'\n", "b.py": "from a import A\nclass B(Base):\n    a: A\nclass Base:\n    tag: str\n"})
    assert _closure(tmp_path, ["A"], "a.py") == ["A", "B", "Base"]


def test_functions_and_unknown_names_are_not_types(workspace, tmp_path):
    workspace({"f.py": "def User() -> int: ...\n"})
    assert _closure(tmp_path, ["User", "Nowhere"], "f.py") == []


def test_protocol_pulls_in_its_signature_types(workspace, tmp_path):
    workspace({"app/models.py": MODELS})
    assert _closure(tmp_path, ["Greeter"])[:2] == ["Greeter", "User"]
