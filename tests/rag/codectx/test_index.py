"""The workspace index: which definitions it extracts, and that it follows files as they change."""

from __future__ import annotations

import os

from longbow.rag.codectx.python.index import PythonIndex
from longbow.rag.codectx.workspace import Workspace

from .workspaces import MODELS


def _index(root) -> PythonIndex:
    index = PythonIndex(Workspace(root))
    index.refresh()
    return index


def test_definition_kinds(workspace, tmp_path):
    workspace({"app/models.py": MODELS + "\nUserId = NewType('UserId', int)\ndef make(name: str) -> User: ...\n"})
    kinds = {d.name: d.kind for d in _index(tmp_path).modules["app/models.py"].definitions if not d.owner}
    assert kinds == {"Role": "enum", "Address": "dataclass", "User": "dataclass", "UserRow": "typeddict",
                     "Greeter": "protocol", "UserList": "alias", "UserId": "alias", "make": "function"}


def test_function_signature_and_class_fields(workspace, tmp_path):
    workspace({"m.py": "class Box:\n    def __init__(self, size: int) -> None:\n        self.size: int = size\n"
                       "def open_box(box: 'Box', *, force: bool = False) -> Box | None: ...\n"})
    index = _index(tmp_path)
    function = index.resolve("open_box", "m.py")
    assert function.params == (("box", "'Box'"), ("force", "bool")) and function.returns == "Box | None"
    assert index.resolve("Box", "m.py").fields == (("size", "int"),)


def test_changed_file_on_disk_is_reindexed_by_mtime(workspace, tmp_path):
    workspace({"a.py": "class First: ...\n"})
    index = _index(tmp_path)
    assert index.resolve("First", "a.py") is not None
    (tmp_path / "a.py").write_text("class Second: ...\n")
    stat = (tmp_path / "a.py").stat()
    os.utime(tmp_path / "a.py", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    index.refresh()
    assert index.resolve("First", "a.py") is None and index.resolve("Second", "a.py") is not None


def test_deleted_file_is_dropped_and_unchanged_files_are_not_reparsed(workspace, tmp_path):
    workspace({"a.py": "class A: ...\n", "b.py": "class B: ...\n"})
    index = _index(tmp_path)
    summary_b = index.modules["b.py"]
    (tmp_path / "a.py").unlink()
    index.refresh()
    assert "a.py" not in index.modules and index.modules["b.py"] is summary_b


def test_update_and_remove_without_disk(tmp_path):
    index = PythonIndex(Workspace(tmp_path))
    index.update("new.py", "class Fresh: ...\n")
    assert index.resolve("Fresh", "other.py").path == "new.py"
    index.remove("new.py")
    assert index.resolve("Fresh", "other.py") is None


def test_resolution_prefers_local_then_imported(workspace, tmp_path):
    workspace({"pkg/a.py": "class Item: ...\n", "pkg/b.py": "class Item: ...\n",
               "pkg/use.py": "from pkg.b import Item\n", "pkg/own.py": "class Item: ...\n"})
    index = _index(tmp_path)
    assert index.resolve("Item", "pkg/use.py").path == "pkg/b.py"
    assert index.resolve("Item", "pkg/own.py").path == "pkg/own.py"


def test_relative_imports_resolve(workspace, tmp_path):
    workspace({"pkg/__init__.py": "", "pkg/a.py": "class Thing: ...\n", "pkg/z.py": "class Thing: ...\n",
               "pkg/sub/__init__.py": "", "pkg/sub/use.py": "from ..z import Thing\n"})
    assert _index(tmp_path).resolve("Thing", "pkg/sub/use.py").path == "pkg/z.py"


def test_broken_file_still_contributes_definitions(workspace, tmp_path):
    workspace({"broken.py": "class Good:\n    x: int\n\ndef bad(:\n    pass\n\nclass AlsoGood: ...\n"})
    names = {d.name for d in _index(tmp_path).modules["broken.py"].definitions}
    assert {"Good", "AlsoGood"} <= names
