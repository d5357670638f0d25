"""SDK calls for ingest, delete, query. Mixed into `LongbowClient` / `AsyncLongbowClient` (sdk.py), which provide
`self._channel` and `self._call(method, request)` (retries, auth, errors as LongbowError).

Documents are anything with `document_id`, `text` and optional `metadata` attributes (e.g. `rag.types.Document`)
or mappings with those keys. Large ingests are sent as several requests (at most `batch_documents` documents
and about 16 MB each); progress counts over all of them. Results are plain dataclasses."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc

from longbow.v1 import generation_pb2 as gen_pb
from longbow.v1 import retrieval_pb2 as pb
from longbow.v1 import retrieval_pb2_grpc
from longbow.services.client.errors import LongbowError

CHUNKERS = {"": pb.CHUNKER_UNSPECIFIED, "fixed": pb.CHUNKER_FIXED, "sentence": pb.CHUNKER_SENTENCE,
            "perplexity": pb.CHUNKER_PERPLEXITY, "margin": pb.CHUNKER_MARGIN}
GROUPINGS = {"": pb.GROUPING_UNSPECIFIED, "documents": pb.GROUPING_DOCUMENTS, "chunks": pb.GROUPING_CHUNKS}
FLOWS = {"": pb.FLOW_UNSPECIFIED, "none": pb.FLOW_NO_RETRIEVAL, "single": pb.FLOW_SINGLE,
         "fixed_interval": pb.FLOW_FIXED_INTERVAL, "flare": pb.FLOW_FLARE, "dragin": pb.FLOW_DRAGIN}
_BATCH_BYTES = 4 * 1024 * 1024  # under the server's default receive limit (~5 MB, gateway/limits.py)


@dataclass(frozen=True)
class IngestProgress:
    documents_done: int
    documents_total: int
    chunks_written: int
    documents_unchanged: int


@dataclass(frozen=True)
class Citation:
    """A retrieved chunk: document_text[char_start:char_end] == text."""

    document_id: str
    chunk_id: str
    char_start: int
    char_end: int
    score: float
    text: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class QueryResult:
    citations: list[Citation]
    answer: str = ""


@dataclass
class QueryChunk:
    """One streamed piece: citations (first and last message), answer text, done (last message)."""

    text: str
    citations: list[Citation]
    done: bool


def _document_pb(document) -> pb.Document:
    if isinstance(document, Mapping):
        return pb.Document(document_id=document["document_id"], text=document["text"],
                           metadata=document.get("metadata") or {})
    return pb.Document(document_id=document.document_id, text=document.text,
                       metadata=getattr(document, "metadata", None) or {})


def _option(table: dict, name: str, what: str) -> int:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(n for n in table if n)}")
    return table[name]


def ingest_requests(documents: Iterable, chunker: str, target_chunk_tokens: int,
                    batch_documents: int) -> list[pb.IngestRequest]:
    """The documents as requests of at most batch_documents documents and ~4 MB each (one larger document
    goes alone)."""
    kind = _option(CHUNKERS, chunker, "chunker")
    requests, batch, size = [], [], 0
    for document in map(_document_pb, documents):
        if batch and (len(batch) >= batch_documents or size + document.ByteSize() > _BATCH_BYTES):
            requests.append(pb.IngestRequest(documents=batch, chunker=kind, target_chunk_tokens=target_chunk_tokens))
            batch, size = [], 0
        batch.append(document)
        size += document.ByteSize()
    requests.append(pb.IngestRequest(documents=batch, chunker=kind, target_chunk_tokens=target_chunk_tokens))
    return requests


def query_request(query: str, top_k: int, filters: Mapping[str, str] | None, answer: bool, flow: str,
                  max_tokens: int, grouping: str = "", chunks_per_document: int = 0) -> pb.QueryRequest:
    return pb.QueryRequest(query=query, top_k=top_k, filters=dict(filters or {}), answer=answer,
                           flow=_option(FLOWS, flow, "flow"), sampling=gen_pb.SamplingOptions(max_tokens=max_tokens),
                           grouping=_option(GROUPINGS, grouping, "grouping"),
                           chunks_per_document=chunks_per_document)


def _citation(c: pb.Citation) -> Citation:
    return Citation(c.document_id, c.chunk_id, c.char_start, c.char_end, c.score, c.text, dict(c.metadata))


def _query_chunk(c: pb.QueryChunk) -> QueryChunk:
    return QueryChunk(c.text, [_citation(x) for x in c.citations], c.done)


class _Totals:
    """Progress over several requests: earlier requests' final counts plus the current one's."""

    def __init__(self, total: int):
        self.total, self.base = total, IngestProgress(0, total, 0, 0)

    def add(self, p: pb.IngestProgress) -> IngestProgress:
        b = self.base
        return IngestProgress(b.documents_done + p.documents_done, self.total, b.chunks_written + p.chunks_written,
                              b.documents_unchanged + p.documents_unchanged)

    def finish(self, last: IngestProgress) -> None:
        self.base = last


class RetrievalCalls:
    @functools.cached_property
    def _retrieval_stub(self):
        return retrieval_pb2_grpc.RetrievalStub(self._channel)

    def ingest_stream(self, documents: Iterable, *, chunker: str = "", target_chunk_tokens: int = 0,
                      batch_documents: int = 256) -> Iterator[IngestProgress]:
        """Progress after each stored document (the first message of each request has done unchanged).
        chunker: "" (server default), fixed, sentence, perplexity, margin."""
        requests = ingest_requests(documents, chunker, target_chunk_tokens, batch_documents)
        totals = _Totals(sum(len(r.documents) for r in requests))
        for request in requests:
            progress = totals.base
            for message in self._retrieval_stream(self._retrieval_stub.Ingest, request):
                progress = totals.add(message)
                yield progress
            totals.finish(progress)

    def ingest(self, documents: Iterable, *, chunker: str = "", target_chunk_tokens: int = 0,
               on_progress: Callable[[IngestProgress], None] | None = None) -> IngestProgress:
        """Ingest and wait; returns the final progress (every document stored or unchanged)."""
        progress = None
        for progress in self.ingest_stream(documents, chunker=chunker, target_chunk_tokens=target_chunk_tokens):
            if on_progress:
                on_progress(progress)
        return progress

    def delete(self, document_ids: Iterable[str]) -> int:
        """Delete documents; returns how many existed."""
        return self._call(self._retrieval_stub.Delete, pb.DeleteRequest(document_ids=list(document_ids))).deleted

    def query(self, query: str, *, top_k: int = 5, filters: Mapping[str, str] | None = None, answer: bool = False,
              flow: str = "", max_tokens: int = 0, grouping: str = "",
              chunks_per_document: int = 0) -> QueryResult:
        """Citations for `query`, best first; with answer=True also the answer of `flow`
        ("" server default = single, none, fixed_interval, flare, dragin). grouping: "" or "documents"
        (top_k documents, each as up to chunks_per_document chunks, 0 = 1) or "chunks" (top_k chunks)."""
        request = query_request(query, top_k, filters, answer, flow, max_tokens, grouping,
                                chunks_per_document)
        response = self._call(self._retrieval_stub.Query, request)
        return QueryResult([_citation(c) for c in response.citations], response.answer)

    def query_stream(self, query: str, *, top_k: int = 5, filters: Mapping[str, str] | None = None,
                     flow: str = "", max_tokens: int = 0, answer: bool = True) -> Iterator[QueryChunk]:
        """Citations first, then answer text as generated; the last chunk has done=True."""
        request = query_request(query, top_k, filters, answer, flow, max_tokens)
        for chunk in self._retrieval_stream(self._retrieval_stub.QueryStream, request):
            yield _query_chunk(chunk)

    def _retrieval_stream(self, method, request):
        call = method(request, timeout=self.timeout_s, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise LongbowError(exc.code(), exc.details()) from None
        finally:
            call.cancel()  # no-op when finished; stops the server's work when the caller stopped early


class AsyncRetrievalCalls:
    @functools.cached_property
    def _retrieval_stub(self):
        return retrieval_pb2_grpc.RetrievalStub(self._channel)

    async def ingest_stream(self, documents: Iterable, *, chunker: str = "", target_chunk_tokens: int = 0,
                            batch_documents: int = 256) -> AsyncIterator[IngestProgress]:
        requests = ingest_requests(documents, chunker, target_chunk_tokens, batch_documents)
        totals = _Totals(sum(len(r.documents) for r in requests))
        for request in requests:
            progress = totals.base
            async for message in self._retrieval_stream(self._retrieval_stub.Ingest, request):
                progress = totals.add(message)
                yield progress
            totals.finish(progress)

    async def ingest(self, documents: Iterable, *, chunker: str = "", target_chunk_tokens: int = 0,
                     on_progress: Callable[[IngestProgress], None] | None = None) -> IngestProgress:
        progress = None
        async for progress in self.ingest_stream(documents, chunker=chunker, target_chunk_tokens=target_chunk_tokens):
            if on_progress:
                on_progress(progress)
        return progress

    async def delete(self, document_ids: Iterable[str]) -> int:
        response = await self._call(self._retrieval_stub.Delete, pb.DeleteRequest(document_ids=list(document_ids)))
        return response.deleted

    async def query(self, query: str, *, top_k: int = 5, filters: Mapping[str, str] | None = None,
                    answer: bool = False, flow: str = "", max_tokens: int = 0, grouping: str = "",
                    chunks_per_document: int = 0) -> QueryResult:
        request = query_request(query, top_k, filters, answer, flow, max_tokens, grouping,
                                chunks_per_document)
        response = await self._call(self._retrieval_stub.Query, request)
        return QueryResult([_citation(c) for c in response.citations], response.answer)

    async def query_stream(self, query: str, *, top_k: int = 5, filters: Mapping[str, str] | None = None,
                           flow: str = "", max_tokens: int = 0, answer: bool = True) -> AsyncIterator[QueryChunk]:
        request = query_request(query, top_k, filters, answer, flow, max_tokens)
        async for chunk in self._retrieval_stream(self._retrieval_stub.QueryStream, request):
            yield _query_chunk(chunk)

    async def _retrieval_stream(self, method, request):
        call = method(request, timeout=self.timeout_s, metadata=self._metadata)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as exc:
            raise LongbowError(exc.code(), exc.details()) from None
        finally:
            call.cancel()
