"""What the service may read: nothing from disk by default, a configured root's real files only, and no
more per request than the read limits allow. Each escape below worked before the policy (issue 16)."""

from __future__ import annotations

import pytest

from longbow.rag.codectx.errors import LimitError, NotReadableError, OutsideWorkspaceError
from longbow.rag.codectx.service import CodeContextService, HoleRequest
from longbow.rag.codectx.workspace import WorkspaceLimits

from .workspaces import MODELS, write_workspace

USE = "from app.models import User\ndef f() -> User:\n    return \n"


def test_default_service_reads_no_disk(tmp_path):
    write_workspace(tmp_path, {"app/models.py": MODELS, "app/use.py": USE, "settings.py": "PASSWORD = 'x'\n"})
    service = CodeContextService()
    with pytest.raises(NotReadableError, match="LONGBOW_CODE_ROOTS"):
        service.context(HoleRequest("/", str(tmp_path / "settings.py"), 1, 5, language="python"))
    with pytest.raises(NotReadableError):
        service.source(HoleRequest("/etc", "passwd", 1, 1, language="python"))
    # The hole's file sent, its import not: the model definitions on disk stay unseen.
    found = service.context(HoleRequest(str(tmp_path), "app/use.py", 3, 12, open_files={"app/use.py": USE}))
    assert found.expected_type.text == "User" and found.type_definitions == []


def test_sent_workspace_works_without_disk():
    service = CodeContextService()
    root = "/nonexistent/longbow-sent"  # a name only: never looked up
    service.update_files(root, {"app/models.py": MODELS, "app/use.py": USE}, [])
    found = service.context(HoleRequest(root, root + "/app/use.py", 3, 12))
    assert found.expected_type.text == "User" and found.type_definitions[0].name == "User"
    with pytest.raises(OutsideWorkspaceError):
        service.context(HoleRequest(root, "/nonexistent/other/use.py", 3, 12))
    with pytest.raises(OutsideWorkspaceError):
        service.context(HoleRequest(root, "app/../../use.py", 3, 12))


def test_python_import_through_a_symlink_out_of_the_root_is_not_read(tmp_path, disk_roots):
    outside = tmp_path / "outside"
    write_workspace(outside, {"secret.py": "class Secret:\n    password: str = 'hunter2'\n"})
    root = tmp_path / "ws"
    write_workspace(root, {"app/use.py": "from app.link.secret import Secret\ndef f() -> Secret:\n    return \n"})
    (root / "app" / "link").symlink_to(outside, target_is_directory=True)
    service = CodeContextService(readable_roots=(str(root),))
    found = service.context(HoleRequest(str(root), "app/use.py", 3, 12))
    assert found.type_definitions == [] and "hunter2" not in found.packed_text
    with pytest.raises(OutsideWorkspaceError):
        service.context(HoleRequest(str(root), "app/link/secret.py", 1, 1))


def test_typescript_import_through_a_symlink_out_of_the_root_is_not_read(tmp_path):
    outside = tmp_path / "outside"
    write_workspace(outside, {"secret.ts": 'export interface Secret { password: "hunter2" }\n'})
    root = tmp_path / "ws"
    hole = write_workspace(root, {"src/app.ts": 'import { Secret } from "./link/secret";\nconst s: Secret = <|>;\n'})
    (root / "src" / "link").symlink_to(outside, target_is_directory=True)
    service = CodeContextService(readable_roots=(str(root),))
    try:
        found = service.context(HoleRequest(str(root), hole.path, hole.line, hole.column))
        everything = [found.expected_type.text, found.packed_text,
                      *(i.text + i.detail for i in found.type_definitions + found.bindings + found.headers)]
        assert not any("hunter2" in text for text in everything)
        assert [d.name for d in found.type_definitions] == []
        # The same import with the file inside the root resolves: the refusal above is the symlink's.
        write_workspace(root, {"src/inside/secret.ts": 'export interface Secret { password: "ok" }\n',
                               "src/app.ts": 'import { Secret } from "./inside/secret";\nconst s: Secret = ;\n'})
        found = service.context(HoleRequest(str(root), hole.path, hole.line, hole.column))
        assert found.expected_type.text == "Secret"
    finally:
        service.close()


def test_typescript_sent_workspace_reads_no_disk(tmp_path):
    write_workspace(tmp_path, {"src/models.ts": "export interface Point { x: number }\n"})
    service = CodeContextService()
    app = 'import { Point } from "./models";\nconst p: Point = ;\n'
    try:
        found = service.context(HoleRequest(str(tmp_path), "src/app.ts", 2, 18, open_files={"src/app.ts": app}))
        assert found.type_definitions == []  # models.ts exists on disk but was not sent
        service.update_files(str(tmp_path), {"src/models.ts": "export interface Point { x: number }\n"}, [])
        found = service.context(HoleRequest(str(tmp_path), "src/app.ts", 2, 18, open_files={"src/app.ts": app}))
        assert found.expected_type.text == "Point" and found.type_definitions[0].name == "Point"
    finally:
        service.close()


def test_read_limits_cap_one_request_and_the_index_catches_up(tmp_path):
    files = {f"app/m{i}.py": f"class M{i}:\n    x: int\n" for i in range(6)}
    hole = write_workspace(tmp_path, {**files, "app/use.py": "def f() -> int:\n    return <|>\n"})
    limits = WorkspaceLimits(max_read_files=3)
    service = CodeContextService(limits, readable_roots=(str(tmp_path),))
    request = HoleRequest(str(tmp_path), hole.path, hole.line, hole.column)
    counts = []
    for _ in range(3):
        service.context(request)
        counts.append(service.update_files(str(tmp_path), {}, []))  # also a request: reads up to 3 more
    assert counts[0] < 7 and counts[-1] == 7  # 6 classes + f, read a few files per request
    with pytest.raises(LimitError):
        CodeContextService(WorkspaceLimits(max_read_bytes=10), readable_roots=(str(tmp_path),)).context(request)
