"""Hybrid retrieval: BM25 and dense (MiniLM + FAISS) candidates fused by reciprocal rank fusion (k=60),
with metadata filters, over a LiveIndex that follows the store. `open_retriever(store_url, data_dir)` is
the one-call entry point for embedded use and the gateway."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from longbow.rag.embed import Embedder, shared_embedder
from longbow.rag.index import LiveIndex
from longbow.rag.store import Store, open_store
from longbow.rag.types import Hit, Retriever

RRF_K = 60
MODES = ("hybrid", "dense", "bm25")
MAX_TOP_K = 1000


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """score(d) = sum over rankings of 1 / (k + rank_d), rank from 1; best first, ties by first appearance."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])


class HybridRetriever(Retriever):
    """Retriever over a store. Every call first catches up with the store's change log (one round trip),
    so a document acknowledged by any replica is visible to the next query on every replica.
    mode: "hybrid" (RRF of both), "dense" or "bm25" (one ranking; its own score)."""

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
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be in [1, {MAX_TOP_K}], got {top_k}")
        if not query.strip():
            raise ValueError("the query is empty")
        vector = self.embedder.embed([query])[0] if self.mode != "bm25" else None
        self.index.catch_up(self.store)
        with self.index.lock:
            return self._search(query, vector, top_k, filters)

    def _search(self, query: str, vector: np.ndarray | None, top_k: int, filters) -> list[Hit]:
        allowed = self.index.allowed(filters)
        if allowed is not None and len(allowed) == 0:
            return []
        depth = max(self.candidates, top_k)
        dense = self.index.dense.search(vector, depth, allowed) if vector is not None else []
        sparse = self.index.sparse.search(query, depth, allowed) if self.mode != "dense" else []
        if self.mode == "hybrid":
            ranked = reciprocal_rank_fusion([[i for i, _ in dense], [i for i, _ in sparse]])
        else:
            ranked = dense or sparse
        return [Hit(self.index.chunks[i], score) for i, score in ranked[:top_k]]


def open_retriever(store_url: str = "", data_dir: str | Path = "", **options) -> HybridRetriever:
    """A retriever over the Redis store at store_url, or the embedded store under data_dir."""
    return HybridRetriever(open_store(store_url, data_dir), **options)
