"""The retrieve, fuse and rerank modules: query the retriever, merge per-query hit lists with reciprocal
rank fusion into the prompt's context, and reorder the context."""

from __future__ import annotations

from longbow.rag.modules.state import FlowState
from longbow.rag.modules.text import content_words
from longbow.rag.types import Hit


def retrieve(state: FlowState, top_k: int | None = None) -> None:
    """One hit list per query in state.queries (the retriever is called once per query).

    NOTE: asks for top_k more than the context already holds, so that fuse can add top_k documents the
    prompt does not have yet: in a later round the first hop's document usually ranks first again and
    would otherwise push the new one out."""
    k = (top_k or state.settings.top_k) + len(state.hits)
    filters = state.settings.filters
    state.retrieved = [state.retriever.retrieve(q, top_k=k, filters=filters) for q in state.queries]
    state.usage.retrieval_rounds += 1
    state.usage.retrievals += len(state.queries)
    state.record("retrieve", queries=list(state.queries),
                 chunk_ids=[[h.chunk.chunk_id for h in hits] for hits in state.retrieved])


def reciprocal_rank_fusion_hits(hit_lists: list[list[Hit]], k: int = 60) -> list[Hit]:
    """Hits of all lists ordered by sum of 1 / (k + rank) (rank from 1); the score is that sum."""
    scores: dict[str, float] = {}
    chunks = {}
    for hits in hit_lists:
        for rank, hit in enumerate(hits, start=1):
            scores[hit.chunk.chunk_id] = scores.get(hit.chunk.chunk_id, 0.0) + 1.0 / (k + rank)
            chunks.setdefault(hit.chunk.chunk_id, hit.chunk)
    order = sorted(scores, key=lambda chunk_id: -scores[chunk_id])
    return [Hit(chunks[chunk_id], scores[chunk_id]) for chunk_id in order]


def fuse(state: FlowState, k: int = 60, top_k: int | None = None) -> None:
    """Fuse state.retrieved and add its best top_k hits not yet in the context to the context.

    NOTE: the context accumulates across rounds (new hits after old ones, duplicates dropped, the oldest
    dropped beyond settings.max_context_hits): a two-hop answer needs the first hop's document and the
    second's in the same prompt."""
    if len(state.retrieved) == 1:
        fresh = state.retrieved[0]  # one list: keep the retriever's own scores
    else:
        fresh = reciprocal_rank_fusion_hits(state.retrieved, k)
    known = {h.chunk.chunk_id for h in state.hits}
    added = [h for h in fresh if h.chunk.chunk_id not in known][: top_k or state.settings.top_k]
    state.hits = [*state.hits, *added][-state.settings.max_context_hits:]
    state.record("fuse", added=[h.chunk.chunk_id for h in added],
                 documents=[h.chunk.document_id for h in added],
                 context=[h.chunk.chunk_id for h in state.hits])


def rerank(state: FlowState) -> None:
    """Order the context by how many content words of the question and answer so far each chunk holds
    (a lexical reranker: no extra model on the request path). Stable for ties."""
    wanted = {w.lower() for w in content_words(f"{state.question} {state.answer}")}

    def overlap(hit: Hit) -> int:
        return len(wanted & {w.lower() for w in content_words(hit.chunk.text)})

    # NOTE: best last, nearest the question in the prompt, where a small model attends most
    state.hits = sorted(state.hits, key=overlap)
    state.record("rerank", context=[h.chunk.chunk_id for h in state.hits])
