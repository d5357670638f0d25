"""Ingestion: validate -> skip unchanged (content hash) -> chunk -> embed -> store write, with progress.

A document counts as done only after its store write returns (the store's write is atomic and durable),
so progress never claims more than the store holds. Documents are embedded in groups for throughput
(up to embed_group_chunks chunks) but written one by one, and a group is closed once chunking it has
taken progress_interval_s, so a slow chunker (Meta-Chunking scores every token) still reports progress
after about every document rather than every 256 chunks. `ingest_paths` is the one-call entry
point for local files.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from longbow.rag.chunking import (
    CHUNKERS,
    DEFAULT_CHUNKER,
    DEFAULT_TARGET_TOKENS,
    Chunker,
    TokenSpans,
    make_chunker,
)
from longbow.rag.embed import Embedder, shared_embedder
from longbow.rag.lm import LM
from longbow.rag.store import Store, StoredDocument, open_store
from longbow.rag.types import Document


@dataclass(frozen=True)
class IngestLimits:
    max_documents: int = 10_000  # per request
    max_document_chars: int = 2_000_000
    max_id_chars: int = 512
    max_target_tokens: int = 4096


@dataclass
class IngestProgress:
    documents_done: int = 0
    documents_total: int = 0
    chunks_written: int = 0
    documents_unchanged: int = 0


def validate(documents: Sequence[Document], target_tokens: int, limits: IngestLimits = IngestLimits()) -> None:
    """Raise ValueError naming the first problem: none or too many documents, an empty/oversized/duplicate
    document, a bad id or metadata, a target length out of range."""
    if not documents:
        raise ValueError("no documents to ingest")
    if len(documents) > limits.max_documents:
        raise ValueError(f"{len(documents)} documents in one request; the limit is {limits.max_documents}")
    if not 1 <= target_tokens <= limits.max_target_tokens:
        raise ValueError(f"target chunk length must be in [1, {limits.max_target_tokens}] tokens, got {target_tokens}")
    seen = set()
    for document in documents:
        _validate_document(document, limits)
        if document.document_id in seen:
            raise ValueError(f"document {document.document_id!r} appears twice in one request")
        seen.add(document.document_id)


def _validate_document(document: Document, limits: IngestLimits) -> None:
    name = document.document_id
    if not name or len(name) > limits.max_id_chars or not name.isprintable():
        raise ValueError(f"document id {name[:40]!r} must be 1-{limits.max_id_chars} printable characters")
    if not document.text.strip():
        raise ValueError(f"document {name!r} is empty")
    if len(document.text) > limits.max_document_chars:
        raise ValueError(f"document {name!r} has {len(document.text)} characters; the limit is "
                         f"{limits.max_document_chars}")
    if "\x00" in document.text:
        raise ValueError(f"document {name!r} contains NUL characters")


def content_hash(document: Document, chunking: str) -> str:
    """sha256 of text, metadata and chunking settings: the same request again is a no-op, while a new
    chunker or target length re-chunks the document."""
    payload = json.dumps([document.text, sorted(document.metadata.items()), chunking])
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


class Ingestor:
    """Writes documents into a store. `lm` is needed by the perplexity and margin chunkers; lengths are
    the LM's tokens, else `token_spans`' (a model tokenizer without the engine), else whitespace words."""

    def __init__(self, store: Store, embedder: Embedder | None = None, lm: LM | None = None,
                 limits: IngestLimits = IngestLimits(), embed_group_chunks: int = 256,
                 perplexity_theta: float = 0.0, token_spans: TokenSpans | None = None,
                 progress_interval_s: float = 1.0):
        self.store, self.embedder, self.lm = store, embedder or shared_embedder(), lm
        self.limits, self.embed_group_chunks, self.theta = limits, embed_group_chunks, perplexity_theta
        self.token_spans, self.progress_interval_s = token_spans, progress_interval_s
        self.clock = time.monotonic  # replaceable in tests

    def chunker(self, name: str, target_tokens: int) -> Chunker:
        if name not in CHUNKERS:
            raise ValueError(f"unknown chunker {name!r}; choose one of {', '.join(CHUNKERS)}")
        return make_chunker(name, target_tokens, lm=self.lm, theta=self.theta, token_spans=self.token_spans)

    def ingest(self, documents: Sequence[Document], chunker: str = DEFAULT_CHUNKER,
               target_tokens: int = DEFAULT_TARGET_TOKENS,
               on_progress: Callable[[IngestProgress], None] | None = None) -> IngestProgress:
        """Validate all, then chunk, embed and write each; on_progress after every written document."""
        validate(documents, target_tokens, self.limits)
        splitter, settings = self.chunker(chunker, target_tokens), f"{chunker}:{target_tokens}"
        progress = IngestProgress(documents_total=len(documents))
        for group in self._groups(documents, splitter, settings, progress, on_progress):
            vectors = self.embedder.embed([c.text for _, _, chunks in group for c in chunks])
            row = 0
            for document, digest, chunks in group:
                stored = StoredDocument(document.document_id, digest, chunks, vectors[row:row + len(chunks)],
                                        dict(document.metadata))
                row += len(chunks)
                written = self.store.put(stored)
                self._advance(progress, len(chunks) if written else 0, not written, on_progress)
        return progress

    def _groups(self, documents, splitter: Chunker, settings: str, progress: IngestProgress, on_progress):
        """Chunked documents in groups of about embed_group_chunks chunks, or of what was chunked within
        progress_interval_s; unchanged ones are reported immediately and never chunked."""
        group, size, started = [], 0, self.clock()
        for document in documents:
            digest = content_hash(document, settings)
            if self.store.document_hash(document.document_id) == digest:
                self._advance(progress, 0, True, on_progress)
                continue
            if not group:
                started = self.clock()
            chunks = splitter.chunk(document, digest)
            group.append((document, digest, chunks))
            size += len(chunks)
            if size >= self.embed_group_chunks or self.clock() - started >= self.progress_interval_s:
                yield group
                group, size = [], 0
        if group:
            yield group

    @staticmethod
    def _advance(progress: IngestProgress, chunks: int, unchanged: bool, on_progress) -> None:
        progress.documents_done += 1
        progress.chunks_written += chunks
        progress.documents_unchanged += int(unchanged)
        if on_progress:
            on_progress(IngestProgress(**vars(progress)))


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".markdown", ".text")


def read_documents(paths: Iterable[str | Path], suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Document]:
    """Documents from files and directories (recursively, files with `suffixes`). The id is the path as
    given joined with the file's path inside a directory; metadata {"source": path}."""
    documents = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes) \
            if path.is_dir() else [path]
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{file}: not UTF-8 text ({exc.reason})") from None
            documents.append(Document(str(file), text, {"source": str(file)}))
    return documents


def ingest_paths(paths: Iterable[str | Path], *, store_url: str = "", data_dir: str | Path = "",
                 chunker: str = DEFAULT_CHUNKER, target_tokens: int = DEFAULT_TARGET_TOKENS,
                 lm: LM | None = None, on_progress: Callable[[IngestProgress], None] | None = None,
                 token_spans: TokenSpans | None = None) -> IngestProgress:
    """Ingest local files straight into a store (no gateway): Redis at store_url or the embedded store
    under data_dir. Empty files are skipped (they have nothing to retrieve). Lengths as in `Ingestor`."""
    documents = [d for d in read_documents(paths) if d.text.strip()]
    store = open_store(store_url, data_dir)
    try:
        return Ingestor(store, lm=lm, token_spans=token_spans).ingest(documents, chunker, target_tokens,
                                                                      on_progress)
    finally:
        store.close()

