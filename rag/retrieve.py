"""Hybrid retrieval: BM25 and dense (MiniLM + FAISS) candidates fused by normalised scores into a ranking
of documents, each with its best chunks as evidence (rag/fusion.py says why not reciprocal rank fusion),
with metadata filters, over a LiveIndex that follows the store. Results come as chunks (`retrieve`, the
Retriever contract) or grouped by document (`retrieve_documents`). `open_retriever(store_url, data_dir)`
is the one-call entry point for embedded use and the gateway."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from longbow.rag import fusion
from longbow.rag.embed import Embedder, shared_embedder
from longbow.rag.fusion import RRF_K, reciprocal_rank_fusion  # noqa: F401 (this module's names before)
from longbow.rag.index import LiveIndex
from longbow.rag.store import Store, open_store
from longbow.rag.types import DocumentHit, Hit, Retriever

MODES = ("hybrid", "dense", "bm25")
MAX_TOP_K = 1000
CHUNKS_PER_DOCUMENT = 3  # evidence kept per document in grouped results


class HybridRetriever(Retriever):
    """Retriever over a store. Every call first catches up with the store's change log (one round trip),
    so a document acknowledged by any replica is visible to the next query on every replica.
    mode: "hybrid" (fusion.fuse of both; scores in [0, 1]), "dense" or "bm25" (one ranking; its own score)."""

    def __init__(self, store: Store, embedder: Embedder | None = None, *, mode: str = "hybrid",
                 dense_kind: str = "flat", candidates: int = 50, index: LiveIndex | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown retrieval mode {mode!r}: {', '.join(MODES)}")
        self.store, self.embedder = store, embedder or shared_embedder()
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
                           chunks_per_document: int = CHUNKS_PER_DOCUMENT) -> list[DocumentHit]:
        """The top_k documents, best first, each with up to chunks_per_document of its chunks as evidence."""
        ranked = self._rank(query, top_k, filters)
        return [DocumentHit(d.document_id, d.score, [Hit(self.index.chunks[i], score)
                                                     for i, score in d.chunks[:chunks_per_document]])
                for d in ranked[:top_k]]

    def _rank(self, query: str, top_k: int, filters) -> list[fusion.Ranked]:
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be in [1, {MAX_TOP_K}], got {top_k}")
        if not query.strip():
            raise ValueError("the query is empty")
        vector = self.embedder.embed([query])[0] if self.mode != "bm25" else None
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
