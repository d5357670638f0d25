"""Code-assist RPCs (ChatLSP-shaped typed-hole context, error reports, completion, workspace updates).

Handlers decode, make one call into `rag.codectx.CodeContextService` on a worker thread (parsing and
indexing block), and encode. Code-context errors become the gateway's error types here, so the one
interceptor (errors.py) picks the status code: unknown files NOT_FOUND; paths outside the root and files
the server may not read PERMISSION_DENIED; bad positions OUT_OF_RANGE; oversized requests
INVALID_ARGUMENT; a type checker that cannot run UNAVAILABLE.

The server reads disk only under `code.allowed_roots` (LONGBOW_CODE_ROOTS); by default a workspace is
what the client sends (UpdateFiles, open files), which is how a remote gateway serves an editor anyway.
"""

from __future__ import annotations

import asyncio
import functools

from longbow.v1 import code_assist_pb2 as pb
from longbow.v1 import code_assist_pb2_grpc
from longbow.rag.codectx import errors as codectx_errors
from longbow.rag.codectx.records import CodeContext, ContextItem, Diagnostic, ExpectedType
from longbow.rag.codectx.service import CodeContextService, HoleRequest
from longbow.rag.codectx.workspace import WorkspaceLimits
from longbow.services.config import CodeContextConfig
from longbow.services.engine.errors import EngineError, InvalidRequestError
from longbow.services.gateway.errors import NotFoundError
from longbow.services.gateway.runtime import GatewayRuntime


class CheckerUnavailableError(EngineError):
    """The type checker could not run (UNAVAILABLE: a restarted helper may answer the retry)."""


def _gateway_error(error: codectx_errors.CodeContextError) -> Exception:
    if isinstance(error, codectx_errors.UnknownFileError):
        return NotFoundError(str(error))
    if isinstance(error, codectx_errors.CheckerUnavailableError):
        return CheckerUnavailableError(str(error))
    if isinstance(error, (codectx_errors.PositionError, codectx_errors.OutsideWorkspaceError,
                          codectx_errors.NotReadableError)):
        return error  # OUT_OF_RANGE / PERMISSION_DENIED (gateway/errors.py)
    if isinstance(error, (codectx_errors.LimitError, codectx_errors.UnsupportedLanguageError,
                          codectx_errors.MalformedRequestError)):
        return InvalidRequestError(str(error))
    return error  # a helper failure nobody can fix by changing the request: INTERNAL, logged


class CodeAssistServicer(code_assist_pb2_grpc.CodeAssistServicer):
    def __init__(self, service: CodeContextService, config: CodeContextConfig, lm_factory):
        self.service, self.config, self._lm_factory = service, config, lm_factory

    async def GetExpectedType(self, request, context):
        found = await self._call(self.service.context, self._hole(request))
        return pb.ExpectedTypeResponse(expected_type=_expected_pb(found.expected_type))

    async def GetRelevantTypes(self, request, context):
        found = await self._call(self.service.context, self._hole(request))
        return pb.ContextItemsResponse(items=[_item_pb(i) for i in found.type_definitions])

    async def GetRelevantHeaders(self, request, context):
        found = await self._call(self.service.context, self._hole(request))
        return pb.ContextItemsResponse(items=[_item_pb(i) for i in found.headers])

    async def GetErrorReport(self, request, context):
        diagnostics = await self._call(self.service.check, self._hole(request.context), request.fill)
        return pb.ErrorReportResponse(diagnostics=[_diagnostic_pb(d) for d in diagnostics])

    async def GetContext(self, request, context):
        return _context_pb(await self._call(self.service.context, self._hole(request)))

    async def Complete(self, request, context):
        hole = self._hole(request.context)
        max_tokens = request.sampling.max_tokens or self.config.default_max_tokens
        completion = await self._call(functools.partial(
            self.service.complete, self._lm_factory(), hole, error_rounds=request.error_rounds,
            max_tokens=max_tokens, temperature=request.sampling.temperature))
        return pb.CompleteResponse(fill=completion.fill, rounds_used=completion.rounds_used,
                                   diagnostics=[_diagnostic_pb(d) for d in completion.diagnostics],
                                   context_tokens=completion.context.packed_tokens if completion.context else 0)

    async def UpdateFiles(self, request, context):
        files = {f.path: f.text for f in request.files}
        count = await self._call(self.service.update_files, request.workspace_root, files, list(request.deleted_paths))
        return pb.UpdateFilesResponse(indexed_definitions=count)

    async def close(self) -> None:
        await asyncio.to_thread(self.service.close)

    def _hole(self, request: pb.CodeContextRequest) -> HoleRequest:
        if not request.hole.path:
            raise InvalidRequestError("hole.path is required")
        budget = request.token_budget or self.config.default_token_budget
        if budget > self.config.max_token_budget:
            raise InvalidRequestError(f"token_budget {budget} is over the limit {self.config.max_token_budget}")
        return HoleRequest(request.workspace_root, request.hole.path, request.hole.position.line,
                           request.hole.position.column, budget, {f.path: f.text for f in request.open_files},
                           request.language)

    async def _call(self, function, *args):
        try:
            return await asyncio.to_thread(function, *args)
        except codectx_errors.CodeContextError as error:
            raise _gateway_error(error) from error


def _expected_pb(expected: ExpectedType) -> pb.ExpectedType:
    return pb.ExpectedType(text=expected.text, source=expected.source)


def _item_pb(item: ContextItem) -> pb.ContextItem:
    return pb.ContextItem(kind=item.kind, name=item.name, text=item.text, path=item.path, line=item.line,
                          detail=item.detail)


def _diagnostic_pb(diagnostic: Diagnostic) -> pb.Diagnostic:
    return pb.Diagnostic(message=diagnostic.message, line=diagnostic.line, column=diagnostic.column,
                         severity=diagnostic.severity)


def _context_pb(found: CodeContext) -> pb.CodeContextResponse:
    return pb.CodeContextResponse(
        expected_type=_expected_pb(found.expected_type), bindings=[_item_pb(i) for i in found.bindings],
        type_definitions=[_item_pb(i) for i in found.type_definitions], headers=[_item_pb(i) for i in found.headers],
        packed_context=found.packed_text, packed_tokens=found.packed_tokens,
        packed_items=[_item_pb(i) for i in found.packed_items])


def readable_roots_line(config: CodeContextConfig) -> str:
    """What `longbow serve` prints, so an operator sees which directories clients can make it read."""
    if not config.allowed_roots:
        return "code context reads no files from disk (clients send them; set LONGBOW_CODE_ROOTS to allow roots)"
    return "code context may read files under: " + ", ".join(config.allowed_roots)


def create_servicer(runtime: GatewayRuntime) -> CodeAssistServicer:
    config = runtime.config.code
    tokenizer = runtime.tokenizer

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    limits = WorkspaceLimits(config.max_file_bytes, config.max_files, config.max_open_files,
                             config.max_read_files, config.max_read_bytes, config.max_request_s)
    service = CodeContextService(limits, count_tokens, tuple(config.allowed_roots), config.max_workspaces)
    return CodeAssistServicer(service, config, runtime.lm)
