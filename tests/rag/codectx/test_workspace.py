"""Path safety and limits: nothing outside the root is ever read."""

from __future__ import annotations

import pytest

from longbow.rag.codectx.errors import LimitError, MalformedRequestError, OutsideWorkspaceError, UnknownFileError
from longbow.rag.codectx.workspace import Workspace, WorkspaceLimits


@pytest.fixture
def root(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "ok.py").write_text("x = 1\n")
    (tmp_path / "secret.py").write_text("password = 1\n")
    return tmp_path / "ws"


@pytest.mark.parametrize("path", ["../secret.py", "a/../../secret.py", "/etc/passwd"])
def test_paths_outside_the_root_are_refused(root, path):
    with pytest.raises(OutsideWorkspaceError):
        Workspace(root).read(path)


@pytest.mark.parametrize("path", ["", "a\x00b"])
def test_paths_that_name_no_file_are_malformed(root, path):
    with pytest.raises(MalformedRequestError):
        Workspace(root).read(path)


def test_symlink_out_of_the_root_is_refused_and_not_listed(root):
    (root / "link.py").symlink_to(root.parent / "secret.py")
    (root / "linkdir").symlink_to(root.parent, target_is_directory=True)
    workspace = Workspace(root)
    with pytest.raises(OutsideWorkspaceError):
        workspace.read("link.py")
    with pytest.raises(OutsideWorkspaceError):
        workspace.read("linkdir/secret.py")
    assert [s.path for s in workspace.stamps((".py",))] == ["ok.py"]


def test_absolute_path_inside_the_root_is_accepted(root):
    assert Workspace(root).read(str(root / "ok.py")) == "x = 1\n"


def test_relative_root_and_missing_root(root):
    with pytest.raises(MalformedRequestError):
        Workspace("relative/root")
    with pytest.raises(UnknownFileError):
        Workspace(root / "missing")


def test_unknown_file_and_open_file_override(root):
    workspace = Workspace(root)
    with pytest.raises(UnknownFileError):
        workspace.read("nope.py")
    workspace.set_request_files({"ok.py": "x = 2\n", "new.py": "y = 1\n"})
    assert workspace.read("ok.py") == "x = 2\n" and workspace.read("new.py") == "y = 1\n"


def test_size_and_count_limits(root):
    (root / "big.py").write_text("x" * 200)
    workspace = Workspace(root, WorkspaceLimits(max_file_bytes=100, max_files=1, max_open_files=1))
    with pytest.raises(LimitError):
        workspace.read("big.py")
    with pytest.raises(LimitError):
        workspace.set_request_files({"a.py": "", "b.py": ""})
    assert len(list(workspace.stamps((".py",)))) == 1


def test_deleted_files_are_hidden(root):
    workspace = Workspace(root)
    workspace.pin_files({}, ["ok.py"])
    with pytest.raises(UnknownFileError):
        workspace.read("ok.py")
    assert list(workspace.stamps((".py",))) == []
