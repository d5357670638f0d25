"""The workspace index of Python definitions, kept current per file.

A file on disk is re-read only when its stamp (mtime, size) changed; an open file only when its text
changed. Lookup tables (by name, by owning class, by module) are patched per changed file. Name
resolution prefers the file itself, then what the file imports, then any definition of that name
(deterministically ordered: types before functions, shallow paths first).
"""

from __future__ import annotations

import ast
import threading
from collections import defaultdict

from longbow.rag.codectx.errors import CodeContextError
from longbow.rag.codectx.python.definitions import Definition, ModuleSummary, summarize_module
from longbow.rag.codectx.python.parsing import parse_with_hole
from longbow.rag.codectx.workspace import Workspace

_KIND_ORDER = {"dataclass": 0, "typeddict": 0, "protocol": 0, "enum": 0, "namedtuple": 0, "class": 1,
               "alias": 1, "function": 2, "method": 3}


def _definition_order(definition: Definition) -> tuple:
    return _KIND_ORDER.get(definition.kind, 4), definition.path.count("/"), definition.path, definition.line


def parse_tolerant(text: str) -> ast.Module:
    """Parse a whole file; a broken one is recovered line by line (see parsing.py)."""
    try:
        return ast.parse(text)
    except (SyntaxError, ValueError):
        pass
    try:
        return parse_with_hole(text + "\n", text.count("\n") + 2, 1).tree
    except (CodeContextError, RecursionError, MemoryError):  # NOTE: an unparseable file contributes nothing
        return ast.Module(body=[], type_ignores=[])


class PythonIndex:
    """Definitions of every .py file of a workspace. Two layers per path: the disk summary (kept while
    the file's stamp holds) and the open-file summary over it; closing a file just drops the upper
    layer. Lookup tables are patched per changed file, never rebuilt whole. Thread-safe."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.modules: dict[str, ModuleSummary] = {}  # what lookups see: open over disk
        self._disk: dict[str, ModuleSummary] = {}
        self._stamps: dict[str, tuple[int, int]] = {}
        self._open: dict[str, tuple[int, ModuleSummary]] = {}  # path -> (hash of the text, summary)
        self._by_name: dict[str, list[Definition]] = defaultdict(list)
        self._by_owner: dict[str, dict[str, Definition]] = defaultdict(dict)
        self._by_module: dict[str, str] = {}
        self._statement_memo: dict[str, dict] = {}  # per open file: see summarize_module
        self._lock = threading.RLock()

    def refresh(self, parsed: dict[str, ast.Module] | None = None) -> None:
        """Re-read files changed on disk (by stamp) and open files whose text changed; drop deleted files.
        `parsed` holds trees of open files the caller already parsed (path -> tree of the same text)."""
        with self._lock:
            changed = self._refresh_disk() | self._refresh_open(parsed or {})
            for path in sorted(changed):
                self._publish(path)

    def update(self, path: str, text: str) -> None:
        """Index `text` as the open version of `path` (until the next refresh without it)."""
        with self._lock:
            self._open[path] = (hash(text), summarize_module(parse_tolerant(text), path))
            self._publish(path)

    def remove(self, path: str) -> None:
        with self._lock:
            self._open.pop(path, None)
            self._disk.pop(path, None)
            self._stamps.pop(path, None)
            self._publish(path)

    def _refresh_disk(self) -> set[str]:
        changed, on_disk = set(), set()
        for stamp in self.workspace.stamps((".py", ".pyi")):
            on_disk.add(stamp.path)
            if self._stamps.get(stamp.path) != (stamp.mtime_ns, stamp.size):
                if not self.workspace.budget.allows(stamp.size):
                    continue  # this request's read budget is spent: keep the old summary, read it next time
                self._disk[stamp.path] = summarize_module(parse_tolerant(self._read_disk(stamp.path)), stamp.path)
                self._stamps[stamp.path] = (stamp.mtime_ns, stamp.size)
                changed.add(stamp.path)
        for path in [p for p in self._disk if p not in on_disk]:
            del self._disk[path], self._stamps[path]
            changed.add(path)
        return changed

    def _refresh_open(self, parsed: dict[str, ast.Module]) -> set[str]:
        changed = set()
        open_files = {p: t for p, t in self.workspace.open_files.items() if p.endswith((".py", ".pyi"))}
        for path, text in open_files.items():
            key = hash(text)
            if self._open.get(path, (None,))[0] != key:
                memo = self._statement_memo.setdefault(path, {})
                tree = parsed[path] if path in parsed else parse_tolerant(text)
                self._open[path] = (key, summarize_module(tree, path, text, memo))
                changed.add(path)
        for path in [p for p in self._open if p not in open_files]:
            del self._open[path]
            changed.add(path)
        for path in [p for p in self._statement_memo if p not in open_files][:-8]:
            del self._statement_memo[path]  # keep the memos of the last few closed files only
        return changed

    def _publish(self, path: str) -> None:
        """Make lookups see the current layer of `path` (or nothing), patching the tables in place."""
        old = self.modules.pop(path, None)
        new = self._open[path][1] if path in self._open else self._disk.get(path)
        if old is not None:
            self._unlink(old)
        if new is not None:
            self.modules[path] = new
            self._link(new)

    def _unlink(self, summary: ModuleSummary) -> None:
        for name in {d.name for d in summary.definitions}:
            self._by_name[name] = [d for d in self._by_name[name] if d.path != summary.path]
            if not self._by_name[name]:
                del self._by_name[name]
        for definition in summary.definitions:
            if definition.owner and self._by_owner[definition.owner].get(definition.name) is definition:
                del self._by_owner[definition.owner][definition.name]
        if self._by_module.get(summary.module) == summary.path:
            del self._by_module[summary.module]

    def _link(self, summary: ModuleSummary) -> None:
        for definition in summary.definitions:
            self._by_name[definition.name].append(definition)
            if definition.owner:
                self._by_owner[definition.owner].setdefault(definition.name, definition)
        for name in {d.name for d in summary.definitions}:
            self._by_name[name].sort(key=_definition_order)
        self._by_module.setdefault(summary.module, summary.path)

    def definition_count(self) -> int:
        return sum(len(m.definitions) for m in self.modules.values())

    def by_name(self) -> dict[str, list[Definition]]:
        return self._by_name

    def resolve(self, name: str, from_path: str) -> Definition | None:
        """The definition `name` refers to in `from_path`: local, imported, then global. Types win over
        functions of the same name in the global fallback."""
        candidates = self.by_name().get(name, [])
        if not candidates:
            return self._resolve_import(name, from_path)
        local = [d for d in candidates if d.path == from_path and not d.owner]
        if local:
            return local[0]
        imported = self._resolve_import(name, from_path)
        if imported is not None:
            return imported
        top_level = [d for d in candidates if not d.owner]
        return top_level[0] if top_level else None

    def functions(self) -> list[Definition]:
        return [d for ds in self._by_name.values() for d in ds if not d.is_type]

    def methods_of(self, class_name: str) -> dict[str, Definition]:
        return self._by_owner.get(class_name, {})

    def imports_of(self, path: str) -> dict[str, tuple[str, str]]:
        summary = self.modules.get(path)
        return summary.imports if summary else {}

    def _resolve_import(self, name: str, from_path: str) -> Definition | None:
        module, original = self.imports_of(from_path).get(name, ("", ""))
        if not original:
            return None
        path = self.module_path(module)
        if path is None:
            return None
        matches = [d for d in self.modules[path].definitions if d.name == original and not d.owner]
        if matches:
            return matches[0]
        candidates = [d for d in self.by_name().get(original, []) if not d.owner]  # re-exported by a package
        return candidates[0] if candidates else None

    def module_path(self, module: str) -> str | None:
        """The file of a dotted module; the workspace root may sit below the import root, so leading
        package names are dropped until one matches (`rich.console` -> `console`)."""
        parts = module.split(".")
        for start in range(len(parts)):
            path = self._by_module.get(".".join(parts[start:]))
            if path is not None:
                return path
        return None

    def _read_disk(self, path: str) -> str:
        try:
            return self.workspace.read_disk(path)
        except (CodeContextError, OSError):  # NOTE: unreadable or oversized files are indexed as empty, not fatal
            return ""


__all__ = ["PythonIndex", "parse_tolerant"]
