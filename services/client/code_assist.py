"""SDK calls for typed-hole context and completion. Mixed into `LongbowClient` / `AsyncLongbowClient` (sdk.py), which provide
`self._session_channel` and `self._call(method, request)` (retries, auth, errors as LongbowError). The workspace
index UpdateFiles feeds lives in one replica, so these calls use the channel pinned to one replica (sdk.py).

Every call names a hole the same way: `workspace_root` (absolute, on the server's machine; "" to send only
`open_files`), `path` relative to it, 1-based `line` and `column`; `open_files` maps relative paths to
unsaved text. Results are plain dataclasses."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from longbow.v1 import code_assist_pb2 as pb
from longbow.v1 import code_assist_pb2_grpc
from longbow.v1 import generation_pb2 as gen_pb


@dataclass(frozen=True)
class ContextItem:
    """kind: "type_definition", "header" or "binding"; path relative to the root, 1-based line."""

    kind: str
    name: str
    text: str
    path: str
    line: int
    detail: str = ""


@dataclass(frozen=True)
class ExpectedType:
    text: str
    source: str


@dataclass
class CodeContext:
    expected_type: ExpectedType
    bindings: list[ContextItem] = field(default_factory=list)
    type_definitions: list[ContextItem] = field(default_factory=list)
    headers: list[ContextItem] = field(default_factory=list)
    packed_context: str = ""
    packed_tokens: int = 0
    packed_items: list[ContextItem] = field(default_factory=list)


@dataclass(frozen=True)
class Diagnostic:
    message: str
    line: int
    column: int
    severity: str


@dataclass
class HoleCompletion:
    fill: str
    diagnostics: list[Diagnostic]
    rounds_used: int
    context_tokens: int


def hole_request(workspace_root: str, path: str, line: int, column: int, *, open_files: dict[str, str] | None = None,
                 token_budget: int = 0, language: str = "") -> pb.CodeContextRequest:
    return pb.CodeContextRequest(
        workspace_root=workspace_root, token_budget=token_budget, language=language,
        hole=pb.HoleLocation(path=path, position=pb.Position(line=line, column=column)),
        open_files=[pb.OpenFile(path=p, text=t) for p, t in (open_files or {}).items()])


def _complete_request(hole: pb.CodeContextRequest, max_tokens: int, temperature: float,
                      error_rounds: int) -> pb.CompleteRequest:
    sampling = gen_pb.SamplingOptions(max_tokens=max_tokens, temperature=temperature)
    return pb.CompleteRequest(context=hole, sampling=sampling, error_rounds=error_rounds)


def _update_request(workspace_root: str, files: dict[str, str], deleted: list[str] | tuple = ()) -> pb.UpdateFilesRequest:
    return pb.UpdateFilesRequest(workspace_root=workspace_root, deleted_paths=list(deleted),
                                 files=[pb.OpenFile(path=p, text=t) for p, t in files.items()])


def _item(item: pb.ContextItem) -> ContextItem:
    return ContextItem(item.kind, item.name, item.text, item.path, item.line, item.detail)


def _items(items) -> list[ContextItem]:
    return [_item(i) for i in items]


def _expected(expected: pb.ExpectedType) -> ExpectedType:
    return ExpectedType(expected.text, expected.source)


def _diagnostics(diagnostics) -> list[Diagnostic]:
    return [Diagnostic(d.message, d.line, d.column, d.severity) for d in diagnostics]


def _context(r: pb.CodeContextResponse) -> CodeContext:
    return CodeContext(_expected(r.expected_type), _items(r.bindings), _items(r.type_definitions), _items(r.headers),
                       r.packed_context, r.packed_tokens, _items(r.packed_items))


def _completion(r: pb.CompleteResponse) -> HoleCompletion:
    return HoleCompletion(r.fill, _diagnostics(r.diagnostics), r.rounds_used, r.context_tokens)


class CodeAssistCalls:
    @functools.cached_property
    def _code_assist_stub(self):
        return code_assist_pb2_grpc.CodeAssistStub(self._session_channel)

    def code_context(self, workspace_root: str, path: str, line: int, column: int, **options) -> CodeContext:
        """The whole context of a hole (options: open_files, token_budget, language)."""
        request = hole_request(workspace_root, path, line, column, **options)
        return _context(self._call(self._code_assist_stub.GetContext, request))

    def expected_type(self, workspace_root: str, path: str, line: int, column: int, **options) -> ExpectedType:
        request = hole_request(workspace_root, path, line, column, **options)
        return _expected(self._call(self._code_assist_stub.GetExpectedType, request).expected_type)

    def relevant_types(self, workspace_root: str, path: str, line: int, column: int, **options) -> list[ContextItem]:
        request = hole_request(workspace_root, path, line, column, **options)
        return _items(self._call(self._code_assist_stub.GetRelevantTypes, request).items)

    def relevant_headers(self, workspace_root: str, path: str, line: int, column: int, **options) -> list[ContextItem]:
        request = hole_request(workspace_root, path, line, column, **options)
        return _items(self._call(self._code_assist_stub.GetRelevantHeaders, request).items)

    def error_report(self, workspace_root: str, path: str, line: int, column: int, fill: str,
                     **options) -> list[Diagnostic]:
        """Type errors of `fill` typed at the hole (on the lines it occupies)."""
        request = pb.ErrorReportRequest(context=hole_request(workspace_root, path, line, column, **options), fill=fill)
        return _diagnostics(self._call(self._code_assist_stub.GetErrorReport, request).diagnostics)

    def complete_hole(self, workspace_root: str, path: str, line: int, column: int, *, max_tokens: int = 0,
                      temperature: float = 0.0, error_rounds: int = 1, **options) -> HoleCompletion:
        """The model's fill for the hole, re-asked with type errors up to `error_rounds` (<= 2) times."""
        hole = hole_request(workspace_root, path, line, column, **options)
        request = _complete_request(hole, max_tokens, temperature, error_rounds)
        return _completion(self._call(self._code_assist_stub.Complete, request))

    def update_files(self, workspace_root: str, files: dict[str, str], deleted: list[str] | tuple = ()) -> int:
        """Send changed files (full text) and deleted paths; returns the Python definitions indexed."""
        response = self._call(self._code_assist_stub.UpdateFiles, _update_request(workspace_root, files, deleted))
        return response.indexed_definitions


class AsyncCodeAssistCalls:
    @functools.cached_property
    def _code_assist_stub(self):
        return code_assist_pb2_grpc.CodeAssistStub(self._session_channel)

    async def code_context(self, workspace_root: str, path: str, line: int, column: int, **options) -> CodeContext:
        request = hole_request(workspace_root, path, line, column, **options)
        return _context(await self._call(self._code_assist_stub.GetContext, request))

    async def expected_type(self, workspace_root: str, path: str, line: int, column: int, **options) -> ExpectedType:
        request = hole_request(workspace_root, path, line, column, **options)
        return _expected((await self._call(self._code_assist_stub.GetExpectedType, request)).expected_type)

    async def relevant_types(self, workspace_root: str, path: str, line: int, column: int,
                             **options) -> list[ContextItem]:
        request = hole_request(workspace_root, path, line, column, **options)
        return _items((await self._call(self._code_assist_stub.GetRelevantTypes, request)).items)

    async def relevant_headers(self, workspace_root: str, path: str, line: int, column: int,
                               **options) -> list[ContextItem]:
        request = hole_request(workspace_root, path, line, column, **options)
        return _items((await self._call(self._code_assist_stub.GetRelevantHeaders, request)).items)

    async def error_report(self, workspace_root: str, path: str, line: int, column: int, fill: str,
                           **options) -> list[Diagnostic]:
        request = pb.ErrorReportRequest(context=hole_request(workspace_root, path, line, column, **options), fill=fill)
        return _diagnostics((await self._call(self._code_assist_stub.GetErrorReport, request)).diagnostics)

    async def complete_hole(self, workspace_root: str, path: str, line: int, column: int, *, max_tokens: int = 0,
                            temperature: float = 0.0, error_rounds: int = 1, **options) -> HoleCompletion:
        hole = hole_request(workspace_root, path, line, column, **options)
        request = _complete_request(hole, max_tokens, temperature, error_rounds)
        return _completion(await self._call(self._code_assist_stub.Complete, request))

    async def update_files(self, workspace_root: str, files: dict[str, str], deleted: list[str] | tuple = ()) -> int:
        response = await self._call(self._code_assist_stub.UpdateFiles, _update_request(workspace_root, files, deleted))
        return response.indexed_definitions
