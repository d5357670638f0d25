"""Type-checking a fill: the file with the fill typed at the hole goes through mypy (Python, in a
subprocess with --shadow-file, so the workspace is never written) or tsc (TypeScript, via the Node
helper). Only diagnostics on the lines the fill occupies are reported: the rest of a file being edited
is often broken, and those errors are not the model's to fix."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from longbow.rag.codectx.errors import CheckerUnavailableError, PositionError
from longbow.rag.codectx.records import Diagnostic
from longbow.rag.codectx.workspace import Workspace

MYPY_TIMEOUT_S = 120.0
_MYPY_LINE = re.compile(r"^(?P<path>.+?):(?P<line>\d+):(?P<column>\d+): (?P<severity>error|note|warning): (?P<message>.*)$")


def insert_fill(text: str, line: int, column: int, fill: str) -> tuple[str, int, int]:
    """The text with `fill` inserted at 1-based (line, column), and the first and last 1-based lines
    the fill occupies."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines) or not 1 <= column <= len(lines[line - 1]) + 1:
        raise PositionError(f"position {line}:{column} is outside the file")
    offset = sum(len(x) + 1 for x in lines[: line - 1]) + column - 1
    return text[:offset] + fill + text[offset:], line, line + fill.count("\n")


def check_fill(workspace: Workspace, request, fill: str, language: str, typescript: Callable) -> list[Diagnostic]:
    relative = workspace.relative(request.path)
    filled, first, last = insert_fill(workspace.read(relative), request.line, request.column, fill)
    if language == "python":
        diagnostics = mypy_diagnostics(workspace, relative, filled)
    else:
        diagnostics = typescript().check(workspace, relative, filled)
    return [d for d in diagnostics if first <= d.line <= last]


def mypy_diagnostics(workspace: Workspace, relative: str, text: str) -> list[Diagnostic]:
    with tempfile.TemporaryDirectory(prefix="longbow-mypy-") as scratch:
        shadow = Path(scratch) / Path(relative).name
        shadow.write_text(text, encoding="utf-8")
        on_disk = workspace.disk_path(relative)
        if on_disk is not None and on_disk.is_file():
            target, cwd = on_disk, workspace.root
            shadows = [str(on_disk), str(shadow)]
        else:  # an unsaved file: check the copy where it stands, beside nothing else
            target, cwd, shadows = shadow, Path(scratch), []
        output = _run_mypy([*_shadow_arguments(shadows), str(target)], cwd)
    return _parse_mypy(output, target.name)


def _shadow_arguments(pair: list[str]) -> list[str]:
    return ["--shadow-file", *pair] if pair else []


def _run_mypy(arguments: list[str], cwd: Path) -> str:
    cache = Path(tempfile.gettempdir()) / "longbow-mypy-cache"  # NOTE: outside the workspace, never written there
    command = [sys.executable, "-m", "mypy", "--no-error-summary", "--show-column-numbers", "--hide-error-context",
               "--no-color-output", "--follow-imports=silent", "--ignore-missing-imports", "--no-pretty",
               f"--cache-dir={cache}", *arguments]
    try:
        completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                                   timeout=MYPY_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CheckerUnavailableError(f"mypy did not run: {error}") from None
    output = completed.stdout + completed.stderr
    # NOTE: exit status 2 is also how mypy reports a syntax error in the file: a diagnostic, not a failure.
    if completed.returncode not in (0, 1) and not any(_MYPY_LINE.match(x.strip()) for x in output.splitlines()):
        raise CheckerUnavailableError(f"mypy failed: {output.strip()[:500]}")
    return output


def _parse_mypy(output: str, file_name: str) -> list[Diagnostic]:
    diagnostics = []
    for line in output.splitlines():
        match = _MYPY_LINE.match(line.strip())
        if match and Path(match["path"]).name == file_name:
            diagnostics.append(Diagnostic(match["message"], int(match["line"]), int(match["column"]),
                                          match["severity"]))
    return diagnostics
