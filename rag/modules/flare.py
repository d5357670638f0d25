"""FLARE-style active retrieval as modules: look ahead one sentence, route on its least likely token,
and commit it. The flow (rag.flows) retrieves with the masked sentence and looks ahead again when the
router says "low"."""

from __future__ import annotations

import math
import re

from longbow.rag.modules.generation import run_generation
from longbow.rag.modules.state import FlowState, Pending
from longbow.rag.modules.text import sentence_spans, token_spans


def lookahead(state: FlowState, tokens: int = 32, threshold: float = 0.4) -> None:
    """Generate up to `tokens` tokens and keep the first sentence as state.pending (not committed). Tokens
    whose probability is below threshold are masked out of the pending query."""
    if state.finished:
        return
    _, generation = run_generation(state, min(tokens, state.tokens_left))
    spans = token_spans(state.lm, generation.token_ids, generation.text)
    sentences = sentence_spans(generation.text)
    end = sentences[0][1] if sentences else len(generation.text)
    count = sum(1 for start, _ in spans if start < end) or len(spans)
    probabilities = [math.exp(lp) for lp in generation.logprobs[:count]]
    unsure = [span for span, p in zip(spans[:count], probabilities) if p < threshold]
    masked = " ".join(w for w, (s, e) in _words_with_spans(generation.text[:end])
                      if not any(s < u_end and u_start < e for u_start, u_end in unsure))
    rest_is_empty = not generation.text[end:].strip()
    ends_answer = rest_is_empty and generation.finish_reason != "length"
    state.pending = Pending(generation.text[:end], count, min(probabilities, default=1.0), masked.strip(),
                            ends_answer)
    state.record("lookahead", sentence=state.pending.text, min_probability=state.pending.min_probability,
                 masked_query=state.pending.masked_query)


def _words_with_spans(text: str) -> list[tuple[str, tuple[int, int]]]:
    return [(m.group(), m.span()) for m in re.finditer(r"\S+", text)]


def confidence(state: FlowState, threshold: float = 0.4) -> str:
    """Router: "low" when some token of the pending sentence had probability below threshold."""
    if state.pending is None:
        return "high"
    return "low" if state.pending.min_probability < threshold else "high"


def commit_pending(state: FlowState) -> None:
    """Make the pending sentence part of the answer (streamed now)."""
    if state.pending is None:
        return
    state.commit(state.pending.text, state.pending.token_count)
    state.finished = state.pending.ends_answer or state.tokens_left == 0 or not state.pending.text
    state.record("commit", text=state.pending.text, finished=state.finished)
    state.pending = None
