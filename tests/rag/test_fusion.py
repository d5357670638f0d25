"""Fusion rules (rag/fusion.py) on hand-made candidate lists: the failure of chunk-level RRF that issue 17
found, grouping into documents with evidence, and the edge cases of normalisation."""

from __future__ import annotations

import pytest

from longbow.rag import fusion

DOCUMENT_OF = {i: f"doc-{i // 10}" for i in range(200)}.__getitem__  # chunks 10k..10k+9 belong to doc-k


def test_a_confident_first_place_is_not_outvoted_by_agreement_on_generic_words():
    # BM25 is sure about chunk 100 (doc-10); dense ranks it 4th by a hair. Chunks 0-20 sit high in both.
    dense = [(0, 0.61), (10, 0.60), (20, 0.60), (100, 0.59), (150, 0.30)]
    sparse = [(100, 14.0), (0, 3.1), (10, 3.0), (20, 3.0), (160, 1.0)]
    chunk_rrf = [r.document_id for r in fusion.chunk_rrf(dense, sparse, DOCUMENT_OF)]
    fused = [r.document_id for r in fusion.fuse(dense, sparse, DOCUMENT_OF)]
    assert chunk_rrf[0] == "doc-0"  # the failure: outvoted by a chunk both lists hold
    assert fused[0] == "doc-10"


def test_documents_are_ranked_by_their_best_chunk_and_keep_their_chunks_as_evidence():
    dense = [(5, 0.9), (12, 0.8), (3, 0.7), (7, 0.1)]
    ranked = fusion.fuse(dense, [], DOCUMENT_OF)
    assert [r.document_id for r in ranked] == ["doc-0", "doc-1"]
    assert [i for i, _ in ranked[0].chunks] == [5, 3, 7]
    assert ranked[0].score == ranked[0].chunks[0][1] == pytest.approx(fusion.DENSE_WEIGHT)
    scores = [s for _, s in ranked[0].chunks]
    assert scores == sorted(scores, reverse=True)


def test_one_empty_list_keeps_the_other_order():
    sparse = [(30, 9.0), (10, 5.0), (20, 1.0)]
    assert [r.document_id for r in fusion.fuse([], sparse, DOCUMENT_OF)] == ["doc-3", "doc-1", "doc-2"]
    assert fusion.fuse([], [], DOCUMENT_OF) == []


def test_normalisation_maps_to_unit_range():
    assert fusion.normalised([(1, 4.0), (2, 2.0), (3, 3.0)]) == {1: 1.0, 2: 0.0, 3: 0.5}
    assert fusion.normalised([(1, 0.3)]) == {1: 1.0}  # a lone candidate is the best there is
    assert fusion.normalised([]) == {}


def test_rrf_and_document_rrf_arithmetic():
    fused = fusion.reciprocal_rank_fusion([[1, 2, 3], [3, 1]], rrf_k=60)
    assert [i for i, _ in fused] == [1, 3, 2]
    ranked = fusion.document_rrf([(0, 0.9), (1, 0.8), (10, 0.7)], [(11, 5.0)], DOCUMENT_OF, cutoff=1)
    assert [(r.document_id, r.score) for r in ranked] == [("doc-0", pytest.approx(1 / 61)),
                                                          ("doc-1", pytest.approx(1 / 61))]
