"""Keeps the gateway's view of the workspace equal to the editor's (see workspace_files for the two modes).

`hole_arguments` is what every context call names: (workspace_root, path, open_files). The buffer the
request is about always travels with the request itself, so an answer never describes a text older than
the one the position refers to, whatever UpdateFiles is still in flight.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc

from longbow.services.client.errors import LongbowError
from longbow.services.lsp.documents import TextDocument
from longbow.services.lsp.gateway_link import GatewayLink
from longbow.services.lsp.workspace_files import (FileLimits, batches, import_closure, read_file_under,
                                                  source_files)

log = logging.getLogger(__name__)

# What a gateway answers for a root it cannot or will not use as a workspace: it does not exist there
# (NOT_FOUND), is not under LONGBOW_CODE_ROOTS (PERMISSION_DENIED), or is refused as malformed.
ROOT_REFUSED = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION)


class WorkspaceSync:
    def __init__(self, link: GatewayLink, root: Path | None, documents: dict[str, TextDocument],
                 limits: FileLimits = FileLimits()):
        self.link, self.root, self.documents, self.limits = link, root, documents, limits
        self.mode = "unknown"  # "pinned" or "detached" once the gateway has answered
        self._synced_epoch = -1
        self._lock = asyncio.Lock()
        self._dirty: dict[str, str | None] = {}  # relative path -> text to pin (None: deleted)
        self._flusher: asyncio.Task | None = None

    def relative(self, document: TextDocument) -> tuple[str, str]:
        """(root the path is relative to, relative path) of a document: the workspace root when the file is
        inside it, else the file's own directory (an untitled buffer gets a name from its URI)."""
        if document.path is None:
            suffix = ".ts" if document.language == "typescript" else ".py"
            return "", "untitled" + suffix
        if self.root is not None and self.root in document.path.parents:
            return str(self.root), document.path.relative_to(self.root).as_posix()
        return str(document.path.parent), document.path.name

    async def ensure(self) -> None:
        """Send the workspace once per gateway connection (a restarted gateway lost it)."""
        if self._synced_epoch == self.link.epoch and self.mode != "unknown":
            return
        async with self._lock:
            if self._synced_epoch == self.link.epoch and self.mode != "unknown":
                return
            epoch = self.link.epoch
            self.mode = await self._pin_workspace() if self.root is not None else "detached"
            self._synced_epoch = epoch
            log.info("event=workspace_synced mode=%s root=%s epoch=%d", self.mode, self.root, epoch)

    async def _pin_workspace(self) -> str:
        files = await asyncio.to_thread(source_files, self.root, self.limits)
        files.update({rel: d.text for d in self.documents.values() for root, rel in [self.relative(d)]
                      if root == str(self.root)})
        try:
            for batch in batches(files, self.limits.batch_files) if files else [{}]:
                await self.link.call("update_files", str(self.root), batch)
        except LongbowError as error:
            if error.code not in ROOT_REFUSED:
                raise
            log.info("event=root_refused root=%s code=%s: requests carry their files", self.root, error.code.name)
            return "detached"
        return "pinned"

    def buffer_changed(self, document: TextDocument, deleted: bool = False) -> None:
        """Queue the buffer for UpdateFiles (pinned mode); changes coalesce, one call in flight."""
        root, rel = self.relative(document)
        if self.mode != "pinned" or root != str(self.root):
            return
        self._dirty[rel] = None if deleted else document.text
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            files = {p: t for p, t in dirty.items() if t is not None}
            try:
                await self.link.call("update_files", str(self.root), files, [p for p, t in dirty.items() if t is None])
            except Exception as error:  # noqa: BLE001 - a failed push must not kill the loop; ensure() resends
                log.info("event=update_files_failed error=%r", error)
                self._synced_epoch = -1
                return

    async def hole_arguments(self, document: TextDocument, text: str) -> tuple[str, str, dict[str, str]]:
        """(workspace_root, path, open_files) for a request about `document` as it was when its `text` was
        taken (the request's own snapshot: typing may go on while this awaits)."""
        await self.ensure()
        root, rel = self.relative(document)
        if self.mode == "pinned" and root == str(self.root):
            return root, rel, {rel: text}
        base = Path(root) if root else None
        files = await asyncio.to_thread(import_closure, rel, lambda p: self._read(base, p, rel, text), self.limits)
        return "", rel, files

    def _read(self, base: Path | None, path: str, own: str, text: str) -> str | None:
        if path == own:
            return text
        if base is None:
            return None
        target = base / path
        open_buffer = next((d.text for d in self.documents.values() if d.path == target), None)
        return open_buffer if open_buffer is not None else read_file_under(base, path)
