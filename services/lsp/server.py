"""The language server: LSP features mapped onto the gateway's CodeAssist and Sessions RPCs (pygls).

    hover                          -> GetContext: expected type, relevant types and headers (markdown)
    completion                     -> GetRelevantHeaders as items (+ the model's fill for clients without
                                      inline completion)
    inlineCompletion (LSP 3.18)    -> Complete with error rounds at a typed hole, else the document's
                                      edit session predicts the rest of the line (its KV is kept)
    didOpen/didChange/didSave/...  -> UpdateFiles (sync.py) and session edits (documents.py)
    longbow/context, longbow/errorReport, longbow/documentState -> custom requests for richer clients

Every handler answers "nothing" rather than an error when the gateway is down or refuses a request (the
editor asked in passing; a popup per keystroke would be worse than no hover), and says why in
window/logMessage. Cancellation ($/cancelRequest) cancels the handler's task, which cancels its gRPC call.
An answer computed for a document version that is no longer current is dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from lsprotocol import types
from pygls.lsp.server import LanguageServer
from pygls.uris import to_fs_path

from longbow import __version__
from longbow.services.client.errors import LongbowError
from longbow.services.lsp.documents import TextDocument
from longbow.services.lsp.gateway_link import GatewayDown, GatewayLink, GatewaySettings
from longbow.services.lsp.positions import hole_of, offset_of
from longbow.services.lsp.sync import WorkspaceSync

log = logging.getLogger(__name__)

INLINE_MODES = ("auto", "complete", "session")


@dataclass(frozen=True)
class ServerSettings:
    gateway: GatewaySettings
    max_tokens: int = 32  # of an inline fill
    error_rounds: int = 1  # type-check rounds of a Complete (0-2)
    inline_mode: str = "auto"  # auto: Complete at a typed hole, the session elsewhere
    max_sessions: int = 4  # open documents with a PIE session on the gateway (least recently used closed)
    token_budget: int = 0  # packed context for Complete; 0: the gateway's default


class LongbowLanguageServer(LanguageServer):
    def __init__(self, settings: ServerSettings):
        super().__init__("longbow", __version__, text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.settings = settings
        self.documents: dict[str, TextDocument] = {}
        self.link: GatewayLink | None = None
        self.sync: WorkspaceSync | None = None
        self.root: Path | None = None
        self.inline_in_client = False  # the client renders textDocument/inlineCompletion itself
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()

    @property
    def encoding(self) -> str:
        encoding = self.workspace.position_encoding or types.PositionEncodingKind.Utf16
        return getattr(encoding, "value", encoding)  # an enum member's str() is its name, not "utf-16"

    # -- connection ---------------------------------------------------------------------------------------

    def connect(self) -> None:
        self.link = GatewayLink(self.settings.gateway, self._connection_changed)
        self.sync = WorkspaceSync(self.link, self.root, self.documents)
        self.spawn(self.sync.ensure())

    def _connection_changed(self, connected: bool, message: str) -> None:
        self.protocol.notify("longbow/status", {"connected": connected, "message": message})
        self.tell(message, types.MessageType.Info if connected else types.MessageType.Warning)
        if not connected:  # once per outage: the link reports only the transition
            self.window_show_message(types.ShowMessageParams(type=types.MessageType.Warning, message=message))
        else:
            for document in self.documents.values():  # a new epoch: sync_session closes the stale session
                self.spawn(self.sync_session(document))

    def tell(self, message: str, kind: types.MessageType = types.MessageType.Log) -> None:
        self.window_log_message(types.LogMessageParams(type=kind, message=message))

    def spawn(self, coroutine) -> None:
        """Run in the background, kept referenced until done; failures are logged, never raised."""
        task = asyncio.get_running_loop().create_task(self._quietly(coroutine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, coroutine) -> None:
        try:
            await coroutine
        except GatewayDown:
            pass
        except LongbowError as error:
            self.tell(f"longbow: {error.code.name}: {error.message}")
        except Exception:  # noqa: BLE001 - a background failure must not end the server
            log.exception("event=background_task_failed")

    # -- documents and sessions ------------------------------------------------------------------------------

    def lock(self, document: TextDocument) -> asyncio.Lock:
        return self._locks.setdefault(document.uri, asyncio.Lock())

    def text_changed(self, document: TextDocument) -> None:
        """A buffer was opened or edited: the gateway learns the text, the edit session follows (background)."""
        if self.sync is not None and document.language:
            self.sync.buffer_changed(document)
            self.spawn(self.sync_session(document))

    async def sync_session(self, document: TextDocument) -> None:
        """Bring the document's edit session up to its text: open one if it has none (or its gateway
        restarted), else send the edits made since the last call, all in one ApplyEdits."""
        async with self.lock(document):
            if document.uri not in self.documents or self.link is None:
                return
            if document.session_id is not None and document.session_epoch != self.link.epoch:
                # Reconnected: a restarted gateway lost the session, but after a network outage it still
                # holds its KV. Close it (best effort) rather than leave it to the idle expiry.
                stale, document.session_id = document.session_id, None
                try:
                    await self.link.call("close_session", stale)
                except (GatewayDown, LongbowError):
                    pass  # gone with a restart, or closed already
            if document.session_id is None:
                await self._open_session(document)
                return
            edits, document.pending_edits = document.pending_edits, []
            if not edits:
                return
            try:
                result = await self.link.call("apply_edits", document.session_id, edits)
            except LongbowError as error:
                if error.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise
                # Expired, or closed by the gateway (a full KV cache): start over from the current text.
                self.tell(f"longbow: session of {document.uri} lost ({error.message}); reopening")
                document.session_id = None
                await self._open_session(document)
                return
            document.session_tokens = result.tokens

    async def _open_session(self, document: TextDocument) -> None:
        await self._make_room_for_a_session(document)
        text, epoch = document.text, self.link.epoch
        document.pending_edits = []  # edits made while the open is in flight apply to `text`: keep those
        session_id = await self.link.call("open_session", text)
        if document.uri not in self.documents:  # closed while opening
            await self.link.call("close_session", session_id)
            return
        document.session_id, document.session_epoch = session_id, epoch
        document.last_used = time.monotonic()

    async def _make_room_for_a_session(self, document: TextDocument) -> None:
        holding = [d for d in self.documents.values() if d.session_id is not None and d is not document]
        holding.sort(key=lambda d: d.last_used)
        while len(holding) >= self.settings.max_sessions:
            await self.close_session(holding.pop(0))

    async def close_session(self, document: TextDocument) -> None:
        session_id, document.session_id = document.session_id, None
        # Even from an older epoch: after a network outage (not a restart) the gateway still holds it.
        if session_id is not None:
            try:
                await self.link.call("close_session", session_id)
            except (GatewayDown, LongbowError):
                pass  # gone already; an idle session also expires on the gateway

    # -- requests ------------------------------------------------------------------------------------------

    def document(self, uri: str) -> TextDocument:
        document = self.documents.get(uri)
        if document is None:
            raise UnknownDocument(f"{uri} is not open")
        return document

    async def hole(self, document: TextDocument, position: types.Position) -> tuple[str, str, int, int, dict]:
        """(root, path, line, column, open_files) of the API's hole at an LSP position (snapshot now)."""
        text = document.text
        line, column = hole_of(text, position.line, position.character, self.encoding)
        root, path, files = await self.sync.hole_arguments(document, text)
        return root, path, line, column, files

    async def inline_fill(self, document: TextDocument, position: types.Position) -> str | None:
        """The model's text at the position, or None when the document changed meanwhile (stale)."""
        version = document.version
        offset = offset_of(document.text, position.line, position.character, self.encoding)
        root, path, line, column, files = await self.hole(document, position)
        mode = self.settings.inline_mode
        if mode == "auto":
            expected = await self.link.call("expected_type", root, path, line, column, open_files=files)
            mode = "complete" if expected.text else "session"
        fill = await self._predict(document, offset, version) if mode == "session" else None
        if fill is None and document.version == version:
            completion = await self.link.call(
                "complete_hole", root, path, line, column, open_files=files, max_tokens=self.settings.max_tokens,
                error_rounds=self.settings.error_rounds, token_budget=self.settings.token_budget)
            fill = completion.fill
        return fill if document.version == version else None

    async def _predict(self, document: TextDocument, offset: int, version: int) -> str | None:
        await self.sync_session(document)
        async with self.lock(document):
            if document.session_id is None or document.version != version or document.pending_edits:
                return None
            document.last_used = time.monotonic()
            return await self.link.call("predict", document.session_id, offset, max_tokens=self.settings.max_tokens)


class UnknownDocument(Exception):
    """A request named a document the client never opened."""


def answers_nothing_on_failure(handler):
    """The gateway down, a refused request or an unopened document: log it, answer None (no result)."""

    @functools.wraps(handler)
    async def wrapped(ls: LongbowLanguageServer, params):
        try:
            return await handler(ls, params)
        except GatewayDown:
            return None
        except LongbowError as error:
            ls.tell(f"longbow: {handler.__name__}: {error.code.name}: {error.message}")
        except UnknownDocument as error:
            ls.tell(f"longbow: {handler.__name__}: {error}")
        except Exception:  # noqa: BLE001 - one failed answer must never end the server
            log.exception("event=handler_failed handler=%s", handler.__name__)
            ls.tell(f"longbow: {handler.__name__} failed (see the server's stderr)", types.MessageType.Error)
        return None

    return wrapped


def build_server(settings: ServerSettings) -> LongbowLanguageServer:
    server = LongbowLanguageServer(settings)
    _register_lifecycle(server)
    _register_documents(server)
    _register_requests(server)
    return server


def _register_lifecycle(server: LongbowLanguageServer) -> None:
    @server.feature(types.INITIALIZE)
    def initialize(ls: LongbowLanguageServer, params: types.InitializeParams) -> None:
        folders = params.workspace_folders or []
        root_uri = folders[0].uri if folders else params.root_uri
        ls.root = Path(to_fs_path(root_uri)).resolve() if root_uri else None
        text_document = params.capabilities.text_document
        ls.inline_in_client = bool(text_document and text_document.inline_completion is not None)
        log.info("event=initialize root=%s encoding=%s inline_in_client=%s", ls.root, ls.encoding, ls.inline_in_client)

    @server.feature(types.INITIALIZED)
    def initialized(ls: LongbowLanguageServer, params) -> None:
        ls.connect()

    @server.feature(types.SHUTDOWN)
    async def shutdown(ls: LongbowLanguageServer, params) -> None:
        # Let session opens and edits in flight land first (bounded): an open finishing after the close
        # below would leave its KV on the gateway until the idle expiry.
        if ls._tasks:
            await asyncio.wait(list(ls._tasks), timeout=10.0)
        for document in list(ls.documents.values()):
            await ls.close_session(document)
        if ls.link is not None:
            await ls.link.close()


def _register_documents(server: LongbowLanguageServer) -> None:
    # NOTE: plain (not async) handlers: pygls runs them in arrival order, so edits are applied to our copy
    # of each buffer in the order the editor made them; only the gateway calls go to the background.
    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: LongbowLanguageServer, params: types.DidOpenTextDocumentParams) -> None:
        item = params.text_document
        path = Path(to_fs_path(item.uri)).resolve() if item.uri.startswith("file:") else None
        document = TextDocument(item.uri, path, item.language_id, item.version, item.text)
        ls.documents[item.uri] = document
        ls.text_changed(document)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: LongbowLanguageServer, params: types.DidChangeTextDocumentParams) -> None:
        document = ls.documents.get(params.text_document.uri)
        if document is None:
            return
        for change in params.content_changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                start, end = change.range.start, change.range.end
                document.apply((start.line, start.character), (end.line, end.character), change.text, ls.encoding)
            else:
                document.apply(None, None, change.text, ls.encoding)
        document.version = params.text_document.version
        ls.text_changed(document)

    @server.feature(types.TEXT_DOCUMENT_DID_SAVE)
    def did_save(ls: LongbowLanguageServer, params: types.DidSaveTextDocumentParams) -> None:
        document = ls.documents.get(params.text_document.uri)
        if document is not None and ls.sync is not None and document.language:
            ls.sync.buffer_changed(document)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: LongbowLanguageServer, params: types.DidCloseTextDocumentParams) -> None:
        document = ls.documents.pop(params.text_document.uri, None)
        if document is None or ls.sync is None:
            return
        # The buffer is gone: the gateway should see the file as saved on disk (or not at all).
        saved = document.path is not None and document.path.is_file()
        if saved:
            document.text = document.path.read_text(encoding="utf-8", errors="replace")
        ls.sync.buffer_changed(document, deleted=not saved)
        ls.spawn(ls.close_session(document))


def _register_requests(server: LongbowLanguageServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_HOVER)
    @answers_nothing_on_failure
    async def hover(ls: LongbowLanguageServer, params: types.HoverParams) -> types.Hover | None:
        document = ls.document(params.text_document.uri)
        version = document.version
        root, path, line, column, files = await ls.hole(document, params.position)
        found = await ls.link.call("code_context", root, path, line, column, open_files=files)
        if not found.expected_type.text or document.version != version:
            return None  # not a typed hole (or stale): no hover rather than an empty one
        return types.Hover(contents=types.MarkupContent(kind=types.MarkupKind.Markdown,
                                                        value=hover_markdown(found, document.language)))

    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=["(", ",", "="]))
    @answers_nothing_on_failure
    async def completion(ls: LongbowLanguageServer, params: types.CompletionParams) -> types.CompletionList | None:
        document = ls.document(params.text_document.uri)
        version = document.version
        root, path, line, column, files = await ls.hole(document, params.position)
        headers = await ls.link.call("relevant_headers", root, path, line, column, open_files=files)
        items = [header_item(rank, header) for rank, header in enumerate(headers)]
        if not ls.inline_in_client:  # the only way such a client sees the model's fill
            fill = await ls.inline_fill(document, params.position)
            if fill and fill.strip():
                items.append(fill_item(fill))
        if document.version != version:
            return None
        # Incomplete: what fits the hole changes as the identifier is typed, so the client asks again.
        return types.CompletionList(is_incomplete=True, items=items)

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    @answers_nothing_on_failure
    async def inline_completion(ls: LongbowLanguageServer,
                                params: types.InlineCompletionParams) -> types.InlineCompletionList | None:
        document = ls.document(params.text_document.uri)
        fill = await ls.inline_fill(document, params.position)
        if not fill:
            return None
        here = types.Range(start=params.position, end=params.position)
        return types.InlineCompletionList(items=[types.InlineCompletionItem(insert_text=fill, range=here)])

    @server.feature("longbow/context")
    @answers_nothing_on_failure
    async def context(ls: LongbowLanguageServer, params) -> dict | None:
        """The whole typed-hole context: {expected_type, bindings, type_definitions, headers, packed_*}."""
        document, position = _document_position(ls, params)
        root, path, line, column, files = await ls.hole(document, position)
        return dataclasses.asdict(await ls.link.call("code_context", root, path, line, column, open_files=files))

    @server.feature("longbow/errorReport")
    @answers_nothing_on_failure
    async def error_report(ls: LongbowLanguageServer, params) -> dict | None:
        """Type errors of `fill` typed at the position: {diagnostics: [{message, line, column, severity}]}."""
        document, position = _document_position(ls, params)
        root, path, line, column, files = await ls.hole(document, position)
        diagnostics = await ls.link.call("error_report", root, path, line, column, str(_field(params, "fill")),
                                         open_files=files)
        return {"diagnostics": [dataclasses.asdict(d) for d in diagnostics]}

    @server.feature("longbow/documentState")
    @answers_nothing_on_failure
    async def document_state(ls: LongbowLanguageServer, params) -> dict | None:
        """What the gateway holds for a document: its session and the session's token count."""
        document = ls.document(str(_field(_field(params, "textDocument"), "uri")))
        await ls.sync_session(document)
        async with ls.lock(document):
            if document.session_id is not None and not document.pending_edits:
                document.session_tokens = (await ls.link.call("apply_edits", document.session_id, [])).tokens
        return {"version": document.version, "sessionId": document.session_id, "sessionTokens": document.session_tokens,
                "workspaceMode": ls.sync.mode, "connected": ls.link.connected}


def _field(params: Any, name: str) -> Any:
    """A field of a custom request's params (pygls hands them over as a dict or an attribute object)."""
    return params.get(name) if isinstance(params, dict) else getattr(params, name)


def _document_position(ls: LongbowLanguageServer, params) -> tuple[TextDocument, types.Position]:
    position = _field(params, "position")
    return (ls.document(str(_field(_field(params, "textDocument"), "uri"))),
            types.Position(line=int(_field(position, "line")), character=int(_field(position, "character"))))


SOURCES = {"return": "the return type", "annotated_assignment": "the annotated target",
           "call_argument": "the parameter it is passed to", "declaration": "the declared type"}


def hover_markdown(found, language: str) -> str:
    expected = found.expected_type
    lines = [f"**Expected type** `{expected.text}`"
             + (f" (from {SOURCES.get(expected.source, expected.source)})" if expected.source else "")]
    if found.type_definitions:
        code = "\n\n".join(item.text for item in found.type_definitions[:4])
        lines += ["", "**Relevant types**", f"```{language}", code, "```"]
    if found.headers:
        lines += ["", "**Fits the hole**"] + [f"- `{h.name}` {h.path}:{h.line} ({h.detail})" for h in found.headers[:8]]
    return "\n".join(lines)


def header_item(rank: int, header) -> types.CompletionItem:
    signature = header.text.strip().splitlines()[0] if header.text.strip() else header.name
    return types.CompletionItem(
        label=header.name, kind=types.CompletionItemKind.Function, detail=f"{signature}  [{header.detail}]",
        documentation=types.MarkupContent(kind=types.MarkupKind.Markdown, value=f"{header.path}:{header.line}"),
        sort_text=f"{rank:04d}", insert_text=header.name)


def fill_item(fill: str) -> types.CompletionItem:
    first_line = fill.strip().splitlines()[0]
    return types.CompletionItem(label=first_line[:60], kind=types.CompletionItemKind.Snippet, insert_text=fill,
                                insert_text_format=types.InsertTextFormat.PlainText,
                                detail="Longbow: the model's fill", sort_text="zzzz")


def run_stdio(settings: ServerSettings) -> int:
    build_server(settings).start_io()
    return 0
