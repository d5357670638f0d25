"""Document-level retrieval quality of each retriever and each fusion rule, side by side on one index:
the dense and BM25 candidate lists of every question are computed once, then every rule ranks documents
from the same lists. Recall@5: share of a question's gold documents among the first 5 documents;
MRR@10: 1 / rank of the first gold document within the first 10 (0 if none)."""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable

from longbow.rag import fusion
from longbow.rag.eval.synthetic import Corpus
from longbow.rag.retrieve import HybridRetriever

Rule = Callable[[fusion.Candidates, fusion.Candidates, fusion.DocumentOf], list[fusion.Ranked]]

RULES: dict[str, Rule] = {
    "dense": lambda dense, sparse, of: fusion.single(dense, of),
    "bm25": lambda dense, sparse, of: fusion.single(sparse, of),
    "hybrid": fusion.fuse,  # the retriever's rule
    "chunk_rrf": fusion.chunk_rrf,
    "document_rrf": fusion.document_rrf,
    "document_rrf_top10": functools.partial(fusion.document_rrf, cutoff=10),
    "document_rrf_dense2x": functools.partial(fusion.document_rrf, weights=(1.0, 0.5)),
    **{f"score_{w}": functools.partial(fusion.score_fusion, dense_weight=w)
       for w in (0.5, 0.6, 0.7, 0.8, 0.9)},
    **{f"document_score_{w}": functools.partial(fusion.document_score_fusion, dense_weight=w)
       for w in (0.5, 0.75)},
}


def document_metrics(ranked: list[str], gold: list[str]) -> tuple[float, float]:
    """(Recall@5, MRR@10) of one ranked list of document ids."""
    recall = sum(g in ranked[:5] for g in gold) / len(gold)
    first = next((rank for rank, d in enumerate(ranked[:10], 1) if d in gold), None)
    return recall, 1.0 / first if first else 0.0


def candidate_lists(retriever: HybridRetriever, query: str) -> tuple[list, list]:
    """The two candidate lists the retriever would fuse for `query` (its own depth)."""
    index = retriever.index
    vector = retriever.embedder.embed([query])[0]
    with index.lock:
        return (index.dense.search(vector, retriever.candidates, None),
                index.sparse.search(query, retriever.candidates, None))


def compare_rules(retriever: HybridRetriever, corpus: Corpus, rules: dict[str, Rule] = RULES) -> dict:
    """{rule: {"recall@5", "mrr@10", "per_question": [[recall, rr], ...]}} over the corpus's questions."""
    document_of = lambda chunk_id: retriever.index.chunks[chunk_id].document_id
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name in rules}
    for question in corpus.questions:
        dense, sparse = candidate_lists(retriever, question.text)
        for name, rule in rules.items():
            ranked = [r.document_id for r in rule(dense, sparse, document_of)]
            scores[name].append(document_metrics(ranked, question.gold_document_ids))
    return {name: {"recall@5": statistics.fmean(r for r, _ in rows),
                   "mrr@10": statistics.fmean(m for _, m in rows), "per_question": rows}
            for name, rows in scores.items()}
