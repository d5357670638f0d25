"""Errors code context raises. The gateway maps them to status codes; nothing here knows gRPC."""

from __future__ import annotations


class CodeContextError(Exception):
    """Base of every error a caller can fix by changing its request."""


class MalformedRequestError(CodeContextError):
    """A request that cannot name a file: a relative workspace root, an empty path, no root at all."""


class OutsideWorkspaceError(CodeContextError):
    """A path escapes the workspace root (`..`, an absolute path elsewhere, or a symlink out)."""


class NotReadableError(CodeContextError):
    """The server may not read this file from disk: no configured root covers the workspace (the default),
    so only files the client sent exist. The fix: send the file, or configure the root on the server."""


class UnknownFileError(CodeContextError):
    """The file is neither open in the request nor present in the workspace."""


class PositionError(CodeContextError):
    """A line or column outside the file."""


class LimitError(CodeContextError):
    """A file, request or workspace over the configured size limits."""


class UnsupportedLanguageError(CodeContextError):
    """Neither Python nor TypeScript."""


class CheckerUnavailableError(CodeContextError):
    """The type checker (mypy, or node + typescript) could not be started."""
