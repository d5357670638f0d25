"""Per-process derived indexes over the store: FAISS (dense) and BM25 (bm25s), plus the chunk table and
a metadata inverted index for filters. `LiveIndex.rebuild(store)` loads everything; `catch_up(store)`
applies the store's change log since the last seq, so every replica converges to the store's state.

Chunks get process-local int64 ids (FAISS ids); they never leave this module.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import numpy as np

from longbow.rag.analyzer import bm25_terms
from longbow.rag.store import ChangeLogGap, Store, StoredDocument
from longbow.rag.types import Chunk

class DenseIndex:
    """Inner-product search over unit vectors. kind: "flat" (exact; default), "hnsw" (graph; deletes are
    tombstones filtered at search time), "ivf" (inverted lists; trained on the vectors of the first bulk
    load, exact flat search until then)."""

    def __init__(self, dimensions: int, kind: str = "flat", hnsw_neighbors: int = 32, ivf_lists: int = 1024,
                 ivf_probes: int = 16):
        if kind not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"unknown dense index kind {kind!r}: flat, hnsw or ivf")
        self.dimensions, self.kind = dimensions, kind
        self.hnsw_neighbors, self.ivf_lists, self.ivf_probes = hnsw_neighbors, ivf_lists, ivf_probes
        self._tombstones: set[int] = set()
        self.index = self._empty()

    def _empty(self):
        import faiss

        if self.kind == "hnsw":
            return faiss.IndexIDMap2(faiss.IndexHNSWFlat(self.dimensions, self.hnsw_neighbors, faiss.METRIC_INNER_PRODUCT))
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimensions))

    def bulk_load(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents (ids int64 [N], vectors float32 [N, D]); trains IVF here."""
        import faiss

        self._tombstones.clear()
        self.index = self._empty()
        if self.kind == "ivf" and len(ids) >= 39:
            lists = max(1, min(self.ivf_lists, len(ids) // 39))  # faiss wants >= 39 training points per list
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dimensions), self.dimensions, lists,
                                       faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = min(self.ivf_probes, lists)
            self.index = index
        self.add(ids, vectors)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(ids, np.int64))

    def remove(self, ids: Iterable[int]) -> None:
        ids = np.fromiter(ids, np.int64)
        if self.kind == "hnsw":  # NOTE: faiss HNSW cannot delete; dead ids are skipped until the next rebuild
            self._tombstones.update(ids.tolist())
        elif len(ids):
            self.index.remove_ids(ids)

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        """(id, inner product) best first; only ids in `allowed` when given."""
        import faiss

        if self.index.ntotal == 0 or k <= 0:
            return []
        selector = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.asarray(allowed, np.int64))
        elif self._tombstones:
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64)))
        params = None if selector is None else self._params(selector)
        scores, ids = self.index.search(np.ascontiguousarray(query, np.float32).reshape(1, -1),
                                        min(k, self.index.ntotal), params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in self._tombstones]

    def _params(self, selector):
        import faiss

        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector)
        if isinstance(self.index, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe)
        return faiss.SearchParameters(sel=selector)

    def __len__(self) -> int:
        return self.index.ntotal - len(self._tombstones)


class SparseIndex:
    """BM25 (bm25s, Lucene variant) over chunk terms. bm25s indexes are static, so a change marks the
    index stale and the next search rebuilds it."""

    # NOTE: a rebuild costs ~5 s per 100k chunks on this machine; searches between changes cost ~1 ms.
    # Acceptable while ingestion is batched; an incremental delta index is the next step if it is not.

    def __init__(self):
        self._terms: dict[int, list[str]] = {}
        self._bm25, self._order, self._position = None, np.zeros(0, np.int64), {}
        self._stale = False

    def add(self, ids: Iterable[int], texts: Iterable[str]) -> None:
        for i, text in zip(ids, texts):
            self._terms[int(i)] = bm25_terms(text)
        self._stale = True

    def remove(self, ids: Iterable[int]) -> None:
        for i in ids:
            self._terms.pop(int(i), None)
        self._stale = True

    def refresh(self) -> None:
        """Rebuild now if stale (a follower calls this so the next query does not pay for it)."""
        if self._stale:
            self._refresh()

    def _refresh(self) -> None:
        bm25s = _import_bm25s()
        self._order = np.fromiter(self._terms, np.int64, len(self._terms))
        self._position = {int(i): p for p, i in enumerate(self._order)}
        self._bm25 = None
        if len(self._order):
            self._bm25 = bm25s.BM25()
            self._bm25.index([self._terms[int(i)] or [""] for i in self._order], show_progress=False)
        self._stale = False

    def search(self, query: str, k: int, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        if self._stale:
            self._refresh()
        terms = [t for t in bm25_terms(query) if self._bm25 is not None and t in self._bm25.vocab_dict]
        if not terms or k <= 0:
            return []
        mask = None
        if allowed is not None:
            mask = np.zeros(len(self._order), np.float32)
            mask[[self._position[int(i)] for i in allowed if int(i) in self._position]] = 1.0
        scores = self._bm25.get_scores(terms, weight_mask=mask)
        k = min(k, int(np.count_nonzero(scores > 0)))
        top = np.argpartition(-scores, k - 1)[:k] if k else []
        ranked = sorted(top, key=lambda p: -scores[p])
        return [(int(self._order[p]), float(scores[p])) for p in ranked]


def _import_bm25s():
    """bm25s, with the level its logger had before the import. NOTE: bm25s sets its logger to DEBUG when
    imported, which printed a DEBUG line on every index build (every CLI query) past the CLI's settings."""
    logger = logging.getLogger("bm25s")
    level = logger.level
    import bm25s

    logger.setLevel(level)
    return bm25s


class LiveIndex:
    """The chunk table, FAISS, BM25 and metadata postings of one process, following one Store."""

    def __init__(self, dimensions: int, dense_kind: str = "flat"):
        self.dimensions, self.dense_kind = dimensions, dense_kind
        self.lock = threading.RLock()
        self._clear()

    def _clear(self) -> None:
        self.dense, self.sparse = DenseIndex(self.dimensions, self.dense_kind), SparseIndex()
        self.chunks: dict[int, Chunk] = {}
        self._documents: dict[str, tuple[str, list[int]]] = {}  # document id -> (content hash, chunk ids)
        self._postings: dict[tuple[str, str], set[int]] = {}
        self._next_id, self.seq = 0, 0

    def rebuild(self, store: Store) -> None:
        """Load every document (bulk, so IVF trains once), then apply changes made meanwhile."""
        with self.lock:
            self._clear()
            seq = store.last_seq()  # read before the documents: later changes are replayed by catch_up
            documents = [d for d in map(store.document, store.document_ids()) if d is not None]
            ids, vectors = self._register(documents)
            self.dense.bulk_load(ids, vectors)
            self.seq = seq
            self.catch_up(store)

    def catch_up(self, store: Store) -> int:
        """Apply the store's changes since our seq; returns how many documents were re-read."""
        with self.lock:
            applied = 0
            try:
                while changes := store.changes_since(self.seq):
                    for document_id in dict.fromkeys(c.document_id for c in changes):
                        self.set_document(document_id, store.document(document_id))
                        applied += 1
                    self.seq = changes[-1].seq
            except ChangeLogGap:
                self.rebuild(store)
            return applied

    def follow(self, store: Store) -> int:
        """One step of following the store in the background: catch up, then rebuild BM25 if needed."""
        with self.lock:
            applied = self.catch_up(store)
            self.sparse.refresh()
            return applied

    def set_document(self, document_id: str, stored: StoredDocument | None) -> None:
        """Make this index hold exactly `stored` for document_id (None: nothing)."""
        with self.lock:
            current = self._documents.get(document_id)
            if stored is not None and current is not None and current[0] == stored.content_hash:
                return
            if current is not None:
                self._remove(document_id)
            if stored is not None:
                ids, vectors = self._register([stored])
                self.dense.add(ids, vectors)

    def _register(self, documents: list[StoredDocument]) -> tuple[np.ndarray, np.ndarray]:
        ids, vectors = [], []
        for document in documents:
            chunk_ids = list(range(self._next_id, self._next_id + len(document.chunks)))
            self._next_id += len(chunk_ids)
            self._documents[document.document_id] = (document.content_hash, chunk_ids)
            for i, chunk in zip(chunk_ids, document.chunks):
                self.chunks[i] = chunk
                for pair in chunk.metadata.items():
                    self._postings.setdefault(pair, set()).add(i)
            self.sparse.add(chunk_ids, (c.text for c in document.chunks))
            ids.extend(chunk_ids)
            vectors.append(document.embeddings.reshape(len(chunk_ids), -1))
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, self.dimensions), np.float32)
        return np.asarray(ids, np.int64), matrix

    def _remove(self, document_id: str) -> None:
        _, chunk_ids = self._documents.pop(document_id)
        for i in chunk_ids:
            for pair in self.chunks.pop(i).metadata.items():
                self._postings[pair].discard(i)
        self.dense.remove(chunk_ids)
        self.sparse.remove(chunk_ids)

    def allowed(self, filters: dict[str, str] | None) -> np.ndarray | None:
        """Chunk ids whose metadata has every filter pair; None means no filter."""
        if not filters:
            return None
        sets = [self._postings.get(pair, set()) for pair in filters.items()]
        return np.fromiter(set.intersection(*sets), np.int64)

    def document_chunk_ids(self, document_id: str) -> list[int]:
        """The document's chunk ids in text order (chunks are contiguous and cover the text)."""
        with self.lock:
            return list(self._documents.get(document_id, ("", []))[1])

    def document_hashes(self) -> dict[str, str]:
        with self.lock:
            return {d: h for d, (h, _) in self._documents.items()}

    def __len__(self) -> int:
        return len(self.chunks)
