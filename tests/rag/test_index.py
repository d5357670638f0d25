"""Derived indexes: FAISS kinds agree, BM25 ranks, and a LiveIndex kept current from the change log equals
one rebuilt from the store (both stores); two replicas converge after ingest and delete."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from longbow.rag.embed import shared_embedder
from longbow.rag.index import DenseIndex, LiveIndex, SparseIndex, bm25_terms
from longbow.rag.ingest import Ingestor
from longbow.rag.retrieve import HybridRetriever
from longbow.rag.store import EmbeddedStore, RedisStore
from longbow.rag.types import Document

CORPUS = [
    Document("rivers", "The Danube flows through ten countries. It ends in the Black Sea.", {"topic": "geo"}),
    Document("volcano", "Mount Etna erupts often. Lava reached the village of Zafferana in 1992.", {"topic": "geo"}),
    Document("cpu", "A pipelined CPU overlaps fetch, decode and execute. Branch mispredictions flush it.",
             {"topic": "tech"}),
    Document("bread", "Sourdough needs a starter of flour and water. Bake it at 250 degrees.", {"topic": "food"}),
]


@pytest.fixture(params=["embedded", "redis"])
def open_handle(request, tmp_path):
    """Opens another handle on one fresh store each call (a replica's own connection)."""
    handles = []
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    def make():
        if request.param == "embedded":
            handles.append(EmbeddedStore(tmp_path / "rag"))
        else:
            handles.append(RedisStore(request.getfixturevalue("redis_server"), prefix=prefix))
        return handles[-1]
    yield make
    for handle in handles:
        handle.close()


def snapshot(index: LiveIndex, queries: list[str]) -> tuple:
    embedder = shared_embedder()
    chunks = sorted((c.chunk_id, c.text, c.char_start, c.char_end) for c in index.chunks.values())
    ranked = []
    for query in queries:
        dense = index.dense.search(embedder.embed([query])[0], 10, None)
        ranked.append([index.chunks[i].chunk_id for i, _ in dense])
        ranked.append([index.chunks[i].chunk_id for i, _ in index.sparse.search(query, 10, None)])
    return index.document_hashes(), chunks, ranked


def test_live_index_equals_rebuilt_index(open_handle):
    store = open_handle()
    live = LiveIndex(384)
    live.rebuild(store)  # empty at start, then kept current from the change log only
    ingest = Ingestor(store).ingest
    ingest(CORPUS, "sentence", 8)
    live.catch_up(store)
    ingest([Document("bread", "Rye bread is dense. It keeps for a week.", {"topic": "food"})], "sentence", 8)
    store.delete("cpu")
    ingest([Document("cpu", "GPUs run thousands of threads.", {"topic": "tech"})], "fixed", 3)
    store.delete("rivers")
    assert live.catch_up(store) == 3  # bread, cpu, rivers re-read once each
    rebuilt = LiveIndex(384)
    rebuilt.rebuild(open_handle())
    queries = ["Which sea does the Danube reach?", "bread that keeps", "threads on a GPU", "lava village"]
    assert snapshot(live, queries) == snapshot(rebuilt, queries)
    assert set(live.document_hashes()) == {"volcano", "bread", "cpu"}


def test_two_replicas_converge_after_ingest_and_delete(open_handle):
    writer = Ingestor(open_handle())
    first, second = HybridRetriever(open_handle()), HybridRetriever(open_handle())
    writer.ingest(CORPUS, "sentence", 16)
    question = "Where does the Danube end?"
    assert first.retrieve(question, 1)[0].chunk.document_id == "rivers"
    assert second.retrieve(question, 1)[0].chunk.document_id == "rivers"
    writer.store.delete("rivers")
    for replica in (first, second):
        assert all(h.chunk.document_id != "rivers" for h in replica.retrieve(question, 10))
        assert set(replica.index.document_hashes()) == {"volcano", "cpu", "bread"}
    assert first.index.document_hashes() == second.index.document_hashes()


def test_a_replica_behind_a_trimmed_log_rebuilds(tmp_path):
    store = EmbeddedStore(tmp_path, max_changes=2)
    replica = HybridRetriever(EmbeddedStore(tmp_path))
    Ingestor(store).ingest(CORPUS, "sentence", 16)  # 4 changes; the log keeps 2
    assert len(replica.retrieve("lava", 10)) > 0 and set(replica.index.document_hashes()) == {d.document_id for d in CORPUS}


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_dense_indexes_agree_with_flat(kind):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(100, 2100, dtype=np.int64)
    flat, other = DenseIndex(32, "flat"), DenseIndex(32, kind, ivf_lists=8, ivf_probes=8)
    flat.bulk_load(ids, vectors)
    other.bulk_load(ids, vectors)
    queries = vectors[:50] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    agree = sum(flat.search(q, 1, None)[0][0] == other.search(q, 1, None)[0][0] for q in queries)
    assert agree >= 48
    other.remove([100])
    assert other.search(vectors[0], 1, None)[0][0] != 100 and len(other) == 1999
    assert {i for i, _ in other.search(vectors[0], 5, np.array([150, 151]))} <= {150, 151}


def test_bm25_ranks_and_filters():
    sparse = SparseIndex()
    sparse.add([1, 2, 3], ["the red fox jumps", "a red car and a red bus", "blue whales sing"])
    assert [i for i, _ in sparse.search("red", 10, None)] == [2, 1]
    assert [i for i, _ in sparse.search("red", 10, np.array([1, 3]))] == [1]
    assert sparse.search("the of", 10, None) == [] and sparse.search("unknownword", 10, None) == []
    sparse.remove([2])
    assert [i for i, _ in sparse.search("red", 10, None)] == [1]
    assert bm25_terms("The Fox's 2 DOGS!") == ["fox", "s", "2", "dog", "!"]  # rules: test_analyzer.py
