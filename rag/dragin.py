"""DRAGIN (Su et al., 2024): retrieve when the model's real information need shows, with a query built
from what the model attends to.

- RIND scores generated token i as H_i * a_max(i) * s_i: H_i the entropy of the distribution token i was
  drawn from, a_max(i) the largest last-layer attention any later generated token pays to position i, s_i
  0 for stopwords and punctuation, 1 for content words. Retrieval fires at the first token whose score
  exceeds theta.
- QFS turns last-layer attention into a query: the top-n content words, in the order they appear.
  "trigger" (the paper): the triggering token's attention over everything before it, words from the
  question and the text before the trigger. "later" (our default, see rag.flows.dragin_flow): the most
  attention the trigger or any later token pays each position, words from the question and the round's
  whole text.
- The round keeps the output up to the sentence holding the trigger, and the flow (rag.flows) retrieves,
  adds the documents to the prompt and resumes from the kept text. Retrieval rounds are bounded.

The arithmetic is plain functions over lists so it is tested on hand-made arrays; `dragin_round` is the
flow module that runs it on an LMGeneration (entropies and attention from the engine).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from longbow.rag.modules.generation import run_generation
from longbow.rag.modules.state import FlowState
from longbow.rag.modules.text import (STOPWORDS, is_content_word, sentence_spans, token_is_content, token_spans,
                              words)


_PUNCTUATION = string.punctuation + "“”‘’"


def attention_received(attention: list[list[float]], prompt_length: int) -> list[float]:
    """a_max(i) for each generated token i: max over later generated tokens j > i of attention[j] at
    position prompt_length + i; 0 for the last token (nothing attends to it yet)."""
    count = len(attention)
    received = [0.0] * count
    for j in range(1, count):
        row = attention[j]
        for i in range(j):
            received[i] = max(received[i], row[prompt_length + i])
    return received


def rind_scores(entropies: list[float], attention: list[list[float]], prompt_length: int,
                is_content: list[bool]) -> list[float]:
    """H_i * a_max(i) * s_i for each generated token."""
    received = attention_received(attention, prompt_length)
    return [h * a * float(s) for h, a, s in zip(entropies, received, is_content)]


def first_trigger(scores: list[float], theta: float) -> int | None:
    """Index of the first token whose RIND score exceeds theta, or None."""
    return next((i for i, score in enumerate(scores) if score > theta), None)


@dataclass(frozen=True)
class WordWeight:
    word: str
    weight: float
    position: int  # of the word's first token


def words_by_attention(pieces: list[str], weights: list[float]) -> list[WordWeight]:
    """Join token pieces into words (a piece continues a word when it starts with a letter or digit right
    after one); a word's weight is the largest weight of its tokens."""
    result: list[WordWeight] = []
    current, weight, start, joinable = "", 0.0, 0, False
    for position, (piece, w) in enumerate(zip(pieces, weights)):
        continues = joinable and piece[:1].isalnum()
        if continues:
            current, weight = current + piece, max(weight, w)
        else:
            if current.strip():
                result.append(WordWeight(current.strip(), weight, start))
            current, weight, start = piece, w, position
        joinable = bool(piece) and piece[-1].isalnum()
    if current.strip():
        result.append(WordWeight(current.strip(), weight, start))
    return result


def qfs_query(pieces: list[str], weights: list[float], top_n: int = 6,
              allowed: set[str] | None = None) -> str:
    """The top_n distinct content words by attention weight, rendered in order of first appearance.
    allowed (lower case), when given, restricts words to those (e.g. the user message and the answer, so
    chat-template and system-prompt words never enter a query)."""
    best: dict[str, WordWeight] = {}
    for item in words_by_attention(pieces, weights):
        word = item.word.strip(_PUNCTUATION)  # pieces may carry punctuation ("Quon.")
        key = word.lower()
        if not is_content_word(word) or (allowed is not None and key not in allowed):
            continue
        if key not in best or item.weight > best[key].weight:
            best[key] = WordWeight(word, item.weight, min(item.position, best.get(key, item).position))
    top = sorted(best.values(), key=lambda w: -w.weight)[:top_n]
    return " ".join(w.word for w in sorted(top, key=lambda w: w.position))


def cut_before_sentence(text: str, char_position: int) -> str:
    """text up to the start of the sentence that holds char_position (trailing whitespace dropped)."""
    for start, end in sentence_spans(text):
        if start <= char_position < end:
            return text[:start].rstrip()
    return text.rstrip()


def dragin_round(state: FlowState, theta: float = 0.6, top_n: int = 4, max_retrieval_rounds: int = 3,
                 query_attention: str = "later") -> None:
    """Generate (with attention) and either commit everything (no trigger, or the retrieval rounds are
    spent: state.decision = "done") or commit the text before the triggering sentence and set the QFS
    query (state.decision = "retrieve"). No-op once finished."""
    if state.finished:
        state.decision = "done"
        return
    prompt, generation = run_generation(state, state.tokens_left, return_attention=True)
    spans = token_spans(state.lm, generation.token_ids, generation.text)
    scores = rind_scores(generation.entropies, generation.attention, len(prompt),
                         token_is_content(spans, generation.text))
    trigger = first_trigger(scores, theta)
    if trigger is None or state.usage.retrieval_rounds >= max_retrieval_rounds:
        _commit_all(state, generation, trigger, scores)
        return
    kept = cut_before_sentence(generation.text, spans[trigger][0])
    state.commit(kept, sum(1 for _, end in spans if end <= len(kept)))
    query = _query_at(state, prompt, generation, trigger, top_n, query_attention)
    state.queries, state.decision = [query], "retrieve"
    state.record("dragin", trigger=trigger, score=scores[trigger], text=generation.text, kept=kept,
                 query=query)


def _commit_all(state: FlowState, generation, trigger: int | None, scores: list[float]) -> None:
    state.commit(generation.text, len(generation.token_ids))
    state.finished = generation.finish_reason != "length" or state.tokens_left == 0
    state.decision = "done"
    state.record("dragin", trigger=trigger, max_score=max(scores, default=0.0), text=generation.text,
                 kept=generation.text, query=None)


def later_attention(attention: list[list[float]], prompt_length: int, trigger: int) -> list[float]:
    """Per position (prompt + every generated token but the last): the most attention the trigger or any
    later generated token pays it. # [prompt_length + len(attention) - 1]"""
    weights = [0.0] * (prompt_length + len(attention) - 1)
    for row in attention[trigger:]:
        for position, value in enumerate(row):
            weights[position] = max(weights[position], value)
    return weights


def _query_at(state: FlowState, prompt: list[int], generation, trigger: int, top_n: int, source: str) -> str:
    """source "trigger" (the paper): the trigger's attention over what precedes it; query words from the
    question and the text before the trigger. "later": the trigger's and later tokens' attention over
    everything but the last token; query words from the question and the whole round's text, so a
    bridge the model wrote in the triggering sentence ("... is Huxford") can enter the query."""
    if source == "later":
        ids = [*prompt, *generation.token_ids[:-1]]
        weights = later_attention(generation.attention, len(prompt), trigger)
        visible = state.answer + generation.text
    else:
        ids = [*prompt, *generation.token_ids[:trigger]]
        weights = generation.attention[trigger]  # [len(prompt) + trigger]
        visible = state.answer + state.lm.detokenize(generation.token_ids[:trigger])
    pieces = [state.lm.detokenize([token]) for token in ids]
    # NOTE: query words come from the question and the generated text only (the documents' tokens still
    # count when they repeat those words). Letting any document word in was worse on a smoke run: the
    # trigger token attends to look-alike names ("Gabril Gasos") and they pushed the bridge out.
    allowed = {w.lower() for w in words(f"{state.question} {visible}")} - STOPWORDS
    return qfs_query(pieces, weights, top_n, allowed) or state.question
