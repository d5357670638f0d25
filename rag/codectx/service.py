"""The code-context service: one object the gateway (and the CLI) holds. It keeps a workspace and its
index per root (least recently used dropped beyond `max_workspaces`), dispatches by language, and runs
completions with error rounds. Synchronous: callers on an event loop use asyncio.to_thread.

Secure by default: with no `readable_roots` the service reads no file from disk; a request's workspace
is what the client sent. A root inside one of `readable_roots` (symlinks resolved) is read from disk;
any other root is a sent workspace, and needing a file it did not send is NotReadableError.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from longbow.rag.codectx.checking import check_fill
from longbow.rag.codectx.completion import complete_hole
from longbow.rag.codectx.errors import MalformedRequestError, UnsupportedLanguageError
from longbow.rag.codectx.packing import TokenCounter, approximate_tokens
from longbow.rag.codectx.python.context import python_context
from longbow.rag.codectx.python.index import PythonIndex
from longbow.rag.codectx.records import CodeContext, Completion, Diagnostic
from longbow.rag.codectx.typescript import TypeScriptHelper
from longbow.rag.codectx.workspace import Workspace, WorkspaceLimits

PYTHON_SUFFIXES = (".py", ".pyi")
TYPESCRIPT_SUFFIXES = (".ts", ".tsx", ".mts", ".cts")


@dataclass(frozen=True)
class HoleRequest:
    """A hole in a workspace: `path` relative to `workspace_root` (empty root: open files only);
    1-based line and column; `open_files` (relative path -> text) override the disk for this request."""

    workspace_root: str
    path: str
    line: int
    column: int
    token_budget: int = 2048
    open_files: dict[str, str] = field(default_factory=dict)
    language: str = ""


@dataclass
class _WorkspaceState:
    workspace: Workspace
    python: PythonIndex
    lock: threading.RLock = field(default_factory=threading.RLock)


def language_of(path: str, declared: str = "") -> str:
    if declared:
        if declared not in ("python", "typescript"):
            raise UnsupportedLanguageError(f"language {declared!r}: python or typescript")
        return declared
    if path.endswith(PYTHON_SUFFIXES):
        return "python"
    if path.endswith(TYPESCRIPT_SUFFIXES):
        return "typescript"
    raise UnsupportedLanguageError(f"cannot tell the language of {path!r}; set language")


class CodeContextService:
    def __init__(self, limits: WorkspaceLimits | None = None, count_tokens: TokenCounter = approximate_tokens,
                 readable_roots: tuple[str, ...] = (), max_workspaces: int = 8):
        self.limits = limits or WorkspaceLimits()
        self.count_tokens = count_tokens
        self.readable_roots = tuple(Path(r).expanduser().resolve() for r in readable_roots)
        self.max_workspaces = max_workspaces
        self._states: OrderedDict[str, _WorkspaceState] = OrderedDict()
        self._states_lock = threading.Lock()
        self._typescript: TypeScriptHelper | None = None  # created on the first TypeScript request

    def context(self, request: HoleRequest) -> CodeContext:
        with self._session(request) as state:
            relative = state.workspace.relative(request.path)  # a path outside the root is refused first
            language = language_of(relative, request.language)
            if language == "python":  # python_context refreshes the index itself, reusing its parse
                return python_context(state.python, relative, request.line,
                                      request.column, request.token_budget, self.count_tokens)
            return self.typescript().context(state.workspace, request, self.count_tokens)

    def source(self, request: HoleRequest) -> str:
        """The text of the hole's file as this request sees it (open files over the disk)."""
        with self._session(request) as state:
            return state.workspace.read(request.path)

    def update_files(self, workspace_root: str, files: dict[str, str], deleted: list[str]) -> int:
        """Pin changed files (full text) and forget deleted ones; returns the Python definitions indexed."""
        if not workspace_root:
            raise MalformedRequestError("UpdateFiles needs a workspace root")
        state = self._state(workspace_root)
        with state.lock:
            state.workspace.pin_files(files, deleted)
            state.python.refresh()
            return state.python.definition_count()

    def check(self, request: HoleRequest, fill: str) -> list[Diagnostic]:
        """Type errors of the file with `fill` typed at the hole (only those on the filled lines)."""
        with self._session(request) as state:
            language = language_of(state.workspace.relative(request.path), request.language)
            return check_fill(state.workspace, request, fill, language, self.typescript)

    def complete(self, lm, request: HoleRequest, *, error_rounds: int = 1, max_tokens: int = 64,
                 temperature: float = 0.0) -> Completion:
        return complete_hole(self, lm, request, error_rounds=error_rounds, max_tokens=max_tokens,
                             temperature=temperature)

    def typescript(self) -> TypeScriptHelper:
        with self._states_lock:
            if self._typescript is None:
                self._typescript = TypeScriptHelper()
            return self._typescript

    def close(self) -> None:
        if self._typescript is not None:
            self._typescript.close()

    def _session(self, request: HoleRequest):
        return _Session(self._state(request.workspace_root) if request.workspace_root else self._scratch(),
                        request.open_files)

    def _scratch(self) -> _WorkspaceState:
        workspace = Workspace(None, self.limits)
        return _WorkspaceState(workspace, PythonIndex(workspace))

    def _state(self, root: str) -> _WorkspaceState:
        if not root:
            return self._scratch()
        readable = self._readable(root)
        workspace = Workspace(root, self.limits, readable=readable)  # validates the root before caching
        key = ("disk" if readable else "sent", workspace.name)
        with self._states_lock:
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = _WorkspaceState(workspace, PythonIndex(workspace))
                while len(self._states) > self.max_workspaces:
                    self._states.popitem(last=False)
            self._states.move_to_end(key)
            return state

    def _readable(self, root: str) -> bool:
        """Whether `root` (symlinks resolved) lies inside a configured readable root. Nothing is
        resolved when none is configured: a client's root must not even be probed on disk."""
        if not self.readable_roots or not Path(root).is_absolute():
            return False
        resolved = Path(root).resolve()
        return any(resolved == r or r in resolved.parents for r in self.readable_roots)


class _Session:
    """Holds a workspace's lock for one request with that request's open files overlaid; the overlay
    is removed on exit. Whoever needs the index refreshes it (python_context does, with its parse)."""

    def __init__(self, state: _WorkspaceState, open_files: dict[str, str]):
        self.state, self.open_files = state, open_files

    def __enter__(self) -> _WorkspaceState:
        self.state.lock.acquire()
        try:
            self.state.workspace.set_request_files(self.open_files)
        except BaseException:
            self.state.lock.release()
            raise
        return self.state

    def __exit__(self, *exc) -> None:
        try:
            self.state.workspace.set_request_files({})
        finally:
            self.state.lock.release()


def build_context(workspace_root: str, path: str, line: int, column: int, token_budget: int = 2048,
                  open_files: dict[str, str] | None = None, count_tokens: TokenCounter = approximate_tokens,
                  language: str = "") -> CodeContext:
    """One-shot context for a hole (the CLI's `longbow context FILE:LINE:COL`): the user named the root on
    their own machine, so it is readable."""
    service = CodeContextService(count_tokens=count_tokens, readable_roots=(workspace_root,) if workspace_root else ())
    try:
        return service.context(HoleRequest(workspace_root, path, line, column, token_budget, open_files or {},
                                           language))
    finally:
        service.close()
