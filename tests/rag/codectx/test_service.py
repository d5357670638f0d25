"""The service: open files, UpdateFiles, language dispatch, errors."""

from __future__ import annotations

import pytest

from longbow.rag.codectx.errors import (
    NotReadableError,
    OutsideWorkspaceError,
    PositionError,
    UnknownFileError,
    UnsupportedLanguageError,
)
from longbow.rag.codectx.service import CodeContextService, HoleRequest

from .workspaces import MODELS


def test_open_file_text_overrides_disk_for_one_request(workspace, tmp_path, disk_roots):
    workspace({"app/models.py": MODELS, "app/use.py": "x = 1\n"})
    service = CodeContextService(readable_roots=disk_roots)
    unsaved = "from app.models import User\ndef f() -> User:\n    return \n"
    found = service.context(HoleRequest(str(tmp_path), "app/use.py", 3, 12, open_files={"app/use.py": unsaved}))
    assert found.expected_type.text == "User"
    with pytest.raises(PositionError):  # back to the disk text: line 3 does not exist
        service.context(HoleRequest(str(tmp_path), "app/use.py", 3, 12))


def test_update_files_changes_definitions_seen_by_later_requests(workspace, tmp_path, disk_roots):
    workspace({"app/models.py": MODELS, "app/use.py": "from app.models import User\ndef f() -> User:\n    return \n"})
    service = CodeContextService(readable_roots=disk_roots)
    request = HoleRequest(str(tmp_path), "app/use.py", 3, 12)
    assert service.context(request).type_definitions[0].text.startswith("@dataclass\nclass User")
    before = service.update_files(str(tmp_path), {}, [])
    after = service.update_files(str(tmp_path), {"app/models.py": "class User:\n    nickname: str\n"}, [])
    assert after < before
    assert "nickname" in service.context(request).type_definitions[0].text
    service.update_files(str(tmp_path), {}, ["app/models.py"])
    assert service.context(request).type_definitions == []


def test_open_files_only_without_root():
    service = CodeContextService()
    files = {"m.py": "class Point:\n    x: int\n", "u.py": "from m import Point\ndef f() -> Point:\n    return \n"}
    found = service.context(HoleRequest("", "u.py", 3, 12, open_files=files))
    assert [d.name for d in found.type_definitions] == ["Point"]
    with pytest.raises(UnknownFileError):
        service.context(HoleRequest("", "other.py", 1, 1, open_files=files))


def test_allowed_roots_and_languages(tmp_path, disk_roots):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.rb").write_text("")
    (tmp_path / "a" / "x.py").write_text("x = 1\n")
    service = CodeContextService(readable_roots=(str(tmp_path / "b"),))
    with pytest.raises(NotReadableError):  # a root outside the readable ones is only what the client sent
        service.context(HoleRequest(str(tmp_path / "a"), "x.py", 1, 1))
    with pytest.raises(UnsupportedLanguageError):
        CodeContextService(readable_roots=disk_roots).context(HoleRequest(str(tmp_path / "a"), "x.rb", 1, 1))


def test_bindings_with_types_locals_first(workspace, disk_roots):
    hole = workspace({"app/models.py": MODELS, "app/use.py": """
        from app.models import User, Role
        LIMIT: int = 3
        def f(user: User, n) -> Role:
            role = user.role
            total = len([])
            for item in [user]:
                pass
            return <|>
        """})
    found = CodeContextService(readable_roots=disk_roots).context(HoleRequest(str(hole.root), hole.path, hole.line, hole.column))
    types = {b.name: b.detail for b in found.bindings}
    assert [b.name for b in found.bindings[:5]] == ["user", "role", "n", "total", "item"]  # typed locals first
    assert types["user"] == "User" and types["role"] == "Role" and types["LIMIT"] == "int"
    assert types["User"] == "type[User]" and types["f"].endswith("-> Role")
