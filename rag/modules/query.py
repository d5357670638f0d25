"""The rewrite module: turns the flow state into the queries the next retrieve step sends."""

from __future__ import annotations

from longbow.rag.modules.state import FlowState
from longbow.rag.modules.text import content_words

_REWRITE_PROMPT = ("Rewrite the question as a short search query of keywords. Reply with the query only.\n"
                   "Question: {question}")


def rewrite(state: FlowState, mode: str = "question", last_words: int = 48) -> None:
    """mode: question (as asked) | keywords (its content words) | generated (question + the answer so
    far, the last `last_words` words) | pending (FLARE's masked tentative sentence) | lm (the model
    rewrites it)."""
    builders = {"question": _question, "keywords": _keywords, "generated": _generated, "pending": _pending,
                "lm": _by_model}
    if mode not in builders:
        raise ValueError(f"unknown rewrite mode {mode!r}; valid: {sorted(builders)}")
    query = builders[mode](state, last_words)
    state.queries = [query]
    state.record("rewrite", mode=mode, query=query)


def _question(state: FlowState, last_words: int) -> str:
    return state.question


def _keywords(state: FlowState, last_words: int) -> str:
    return " ".join(content_words(state.question)) or state.question


def _generated(state: FlowState, last_words: int) -> str:
    # NOTE: the question stays in the query: the answer so far alone is often a few words ("The founder")
    tail = " ".join(state.answer.split()[-last_words:])
    return f"{state.question} {tail}".strip()


def _pending(state: FlowState, last_words: int) -> str:
    # NOTE: FLARE's masked sentence; when masking leaves no content word, fall back to the question
    masked = state.pending.masked_query if state.pending else ""
    return masked if content_words(masked) else state.question


def _by_model(state: FlowState, last_words: int) -> str:
    prompt = state.lm.chat([{"role": "user", "content": _REWRITE_PROMPT.format(question=state.question)}])
    generation = state.lm.generate(prompt, max_tokens=24, stop=["\n"])
    state.usage.lm_calls += 1
    state.usage.generated_tokens += len(generation.token_ids)
    return generation.text.strip() or state.question
