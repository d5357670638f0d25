"""Hybrid retrieval: BM25 and dense (MiniLM + FAISS) candidates fused by normalised scores into a ranking
of documents, each with its best chunks as evidence (rag/fusion.py says why not reciprocal rank fusion),
with metadata filters, over a LiveIndex that follows the store. Results come as chunks (`retrieve`, the
Retriever contract) or grouped by document (`retrieve_documents`). `open_retriever(store_url, data_dir)`
is the one-call entry point for embedded use and the gateway."""

from __future__ import annotations

import collections
import re
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

from longbow.rag import fusion
from longbow.rag.embed import Embedder, shared_embedder
from longbow.rag.fusion import RRF_K, reciprocal_rank_fusion  # noqa: F401 (this module's names before)
from longbow.rag.index import LiveIndex
from longbow.rag.store import Store, open_store
from longbow.rag.types import Chunk, DocumentHit, Hit, Retriever

MODES = ("hybrid", "dense", "bm25")
_HEADING = re.compile(r"^\s*#{1,6}\s")
MAX_TOP_K = 1000
CHUNKS_PER_DOCUMENT = 3  # evidence kept per document in grouped results


def _starts_section(text: str) -> bool:
    return bool(_HEADING.match(text))


class QueryVectors:
    """Query text -> unit vector [384], through `embedder`, remembering the last `size` queries (a user
    who pages through results or an agent that repeats itself asks the same text again). Thread-safe."""

    def __init__(self, embedder, size: int = 256):
        self.embedder, self.size = embedder, size
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __call__(self, query: str) -> np.ndarray:
        with self._lock:
            if (vector := self._cache.get(query)) is not None:
                self._cache.move_to_end(query)
                self.hits += 1
                return vector
            self.misses += 1
        vector = self.embedder.embed([query])[0]
        vector.setflags(write=False)  # shared by every caller of the same query
        with self._lock:
            self._cache[query] = vector
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return vector


class HybridRetriever(Retriever):
    """Retriever over a store. Every call first catches up with the store's change log (one round trip),
    so a document acknowledged by any replica is visible to the next query on every replica.
    mode: "hybrid" (fusion.fuse of both; scores in [0, 1]), "dense" or "bm25" (one ranking; its own score).
    query_embedder embeds queries (default: `embedder`); the gateway passes the numpy MiniLM
    (rag/minilm.py: the same vectors within 1e-5, without torch's per-call overhead). Query vectors are
    cached (QueryVectors, the last 256 queries)."""

    def __init__(self, store: Store, embedder: Embedder | None = None, *, mode: str = "hybrid",
                 dense_kind: str = "flat", candidates: int = 50, index: LiveIndex | None = None,
                 query_embedder=None, query_cache: int = 256):
        if mode not in MODES:
            raise ValueError(f"unknown retrieval mode {mode!r}: {', '.join(MODES)}")
        self.store, self.embedder = store, embedder or shared_embedder()
        self.query_vectors = QueryVectors(query_embedder or self.embedder, query_cache)
        self.mode, self.candidates = mode, candidates
        self.index = index or LiveIndex(self.embedder.dimensions, dense_kind)
        if index is None:
            self.index.rebuild(store)

    def retrieve(self, query: str, top_k: int = 5, filters: dict[str, str] | None = None) -> list[Hit]:
        """The top_k chunks by fused score (a document's chunks are not grouped)."""
        ranked = self._rank(query, top_k, filters)
        chunks = sorted((pair for document in ranked for pair in document.chunks), key=lambda pair: -pair[1])
        return [Hit(self.index.chunks[i], score) for i, score in chunks[:top_k]]

    def retrieve_documents(self, query: str, top_k: int = 5, filters: dict[str, str] | None = None,
                           chunks_per_document: int = CHUNKS_PER_DOCUMENT,
                           expand_to_chars: int = 0) -> list[DocumentHit]:
        """The top_k documents, best first, each with up to chunks_per_document of its chunks as evidence.
        expand_to_chars > 0: a shorter chunk is cited with its enclosing passage (see `passage`)."""
        ranked = self._rank(query, top_k, filters)
        with self.index.lock:
            evidence = lambda d: self._evidence(d, chunks_per_document, expand_to_chars)
            return [DocumentHit(d.document_id, d.score, evidence(d)) for d in ranked[:top_k]]

    def _evidence(self, document: fusion.Ranked, count: int, expand_to_chars: int) -> list[Hit]:
        """The document's best chunks (expanded); a passage overlapping a better one is left out."""
        hits: list[Hit] = []
        for chunk_id, score in document.chunks:
            chunk = self.passage(chunk_id, expand_to_chars)
            if all(chunk.char_end <= h.chunk.char_start or chunk.char_start >= h.chunk.char_end
                   for h in hits):
                hits.append(Hit(chunk, score))
            if len(hits) == count:
                break
        return hits

    def passage(self, chunk_id: int, min_chars: int) -> Chunk:
        """Parent expansion: the chunk grown with its document's neighbouring chunks (the next one first,
        then the previous) until it has min_chars characters, never across a Markdown heading (a line
        starting with #), so it stays within its section. Keeps the cited chunk's id; text and offsets
        are the passage's (still document.text[char_start:char_end])."""
        chunk = self.index.chunks[chunk_id]
        if len(chunk.text) >= min_chars:
            return chunk
        ids = self.index.document_chunk_ids(chunk.document_id)
        first = last = ids.index(chunk_id)
        size = len(chunk.text)
        while size < min_chars:
            before, after = self._neighbour(ids, first - 1), self._neighbour(ids, last + 1)
            if after is not None and not _starts_section(after.text):
                last, size = last + 1, size + len(after.text)
            elif before is not None and not _starts_section(self.index.chunks[ids[first]].text):
                first, size = first - 1, size + len(before.text)
            else:
                break
        if first == last:
            return chunk
        pieces = [self.index.chunks[i] for i in ids[first:last + 1]]
        return replace(chunk, text="".join(p.text for p in pieces), char_start=pieces[0].char_start,
                       char_end=pieces[-1].char_end)

    def _neighbour(self, ids: list[int], position: int) -> Chunk | None:
        return self.index.chunks[ids[position]] if 0 <= position < len(ids) else None

    def _rank(self, query: str, top_k: int, filters) -> list[fusion.Ranked]:
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be in [1, {MAX_TOP_K}], got {top_k}")
        if not query.strip():
            raise ValueError("the query is empty")
        vector = self.query_vectors(query) if self.mode != "bm25" else None
        self.index.catch_up(self.store)
        with self.index.lock:
            return self._search(query, vector, top_k, filters)

    def _search(self, query: str, vector: np.ndarray | None, top_k: int, filters) -> list[fusion.Ranked]:
        allowed = self.index.allowed(filters)
        if allowed is not None and len(allowed) == 0:
            return []
        depth = max(self.candidates, top_k)
        dense = self.index.dense.search(vector, depth, allowed) if vector is not None else []
        sparse = self.index.sparse.search(query, depth, allowed) if self.mode != "dense" else []
        document_of = lambda chunk_id: self.index.chunks[chunk_id].document_id
        if self.mode == "hybrid":
            return fusion.fuse(dense, sparse, document_of)
        return fusion.single(dense or sparse, document_of)


def open_retriever(store_url: str = "", data_dir: str | Path = "", **options) -> HybridRetriever:
    """A retriever over the Redis store at store_url, or the embedded store under data_dir."""
    return HybridRetriever(open_store(store_url, data_dir), **options)
