"""TypeScript front end: a long-lived Node helper (ts/helper.js, the TypeScript compiler API) answers
context and check requests as JSON lines. Started lazily, restarted when it dies or stops answering.

Path safety is decided here and enforced twice: the helper is told the root, whether it may read disk
(a sent workspace may not: it gets a virtual root and only the client's files), the files to load
(listed by `Workspace.stamps`, which never follows links, and cut to the request's read budget) and the
overlays; the helper resolves every path it would read, imports included, and reads nothing whose real
path is outside the root's real path or TypeScript's lib.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import selectors
import shutil
import subprocess
import threading
from pathlib import Path

from longbow.rag.codectx.errors import CheckerUnavailableError, CodeContextError, UnknownFileError
from longbow.rag.codectx.packing import TokenCounter, pack_context
from longbow.rag.codectx.records import CodeContext, ContextItem, Diagnostic, ExpectedType
from longbow.rag.codectx.workspace import Workspace

HELPER = Path(__file__).resolve().parent / "ts" / "helper.js"
SENTINEL = "__longbow_hole__"
REPLY_TIMEOUT_S = 60.0
TYPESCRIPT_SUFFIXES = (".ts", ".tsx", ".mts", ".cts")
_KEYWORDS = frozenset({"return", "new", "typeof", "await", "yield", "case", "in", "of", "instanceof", "void",
                       "delete", "throw", "else", "do", "const", "let", "var", "export", "default", "as"})


class TypeScriptHelper:
    """One Node process; calls are serialized (the helper answers one line at a time)."""

    def __init__(self, node: str | None = None):
        self.node = node or shutil.which("node") or "node"
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.starts = 0  # how many times a process was started (tests watch restarts)

    def context(self, workspace: Workspace, request, count_tokens: TokenCounter) -> CodeContext:
        relative = workspace.relative(request.path)
        text = workspace.read(relative)
        holed, offset = insert_sentinel(text, request.line, request.column)
        result = self.call("context", _payload(workspace, relative, holed), offset=offset, timeout_s=_timeout(workspace))
        expected = ExpectedType(result["expected_type"], result["source"])
        context = CodeContext("typescript", relative, request.line, request.column, expected)
        context.bindings = [_item(b) for b in result["bindings"]]
        context.type_definitions = [_item(d) for d in result["type_definitions"]]
        context.headers = [_item(h) for h in result["headers"]]
        packed = pack_context(expected, context.type_definitions, context.headers, context.bindings,
                              request.token_budget, count_tokens, comment="//")
        context.packed_text, context.packed_tokens, context.packed_items = packed.text, packed.tokens, packed.items
        return context

    def check(self, workspace: Workspace, relative: str, text: str) -> list[Diagnostic]:
        result = self.call("check", _payload(workspace, relative, text), timeout_s=_timeout(workspace))
        return [Diagnostic(d["message"], d["line"], d["column"], d["severity"]) for d in result]

    def call(self, op: str, payload: dict | None = None, timeout_s: float = REPLY_TIMEOUT_S, **fields) -> object:
        message = {"id": next(self._ids), "op": op, **(payload or {}), **fields}
        with self._lock:
            reply = self._exchange(message, timeout_s)
        if not reply.get("ok"):
            raise CodeContextError(f"typescript helper: {reply.get('error', 'no reply')[:500]}")
        return reply["result"]

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _exchange(self, message: dict, timeout_s: float) -> dict:
        process = self._running()
        try:
            process.stdin.write(json.dumps(message) + "\n")
            process.stdin.flush()
            line = _read_line(process, timeout_s)
        except (BrokenPipeError, OSError, TimeoutError) as error:
            self._stop()  # NOTE: a hung or dead helper is replaced on the next call, not waited for
            raise CheckerUnavailableError(f"typescript helper failed: {error}") from None
        return json.loads(line)

    def _running(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        if not (HELPER.parent / "node_modules" / "typescript").is_dir():
            raise CheckerUnavailableError("typescript is not installed: run `npm ci` in rag/codectx/ts")
        try:
            self._process = subprocess.Popen([self.node, str(HELPER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True, bufsize=1)
        except OSError as error:
            raise CheckerUnavailableError(f"cannot start node: {error}") from None
        self.starts += 1
        return self._process

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(5)
            self._process = None


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no reply within {timeout} s")
    line = process.stdout.readline()
    if not line:
        raise BrokenPipeError("the helper exited")
    return line


def _payload(workspace: Workspace, relative: str, text: str) -> dict:
    if workspace.name is None:
        raise UnknownFileError("TypeScript context needs a workspace root")
    files = []
    for stamp in workspace.stamps(TYPESCRIPT_SUFFIXES):  # empty for a sent workspace
        if stamp.path not in workspace.open_files and workspace.budget.allows(stamp.size):
            workspace.budget.spend(stamp.size)  # the helper reads these lazily; charge them now
            files.append([stamp.path, f"{stamp.mtime_ns}:{stamp.size}"])
    overlays = {p: t for p, t in workspace.open_files.items() if p.endswith(TYPESCRIPT_SUFFIXES)}
    overlays[relative] = text
    return {"root": _helper_root(workspace), "disk": workspace.root is not None, "path": relative, "files": files,
            "overlays": overlays, "max_file_bytes": workspace.limits.max_file_bytes}


def _helper_root(workspace: Workspace) -> str:
    """The root the helper names files under. A sent workspace gets a virtual directory per name: the
    helper may not read disk for it, so the directory need not exist (and must not be the client's path)."""
    if workspace.root is not None:
        return str(workspace.root)
    return "/longbow-sent-workspace/" + hashlib.sha256(workspace.name.encode()).hexdigest()[:16]


def _timeout(workspace: Workspace) -> float:
    # NOTE: at least 15 s even when indexing spent the request's time: the helper's first call parses
    # TypeScript's lib (several seconds on a busy CPU), and a killed helper pays that again.
    return max(15.0, min(REPLY_TIMEOUT_S, workspace.budget.seconds_left()))


def insert_sentinel(text: str, line: int, column: int) -> tuple[str, int]:
    """The text with the identifier at the cursor replaced by the sentinel; the sentinel's offset."""
    from longbow.rag.codectx.errors import PositionError

    lines = text.split("\n")
    if not 1 <= line <= len(lines) or not 1 <= column <= len(lines[line - 1]) + 1:
        raise PositionError(f"position {line}:{column} is outside the file")
    current = lines[line - 1]
    start = end = column - 1
    while start > 0 and (current[start - 1].isalnum() or current[start - 1] in "_$"):
        start -= 1
    while end < len(current) and (current[end].isalnum() or current[end] in "_$"):
        end += 1
    if current[start:end] in _KEYWORDS:
        start = end = column - 1
    spacer = " " if current[:start][-1:].isalnum() else ""
    lines[line - 1] = current[:start] + spacer + SENTINEL + current[end:]
    offset = sum(len(x) + 1 for x in lines[: line - 1]) + start + len(spacer)
    return "\n".join(lines), offset


def _item(raw: dict) -> ContextItem:
    return ContextItem(raw["kind"], raw["name"], raw.get("text", ""), raw["path"], raw["line"], raw.get("detail", ""))
