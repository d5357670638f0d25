"""Which files the gateway is sent. A gateway may run on another machine and must not need the editor's
disk (and after issue 16 reads none by default), so this server sends the source the context needs:

- pinned mode (the gateway accepts the editor's root as a workspace key): every source file under the
  root once, by UpdateFiles, then each buffer as it changes;
- detached mode (the gateway refuses the root: it does not exist there, or is not an allowed root): each
  request carries its file and the files it imports, transitively (relative TypeScript imports, Python
  modules found under the root), as `open_files` with no root at all.

Both are bounded (files and bytes) so a huge tree degrades context instead of stalling the editor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SOURCE_SUFFIXES = (".py", ".pyi", ".ts", ".tsx", ".mts", ".cts")
SKIPPED_DIRECTORIES = frozenset({"node_modules", "__pycache__", "site-packages", "dist", "build", "venv", "out"})

_PY_FROM = re.compile(r"^\s*from\s+(\.*)([\w.]*)\s+import\s+\(?([\w\s,*]+)", re.MULTILINE)
_PY_IMPORT = re.compile(r"^\s*import\s+([\w.]+(?:\s*,\s*[\w.]+)*)", re.MULTILINE)
_TS_IMPORT = re.compile(r"""(?:from\s+|import\s*\(?\s*|require\(\s*)['"](\.{1,2}/[^'"]+)['"]""")


@dataclass(frozen=True)
class FileLimits:
    max_files: int = 2000  # the gateway indexes at most 5000 per workspace
    max_bytes: int = 8_000_000  # all files together
    max_file_bytes: int = 500_000  # one file (the gateway refuses files over 1 MB)
    batch_files: int = 200  # the gateway's per-request limit on files (max_open_files)


def source_files(root: Path, limits: FileLimits = FileLimits()) -> dict[str, str]:
    """Source files under `root` (relative POSIX path -> text), skipping hidden and vendored directories,
    in a deterministic order, within the limits."""
    files, total = {}, 0
    for path in _walk(root):
        try:
            size = path.stat().st_size
            if size > limits.max_file_bytes or total + size > limits.max_bytes:
                continue
            files[path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue  # vanished or unreadable: the context does without it
        total += size
        if len(files) >= limits.max_files:
            break
    return files


def _walk(root: Path) -> Iterator[Path]:
    for directory, subdirectories, names in os.walk(root):  # links are not followed: nothing outside the root
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith(".") and d not in SKIPPED_DIRECTORIES)
        for name in sorted(names):
            if name.endswith(SOURCE_SUFFIXES):
                yield Path(directory) / name


def batches(files: dict[str, str], size: int) -> Iterator[dict[str, str]]:
    items = list(files.items())
    for start in range(0, len(items), size):
        yield dict(items[start:start + size])


def read_file_under(base: Path, relative: str) -> str | None:
    """The text of source file `relative` when it lies inside `base` (symlinks resolved), else None: the
    disk reader of detached mode (the language server's buffers aside, and `longbow context --address`)."""
    root = base.resolve()
    target = (root / relative).resolve()
    try:
        if not target.is_relative_to(root) or not target.is_file():
            return None
        return target.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def import_closure(path: str, read: Callable[[str], str | None], limits: FileLimits = FileLimits()) -> dict[str, str]:
    """`path` and the workspace files it imports, transitively (relative path -> text). `read` gives a
    relative path's text (open buffer or disk) or None when there is no such file."""
    found: dict[str, str] = {}
    queue, total = [path], 0
    while queue and len(found) < limits.batch_files:
        current = queue.pop(0)
        if current in found:
            continue
        text = read(current)
        if text is None or total + len(text) > limits.max_bytes:
            continue
        found[current] = text
        total += len(text)
        queue.extend(p for p in imported_paths(current, text) if p not in found)
    return found


def imported_paths(path: str, text: str) -> list[str]:
    """Candidate relative paths of the modules `text` imports (some may not exist)."""
    if path.endswith((".py", ".pyi")):
        return _python_imports(PurePosixPath(path), text)
    return _typescript_imports(PurePosixPath(path), text)


def _python_imports(path: PurePosixPath, text: str) -> list[str]:
    modules: list[tuple[PurePosixPath, str, list[str]]] = []
    for dots, module, names in _PY_FROM.findall(text):
        base = path.parent
        for _ in range(len(dots) - 1):
            base = base.parent
        anchor = base if dots else PurePosixPath()
        modules.append((anchor, module, [n.strip() for n in names.replace("\n", ",").split(",") if n.strip()]))
    for group in _PY_IMPORT.findall(text):
        modules.extend((PurePosixPath(), name.strip(), []) for name in group.split(","))
    candidates = []
    for anchor, module, names in modules:
        module_path = anchor.joinpath(*module.split(".")) if module else anchor
        candidates += [f"{module_path}.py", f"{module_path}.pyi", f"{module_path / '__init__.py'}"]
        # `from pkg import module` imports a module too
        candidates += [f"{module_path / name.split()[0]}.py" for name in names if name != "*"]
    return [_normal(c) for c in candidates if _normal(c)]


def _typescript_imports(path: PurePosixPath, text: str) -> list[str]:
    candidates = []
    for specifier in _TS_IMPORT.findall(text):
        target = path.parent / specifier
        stem = str(target)[:-3] if str(target).endswith(".js") else str(target)  # ESM style "./x.js" means x.ts
        candidates += [f"{stem}.ts", f"{stem}.tsx", f"{stem}.d.ts", f"{stem}/index.ts", str(target)]
    return [_normal(c) for c in candidates if _normal(c)]


def _normal(path: str) -> str:
    """Collapse "a/../b" and "./a"; "" for anything that climbs out of the root."""
    parts: list[str] = []
    for part in PurePosixPath(path).parts:
        if part == "..":
            if not parts:
                return ""
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts)
