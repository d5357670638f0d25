"""mypy error reports on a fill: only the fill's lines, the workspace never written."""

from __future__ import annotations

from longbow.rag.codectx.checking import insert_fill
from longbow.rag.codectx.service import CodeContextService, HoleRequest

from .workspaces import MODELS


def test_insert_fill_reports_the_lines_it_occupies():
    assert insert_fill("a\nb = \nc", 2, 5, "1 +\n 2") == ("a\nb = 1 +\n 2\nc", 2, 3)


def test_mypy_reports_errors_of_the_fill_only(workspace, tmp_path, disk_roots):
    hole = workspace({"app/models.py": MODELS, "app/use.py": """
        from app.models import User, Role
        def f(name: str) -> User:
            return <|>
        wrong: int = "pre-existing error, not the fill's"
        """})
    service = CodeContextService(readable_roots=disk_roots)
    request = HoleRequest(str(hole.root), hole.path, hole.line, hole.column)
    assert service.check(request, "User(name, Role.ADMIN, None)") == []
    diagnostics = service.check(request, "name")
    assert len(diagnostics) == 1 and diagnostics[0].line == hole.line
    assert 'Incompatible return value type (got "str", expected "User")' in diagnostics[0].message
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["models.py", "use.py"]


def test_unsaved_file_is_checked_from_its_open_text():
    service = CodeContextService()
    files = {"u.py": "def f() -> int:\n    return \n"}
    diagnostics = service.check(HoleRequest("", "u.py", 2, 12, open_files=files), "'x'")
    assert len(diagnostics) == 1 and diagnostics[0].line == 2


def test_syntax_error_in_the_fill_is_a_diagnostic():
    service = CodeContextService()
    files = {"u.py": "def f() -> int:\n    return \n"}
    diagnostics = service.check(HoleRequest("", "u.py", 2, 12, open_files=files), "1 1")
    assert len(diagnostics) == 1 and diagnostics[0].line == 2 and diagnostics[0].severity == "error"
