"""Hybrid retrieval over the real MiniLM: RRF arithmetic, citations point into the source text, filters,
each retriever's strength and the fusion getting both, bounds."""

from __future__ import annotations

import pytest

from longbow.rag.ingest import Ingestor
from longbow.rag.retrieve import HybridRetriever, reciprocal_rank_fusion
from longbow.rag.store import EmbeddedStore
from longbow.rag.types import Document

DOCUMENTS = [
    Document("kb-1", "Error code XQ-7731 means the flux capacitor lost sync. Restart the unit to clear it.",
             {"team": "ops"}),
    Document("kb-2", "When your laptop will not power on, hold the power button for thirty seconds.",
             {"team": "it"}),
    Document("kb-3", "Our cafeteria serves lentil soup every Tuesday and Thursday.", {"team": "facilities"}),
    Document("kb-4", "Passwords expire after ninety days; choose a new one in the account portal.", {"team": "it"}),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = EmbeddedStore(tmp_path_factory.mktemp("retrieve"))
    Ingestor(store).ingest(DOCUMENTS, "sentence", 64)
    yield store
    store.close()


def test_rrf_sums_reciprocal_ranks():
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1]], rrf_k=60)
    assert [i for i, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62) and fused[2][1] == pytest.approx(1 / 62)


def test_citations_point_into_the_document(store):
    hits = HybridRetriever(store).retrieve("How often must I change my password?", top_k=2)
    assert hits[0].chunk.document_id == "kb-4" and len(hits) == 2 and hits[0].score >= hits[1].score
    text = {d.document_id: d.text for d in DOCUMENTS}[hits[0].chunk.document_id]
    assert text[hits[0].chunk.char_start:hits[0].chunk.char_end] == hits[0].chunk.text


def test_each_retriever_has_a_strength_and_fusion_keeps_both(store):
    exact, paraphrase = "XQ-7731", "my computer refuses to boot"
    assert HybridRetriever(store, mode="bm25").retrieve(exact, 1)[0].chunk.document_id == "kb-1"
    assert HybridRetriever(store, mode="bm25").retrieve(paraphrase, 1) == []  # no shared term
    assert HybridRetriever(store, mode="dense").retrieve(paraphrase, 1)[0].chunk.document_id == "kb-2"
    hybrid = HybridRetriever(store)
    assert hybrid.retrieve(exact, 1)[0].chunk.document_id == "kb-1"
    assert hybrid.retrieve(paraphrase, 1)[0].chunk.document_id == "kb-2"


def test_metadata_filters(store):
    retriever = HybridRetriever(store)
    hits = retriever.retrieve("soup on Tuesday", top_k=4, filters={"team": "it"})
    assert hits and {h.chunk.document_id for h in hits} <= {"kb-2", "kb-4"}
    assert retriever.retrieve("soup", filters={"team": "nobody"}) == []
    assert retriever.retrieve("soup", filters={"team": "facilities", "missing": "x"}) == []


def test_bounds_and_empty_store(store, tmp_path):
    retriever = HybridRetriever(store)
    for top_k in (0, -1, 1001):
        with pytest.raises(ValueError, match="top_k"):
            retriever.retrieve("soup", top_k=top_k)
    with pytest.raises(ValueError, match="empty"):
        retriever.retrieve("   ")
    with pytest.raises(ValueError, match="mode"):
        HybridRetriever(store, mode="magic")
    empty = EmbeddedStore(tmp_path / "empty")
    assert HybridRetriever(empty).retrieve("anything") == []
    empty.close()


def test_documents_grouped_with_their_chunks_as_evidence(tmp_path):
    long_document = Document("manual", "The kettle boils water in two minutes. " * 3
                             + "Descale the kettle with vinegar monthly. "
                             "The warranty covers the heating element for two years.")
    store = EmbeddedStore(tmp_path / "grouped")
    Ingestor(store).ingest([long_document, *DOCUMENTS], "sentence", 8)
    retriever = HybridRetriever(store)
    chunks = retriever.retrieve("kettle warranty and descaling", top_k=4)
    documents = retriever.retrieve_documents("kettle warranty and descaling", top_k=2, chunks_per_document=2)
    assert [h.chunk.document_id for h in chunks].count("manual") >= 2  # ungrouped: one document fills it
    assert len(documents) == 2 and len({d.document_id for d in documents}) == 2
    assert documents[0].document_id == "manual" and documents[0].score >= documents[1].score
    assert 1 <= len(documents[0].hits) <= 2 and {h.chunk.document_id for h in documents[0].hits} == {"manual"}
    assert documents[0].hits[0].score == documents[0].score
    store.close()


def test_parent_expansion_stays_within_the_section(tmp_path):
    text = ("# Kettles\n\nThe kettle boils water. It has a blue lid. Descale it monthly with vinegar. "
            "Its cord is one metre long.\n\n# Toasters\n\nThe toaster browns bread. It has four slots.")
    store = EmbeddedStore(tmp_path / "sections")
    Ingestor(store).ingest([Document("guide", text)], "sentence", 3)  # about one sentence per chunk
    retriever = HybridRetriever(store)
    plain = retriever.retrieve_documents("descaling with vinegar", top_k=1, chunks_per_document=1)[0].hits[0]
    grown = retriever.retrieve_documents("descaling with vinegar", top_k=1, chunks_per_document=1,
                                         expand_to_chars=90)[0].hits[0]
    assert "vinegar" in plain.chunk.text and len(plain.chunk.text) < 90
    assert grown.chunk.chunk_id == plain.chunk.chunk_id and plain.chunk.text in grown.chunk.text
    assert text[grown.chunk.char_start:grown.chunk.char_end] == grown.chunk.text
    assert len(grown.chunk.text) >= 90 and "Toasters" not in grown.chunk.text
    whole_section = retriever.retrieve_documents("descaling with vinegar", top_k=1, chunks_per_document=1,
                                                 expand_to_chars=10_000)[0].hits[0].chunk
    assert whole_section.text.strip() == text[:text.index("# Toasters")].strip()
    passages = retriever.retrieve_documents("kettle", top_k=1, chunks_per_document=3,
                                            expand_to_chars=60)[0].hits
    spans = sorted((h.chunk.char_start, h.chunk.char_end) for h in passages)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no passage cited twice
    store.close()


def test_query_vectors_are_cached_least_recently_used_first():
    import numpy as np

    from longbow.rag.retrieve import QueryVectors

    asked = []

    class Recording:
        def embed(self, texts):
            asked.extend(texts)
            return np.full((len(texts), 384), float(len(asked)), np.float32)

    vectors = QueryVectors(Recording(), size=2)
    first = vectors("a")
    assert vectors("a") is first and asked == ["a"]  # a hit does not embed again
    vectors("b")
    vectors("a")  # a is now the most recent
    vectors("c")  # evicts b, the least recently used
    vectors("a")
    vectors("b")
    assert asked == ["a", "b", "c", "b"] and (vectors.hits, vectors.misses) == (3, 4)
    with pytest.raises(ValueError):
        first[0] = 1.0  # cached vectors are shared: read-only


def test_numpy_query_embedder_ranks_like_the_torch_one(store):
    """The gateway's query path (numpy MiniLM, rag/minilm.py) returns the same ranking and scores as
    sentence-transformers within 1e-5 (the vectors agree within 1e-5 per component)."""
    from longbow.rag.minilm import NumpyEmbedder

    torch_path, numpy_path = HybridRetriever(store), HybridRetriever(store, query_embedder=NumpyEmbedder())
    for query in ("How often must I change my password?", "soup", "XQ-7731 flux", "laptop dead"):
        a, b = torch_path.retrieve(query, 4), numpy_path.retrieve(query, 4)
        assert [h.chunk.chunk_id for h in a] == [h.chunk.chunk_id for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
