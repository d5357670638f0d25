"""What the gateway is sent: the source tree (bounded, no vendored directories) and import closures."""

from __future__ import annotations

from longbow.services.lsp.workspace_files import (FileLimits, import_closure, imported_paths, read_file_under,
                                                  source_files)


def test_source_files_skip_vendored_and_hidden_directories(tmp_path):
    for path in ("app/models.py", "app/web/index.ts", "node_modules/x/index.ts", ".venv/lib/y.py", "README.md"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x = 1\n")
    assert sorted(source_files(tmp_path)) == ["app/models.py", "app/web/index.ts"]
    assert len(source_files(tmp_path, FileLimits(max_files=1))) == 1


def test_python_and_typescript_imports():
    assert "app/models.py" in imported_paths("app/use.py", "from app.models import User\n")
    assert "app/models.py" in imported_paths("app/use.py", "from .models import (User,\n  Role)\n")
    assert "app/models.py" in imported_paths("app/use.py", "from . import models\n")
    assert "pkg/a.py" in imported_paths("x.py", "import pkg.a, os\n")
    assert "web/point.ts" in imported_paths("web/app.ts", "import { Point } from './point';\n")
    assert "lib/util.ts" in imported_paths("web/app.ts", 'import * as u from "../lib/util.js";\n')
    assert imported_paths("app.ts", "import x from '../../outside';\n") == []


def test_closure_follows_imports_transitively():
    files = {"a.py": "from b import f\n", "b.py": "from c import C\n", "c.py": "class C: ...\n", "d.py": ""}
    assert sorted(import_closure("a.py", files.get)) == ["a.py", "b.py", "c.py"]


def test_files_are_read_only_inside_the_root(tmp_path):
    root, outside = tmp_path / "ws", tmp_path / "secret.py"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("x = 1\n")
    outside.write_text("token = 'no'\n")
    (root / "pkg" / "link.py").symlink_to(outside)
    assert read_file_under(root, "pkg/a.py") == "x = 1\n"
    assert read_file_under(root, "../secret.py") is None  # a path out of the root
    assert read_file_under(root, "pkg/link.py") is None  # a symlink out of the root
    assert read_file_under(root, "pkg/missing.py") is None and read_file_under(root, "pkg") is None
