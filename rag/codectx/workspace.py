"""The files code context may read: one workspace plus the client's open (possibly unsaved) files.

Owns path safety and size limits. A workspace is either *sent* (the default: its root is only a name,
every file is one the client sent with UpdateFiles or a request, and nothing is read from disk) or
*readable* (its root lies inside a root the operator configured; files are read from disk). Every disk
read goes through `Workspace.read_disk`, which resolves symlinks and refuses anything outside the root
(`..`, absolute paths elsewhere, symlinks out), files over the size limit, and reads beyond what one
request may spend (files, bytes, time: `ReadBudget`).
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from longbow.rag.codectx.errors import (
    LimitError,
    MalformedRequestError,
    NotReadableError,
    OutsideWorkspaceError,
    UnknownFileError,
)

SKIPPED_DIRECTORIES = frozenset({"node_modules", "__pycache__", "site-packages", "dist", "build", "venv"})


@dataclass(frozen=True)
class WorkspaceLimits:
    max_file_bytes: int = 1_000_000
    max_files: int = 5_000
    max_open_files: int = 200
    # Per request, disk reads only. NOTE: the index reads what the budget allows and catches up on later
    # requests (files it skipped keep no stamp), so a huge tree degrades the first answers, never blocks.
    max_read_files: int = 2_000
    max_read_bytes: int = 32_000_000
    max_request_s: float = 10.0


class ReadBudget:
    """What one request may still read from disk: files, bytes and wall time."""

    def __init__(self, limits: WorkspaceLimits):
        self.files, self.bytes = limits.max_read_files, limits.max_read_bytes
        self.deadline = time.monotonic() + limits.max_request_s

    def allows(self, size: int) -> bool:
        return self.files > 0 and size <= self.bytes and time.monotonic() < self.deadline

    def spend(self, size: int) -> None:
        self.files -= 1
        self.bytes -= size

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True)
class FileStamp:
    """What decides whether a file changed: its size and mtime on disk (or the open text's hash)."""

    path: str
    mtime_ns: int
    size: int


class Workspace:
    """A named root and overlays of open files keyed by relative path. `root` is the directory read from
    disk, None when the workspace is sent (`readable=False`) or has no root at all (open files only);
    `name` is the root as the client named it, normalized (None without a root)."""

    def __init__(self, root: str | os.PathLike | None, limits: WorkspaceLimits | None = None, *,
                 readable: bool = True):
        self.limits = limits or WorkspaceLimits()
        self.root = _checked_root(root) if root and readable else None
        self.name = str(self.root) if self.root else (_root_name(root) if root else None)
        self.budget = ReadBudget(self.limits)
        self.pinned_files: dict[str, str] = {}  # sent by UpdateFiles; kept until deleted
        self.request_files: dict[str, str] = {}  # sent with the current request; override pinned ones
        self.deleted: set[str] = set()  # deleted by UpdateFiles: hidden even if still on disk

    @property
    def open_files(self) -> dict[str, str]:
        return {**self.pinned_files, **self.request_files} if self.request_files else self.pinned_files

    def set_request_files(self, files: dict[str, str]) -> None:
        self.request_files = self._checked_files(files)
        self.budget = ReadBudget(self.limits)  # each request starts with a fresh read budget

    def pin_files(self, files: dict[str, str], deleted: list[str] = ()) -> None:
        self.budget = ReadBudget(self.limits)
        checked = self._checked_files(files)
        gone = {self.relative(path) for path in deleted}
        if len(self.pinned_files.keys() | checked.keys()) > self.limits.max_files:
            raise LimitError(f"more than {self.limits.max_files} files sent to the workspace")
        self.pinned_files.update(checked)
        for path in gone:
            self.pinned_files.pop(path, None)
        self.deleted = (self.deleted - checked.keys()) | gone

    def _checked_files(self, files: dict[str, str]) -> dict[str, str]:
        if len(files) > self.limits.max_open_files:
            raise LimitError(f"{len(files)} open files; the limit is {self.limits.max_open_files}")
        checked = {self.relative(path): text for path, text in files.items()}
        for path, text in checked.items():
            self._check_size(path, len(text.encode("utf-8", "surrogatepass")))
        return checked

    def relative(self, path: str) -> str:
        """The normalized relative POSIX path of `path` (relative or absolute) inside the root."""
        if not path or "\x00" in path:
            raise MalformedRequestError(f"invalid path {path!r}")
        pure = PurePosixPath(path.replace("\\", "/"))
        if pure.is_absolute():
            if self.name is None:
                raise MalformedRequestError(f"absolute path {path!r} without a workspace root")
            if self.root is None:
                return self._inside_name(pure)
            return self._inside_root(Path(path))
        if ".." in pure.parts:
            raise OutsideWorkspaceError(f"path {path!r} contains '..'")
        if self.root is not None:
            self._inside_root(self.root / pure)  # a symlink inside may still point out
        return str(pure)

    def read(self, path: str) -> str:
        relative = self.relative(path)
        if relative in self.open_files:
            return self.open_files[relative]
        return self.read_disk(relative)

    def read_disk(self, relative: str) -> str:
        """The saved version of a file, ignoring open files. Resolves symlinks and re-checks the result
        here, at the one place that opens files, whatever the caller checked before."""
        if relative in self.deleted or self.name is None:
            raise UnknownFileError(f"{relative} is not among the open files")
        if self.root is None:
            raise NotReadableError(
                f"{relative} was not sent and this server reads no files from disk for {self.name}: send it "
                "with UpdateFiles or the request's open files, or have the operator add the root to "
                "LONGBOW_CODE_ROOTS")
        absolute = self.root / self._inside_root(self.root / relative)
        if not absolute.is_file():
            raise UnknownFileError(f"{relative} does not exist in the workspace")
        size = absolute.stat().st_size
        self._check_size(relative, size)
        if not self.budget.allows(size):
            raise LimitError(f"reading {relative} would exceed this request's read limits "
                             f"({self.limits.max_read_files} files, {self.limits.max_read_bytes} bytes, "
                             f"{self.limits.max_request_s} s)")
        self.budget.spend(size)
        return absolute.read_text(encoding="utf-8", errors="replace")

    def exists(self, path: str) -> bool:
        relative = self.relative(path)
        if relative in self.open_files:
            return True
        return self.root is not None and relative not in self.deleted and (self.root / relative).is_file()

    def disk_path(self, relative: str) -> Path | None:
        return None if self.root is None else self.root / relative

    def stamps(self, suffixes: tuple[str, ...]) -> Iterator[FileStamp]:
        """Files on disk with one of `suffixes`, in a deterministic order, at most max_files of them.
        Links are not followed (so nothing outside the root is listed). NOTE: os.scandir, not pathlib:
        this runs on every request and pathlib tripled its cost on a 134-file workspace."""
        if self.root is None:
            return
        count = 0
        for stamp in _scan(str(self.root), "", suffixes):
            if stamp.path in self.deleted:
                continue
            count += 1
            if count > self.limits.max_files:
                return  # NOTE: a huge tree is indexed partially rather than refused: context degrades, never fails.
            yield stamp

    def _inside_name(self, path: PurePosixPath) -> str:
        """A sent workspace: absolute paths are compared as text, never looked up on disk."""
        normalized = PurePosixPath(posixpath.normpath(str(path)))
        name = PurePosixPath(self.name)
        if normalized == name or name not in normalized.parents:
            raise OutsideWorkspaceError(f"{path} is outside the workspace root")
        return normalized.relative_to(name).as_posix()

    def _inside_root(self, path: Path) -> str:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise OutsideWorkspaceError(f"{path} is outside the workspace root")
        return resolved.relative_to(self.root).as_posix()

    def _check_size(self, path: str, size: int) -> None:
        if size > self.limits.max_file_bytes:
            raise LimitError(f"{path} has {size} bytes; the limit is {self.limits.max_file_bytes}")


def _checked_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.is_absolute():
        raise MalformedRequestError(f"workspace root {root!s} must be an absolute path")
    resolved = path.resolve()
    if not resolved.is_dir():
        raise UnknownFileError(f"workspace root {root!s} is not a directory")
    return resolved


def _root_name(root: str | os.PathLike) -> str:
    """A sent workspace's root: absolute, normalized as text (never resolved: nothing on disk is touched)."""
    text = os.fspath(root).replace("\\", "/")
    if "\x00" in text or not PurePosixPath(text).is_absolute():
        raise MalformedRequestError(f"workspace root {text!r} must be an absolute path")
    return posixpath.normpath(text)


def _walkable(directory: str) -> bool:
    return not directory.startswith(".") and directory not in SKIPPED_DIRECTORIES


def _scan(directory: str, prefix: str, suffixes: tuple[str, ...]) -> Iterator[FileStamp]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_symlink():
            continue  # NOTE: links are skipped when listing; an explicit read still resolves them safely.
        if entry.is_dir(follow_symlinks=False):
            if _walkable(entry.name):
                yield from _scan(entry.path, prefix + entry.name + "/", suffixes)
        elif entry.name.endswith(suffixes):
            try:
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            yield FileStamp(prefix + entry.name, stat.st_mtime_ns, stat.st_size)
