"""Retrieval RPCs: Ingest (streamed progress), Delete, Query, QueryStream (citations, then answer text).

Handlers decode, make one call into rag/ on a worker thread, encode. This module owns the gateway's store
handle, its LiveIndex (rebuilt from the store at start, caught up from the change log on every query, so
replicas sharing a Redis store agree) and the ingestor. Answers come from `rag.flows.run_flow` over the
gateway's own engine (`runtime.lm()`), so RAG generation shares the engine's batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from grpc_health.v1 import health_pb2

from longbow.v1 import retrieval_pb2 as pb
from longbow.v1 import retrieval_pb2_grpc
from longbow.rag.embed import shared_embedder
from longbow.rag.minilm import shared_numpy_embedder
from longbow.rag.ingest import IngestLimits, Ingestor, IngestProgress, validate
from longbow.rag.retrieve import HybridRetriever
from longbow.rag.store import NotDurableError, open_store
from longbow.rag.types import Document, Hit
from longbow.services.config import longbow_home
from longbow.services.engine.errors import EngineStoppedError, InvalidRequestError
from longbow.services.gateway.runtime import GatewayRuntime

log = logging.getLogger(__name__)
CONNECT_BACKOFF_S = (0.2, 5.0)  # first retry, cap: doubling in between

_CHUNKERS = {pb.CHUNKER_FIXED: "fixed", pb.CHUNKER_SENTENCE: "sentence", pb.CHUNKER_PERPLEXITY: "perplexity",
             pb.CHUNKER_MARGIN: "margin"}
_FLOWS = {pb.FLOW_UNSPECIFIED: "single", pb.FLOW_NO_RETRIEVAL: "none", pb.FLOW_SINGLE: "single",
          pb.FLOW_FIXED_INTERVAL: "fixed_interval", pb.FLOW_FLARE: "flare", pb.FLOW_DRAGIN: "dragin"}
_GROUPINGS = {pb.GROUPING_UNSPECIFIED: "documents", pb.GROUPING_DOCUMENTS: "documents",
              pb.GROUPING_CHUNKS: "chunks"}
MAX_CHUNKS_PER_DOCUMENT = 10
_DONE = object()  # ends a thread's stream
MAX_QUERY_CHARS = 10_000
MAX_DELETE_IDS = 10_000


class StoreUnavailableError(EngineStoppedError):
    """The document store (Redis, sqlite) failed or cannot be reached; retriable (UNAVAILABLE)."""


class _Cancelled(Exception):
    """The client went away; stops the worker thread at its next progress report or text piece."""


def _store_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
            sqlite3.OperationalError)


async def _on_thread(work: Callable, *args):
    """Run blocking rag/ work on a thread; its ValueErrors are the caller's fault, store failures retriable."""
    try:
        return await asyncio.to_thread(work, *args)
    except InvalidRequestError:
        raise
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    except _store_errors() as exc:
        raise StoreUnavailableError(f"document store unavailable: {exc}") from None


async def _stream_from_thread(work: Callable[[Callable[[object], None]], object]) -> AsyncIterator[tuple[bool, object]]:
    """Runs work(emit) on a thread; yields (False, item) for every emit(item) as it happens, then
    (True, result). Closing the iterator makes the next emit raise _Cancelled in the thread."""
    loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

    def emit(item) -> None:  # called from the worker thread, or the loop thread (engine text callbacks)
        if cancelled.is_set():
            raise _Cancelled()
        loop.call_soon_threadsafe(queue.put_nowait, item)

    task = asyncio.ensure_future(_on_thread(work, emit))
    task.add_done_callback(lambda _: queue.put_nowait(_DONE))
    try:
        while (item := await queue.get()) is not _DONE:
            yield False, item
        yield True, task.result()
    finally:
        cancelled.set()
        if not task.done():  # the thread finishes on its own at its next emit; keep its error out of the log
            task.add_done_callback(lambda t: t.cancelled() or t.exception())



def documents_from_pb(request: pb.IngestRequest) -> list[Document]:
    return [Document(d.document_id, d.text, dict(d.metadata)) for d in request.documents]


def progress_to_pb(progress: IngestProgress) -> pb.IngestProgress:
    return pb.IngestProgress(documents_done=progress.documents_done, documents_total=progress.documents_total,
                             chunks_written=progress.chunks_written,
                             documents_unchanged=progress.documents_unchanged)


def citation_to_pb(hit: Hit) -> pb.Citation:
    c = hit.chunk
    return pb.Citation(document_id=c.document_id, chunk_id=c.chunk_id, char_start=c.char_start,
                       char_end=c.char_end, score=hit.score, text=c.text, metadata=c.metadata)


def _enum_name(table: dict, value: int, what: str) -> str:
    if value not in table:
        raise InvalidRequestError(f"unknown {what} {value}")
    return table[value]


class _ThrottledWarning:
    """The first warning of a run of failures, then at most one per `period_s` saying how many were
    dropped; `recovered` ends the run with one info line. NOTE: a store outage used to log every 0.5 s."""

    def __init__(self, period_s: float = 30.0):
        self.period_s, self._last, self._dropped = period_s, None, 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.period_s:
            self._dropped += 1
            return
        more = f" ({self._dropped} similar since the last report)" if self._dropped else ""
        log.warning(message + more, *args)
        self._last, self._dropped = now, 0

    def recovered(self, message: str, *args) -> None:
        if self._last is not None:
            log.info(message, *args)
        self._last, self._dropped = None, 0


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    """Serves once its store is open. A store that answers but is not durable stops the gateway's start
    (NotDurableError); one that does not answer is retried with backoff in the background while health
    reports Retrieval NOT_SERVING (the other services serve) and its RPCs answer UNAVAILABLE."""

    def __init__(self, runtime: GatewayRuntime):
        self.runtime, self.config = runtime, runtime.config.rag
        self.store = self.retriever = self.ingestor = None
        # Every chunker measures length in the served model's tokens; Meta-Chunking also scores with it.
        self.lm = runtime.lm()
        self.connect_attempts = 0
        self._health = None
        self._store_warning = _ThrottledWarning()
        self._connector = None
        try:
            self._open_store()
        except _store_errors() as exc:
            self._store_warning.warning("document store unreachable (%s): retrying with backoff; Retrieval is "
                                        "NOT_SERVING until it answers", exc)
            self._connector = runtime.loop.create_task(self._connect_with_backoff())
        self._follower = runtime.loop.create_task(self._follow(self.config.follow_interval_s))

    def _open_store(self) -> None:
        self.connect_attempts += 1
        store = open_store(self.config.store_url, self.config.data_dir or Path(longbow_home()) / "rag",
                           self.config.require_durable)
        try:
            # NOTE: the index rebuild runs at start (the design's "rebuilt from the store at start"); it reads
            # stored embeddings only, so the embedding model itself loads on the first ingest or query.
            # Queries embed with the numpy MiniLM (equal vectors, tests/rag/test_minilm.py): one thread, no
            # torch dispatch per op; measured in bench/rag.py, latency section.
            retriever = HybridRetriever(store, shared_embedder(), dense_kind=self.config.dense_index,
                                        candidates=self.config.candidates,
                                        query_embedder=shared_numpy_embedder())
        except BaseException:
            store.close()
            raise
        limits = IngestLimits(max_documents=self.config.max_documents_per_request,
                              max_document_chars=self.config.max_document_chars)
        self.ingestor = Ingestor(store, shared_embedder(), lm=self.lm, limits=limits,
                                 perplexity_theta=self.config.perplexity_theta)
        self.store, self.retriever = store, retriever

    async def _connect_with_backoff(self) -> None:
        delay = CONNECT_BACKOFF_S[0]
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, CONNECT_BACKOFF_S[1])
            try:
                await asyncio.to_thread(self._open_store)
            except NotDurableError as exc:  # the operator may still turn AOF on; say so, rate-limited
                self._store_warning.warning("%s", exc)
            except _store_errors() as exc:
                self._store_warning.warning("document store still unreachable (%s); retrying", exc)
            else:
                break
            # NOTE: re-asserted after every attempt: the gateway's readiness flips all services together
            # (lifecycle.py), which would otherwise mark Retrieval SERVING while its store is down.
            await self._report(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._store_warning.recovered("document store reachable after %d attempts; Retrieval serving",
                                      self.connect_attempts)
        await self._report(health_pb2.HealthCheckResponse.SERVING)

    async def report_health(self, health_servicer) -> None:
        """Called once the server has marked every service SERVING: corrects Retrieval while its store
        is not open, and keeps it current from then on."""
        self._health = health_servicer
        if self.store is None:
            await self._report(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _report(self, status) -> None:
        if self._health is not None:
            await self._health.set(pb.DESCRIPTOR.services_by_name["Retrieval"].full_name, status)

    def _ready(self) -> None:
        if self.store is None:
            raise StoreUnavailableError("document store not reachable yet: the gateway keeps retrying")

    async def _follow(self, period_s: float) -> None:
        """Keep the index current from the store's change log even when no query comes (every query also
        catches up first, so this only moves the work, BM25 rebuilds included, off the query path)."""
        while True:
            await asyncio.sleep(period_s)
            if self.store is None:
                continue
            try:
                await asyncio.to_thread(self.retriever.index.follow, self.store)
            except Exception as exc:  # noqa: BLE001 - a store outage must not end the follower; queries report it
                self._store_warning.warning("retrieval index could not follow the store: %s", exc)
            else:
                self._store_warning.recovered("retrieval index follows the store again")

    async def Ingest(self, request: pb.IngestRequest, context) -> AsyncIterator[pb.IngestProgress]:
        chunker = self.config.default_chunker if request.chunker == pb.CHUNKER_UNSPECIFIED else \
            _enum_name(_CHUNKERS, request.chunker, "chunker")
        target = request.target_chunk_tokens or self.config.target_chunk_tokens
        self._ready()
        documents = documents_from_pb(request)
        await _on_thread(validate, documents, target, self.ingestor.limits)  # fail before the first message
        yield progress_to_pb(IngestProgress(documents_total=len(documents)))
        async for finished, progress in _stream_from_thread(
                lambda emit: self.ingestor.ingest(documents, chunker, target, on_progress=emit)):
            if not finished:
                yield progress_to_pb(progress)

    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        ids = list(request.document_ids)
        if not ids or len(ids) > MAX_DELETE_IDS:
            raise InvalidRequestError(f"give 1 to {MAX_DELETE_IDS} document ids to delete, got {len(ids)}")
        self._ready()
        deleted = await _on_thread(lambda: sum(self.store.delete(i) for i in dict.fromkeys(ids)))
        return pb.DeleteResponse(deleted=deleted)

    def _query_args(self, request: pb.QueryRequest) -> dict:
        self._ready()
        if not request.query.strip():
            raise InvalidRequestError("the query is empty")
        if len(request.query) > MAX_QUERY_CHARS:
            raise InvalidRequestError(f"the query has {len(request.query)} characters; the limit is {MAX_QUERY_CHARS}")
        top_k = request.top_k or 5
        if top_k > self.config.max_top_k:
            raise InvalidRequestError(f"top_k must be at most {self.config.max_top_k}, got {top_k}")
        if request.chunks_per_document > MAX_CHUNKS_PER_DOCUMENT:
            raise InvalidRequestError(f"chunks_per_document must be at most {MAX_CHUNKS_PER_DOCUMENT}, "
                                      f"got {request.chunks_per_document}")
        return {"question": request.query, "top_k": top_k, "filters": dict(request.filters) or None,
                "flow": _enum_name(_FLOWS, request.flow, "flow"),
                "grouping": _enum_name(_GROUPINGS, request.grouping, "grouping"),
                "chunks_per_document": request.chunks_per_document or 1,
                "max_tokens": request.sampling.max_tokens or self.runtime.config.gateway.default_max_tokens}

    def _retrieve(self, args: dict) -> list[Hit]:
        """Chunks, or documents (best first) each as its best chunks in a row: see QueryRequest.grouping."""
        if args["grouping"] == "chunks":
            return self.retriever.retrieve(args["question"], args["top_k"], args["filters"])
        documents = self.retriever.retrieve_documents(args["question"], args["top_k"], args["filters"],
                                                      args["chunks_per_document"])
        return [hit for document in documents for hit in document.hits]

    @staticmethod
    def _cited(args: dict, hits: list[Hit]) -> list[pb.Citation]:
        """An answer's citations; grouped by document (in order of each one's first hit) unless chunks."""
        if args["grouping"] == "documents":
            order = {d: i for i, d in enumerate(dict.fromkeys(h.chunk.document_id for h in hits))}
            hits = sorted(hits, key=lambda h: order[h.chunk.document_id])  # stable: a document's own order
        return [citation_to_pb(h) for h in hits]

    def _answer(self, args: dict, on_text=None):
        from longbow.rag.flows import run_flow  # NOTE: imported late: flows pull in the generation modules

        return run_flow(args["flow"], args["question"], self.retriever, self.lm, top_k=args["top_k"],
                        filters=args["filters"], max_tokens=args["max_tokens"], on_text=on_text)

    async def Query(self, request: pb.QueryRequest, context) -> pb.QueryResponse:
        args = self._query_args(request)
        if not request.answer:
            hits = await _on_thread(self._retrieve, args)
            return pb.QueryResponse(citations=[citation_to_pb(h) for h in hits])
        result = await _on_thread(self._answer, args)
        return pb.QueryResponse(citations=self._cited(args, result.hits), answer=result.answer)

    async def QueryStream(self, request: pb.QueryRequest, context) -> AsyncIterator[pb.QueryChunk]:
        args = self._query_args(request)
        hits = await _on_thread(self._retrieve, args) if args["flow"] != "none" or not request.answer else []
        yield pb.QueryChunk(citations=[citation_to_pb(h) for h in hits], done=not request.answer)
        if not request.answer:
            return
        async for finished, item in _stream_from_thread(lambda emit: self._answer(args, on_text=emit)):
            if finished:
                yield pb.QueryChunk(citations=self._cited(args, item.hits), done=True)
            else:
                yield pb.QueryChunk(text=item)

    async def close(self) -> None:
        for task in (self._follower, self._connector):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self.store is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.close)


def create_servicer(runtime: GatewayRuntime) -> RetrievalServicer:
    return RetrievalServicer(runtime)
