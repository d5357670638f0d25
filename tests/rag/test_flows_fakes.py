"""Fakes for the flow and DRAGIN tests: a word-level LM whose replies are scripted (text, per-token
log-probabilities, entropies, attention) and a keyword-overlap retriever. Tested here themselves."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from longbow.rag.lm import LM, LMGeneration
from longbow.rag.types import Chunk, Document, Hit, Retriever

EOS = 0


@dataclass
class Reply:
    """What the fake LM generates next. logprobs/entropies default to 0 per token; attention(prompt_length,
    token_count) builds the rows (row i has prompt_length + i entries), default uniform."""

    text: str
    logprobs: list[float] | None = None
    entropies: list[float] | None = None
    attention: Callable[[int, int], list[list[float]]] | None = None
    finish: bool = True  # append EOS (finish "stop") when it fits in max_tokens


@dataclass
class Call:
    prompt: str
    max_tokens: int
    return_attention: bool


class WordLM(LM):
    """Tokens are whitespace-led words (' word'); the EOS token decodes to ''. script(prompt_text, call
    number) -> Reply."""

    max_context = 4096

    def __init__(self, script: Callable[[str, int], Reply]):
        self.script = script
        self.pieces: list[str] = [""]
        self.ids: dict[str, int] = {}
        self.calls: list[Call] = []

    def _id(self, piece: str) -> int:
        if piece not in self.ids:
            self.ids[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self.ids[piece]

    def tokenize_with_offsets(self, text):
        matches = list(re.finditer(r"\s*\S+|\s+", text))
        return [self._id(m.group()) for m in matches], [(m.start(), m.end()) for m in matches]

    def tokenize(self, text):
        return self.tokenize_with_offsets(text)[0]

    def detokenize(self, token_ids):
        return "".join(self.pieces[i] for i in token_ids)

    def chat(self, messages):
        return self.tokenize("".join(f"<{m['role']}> {m['content']} " for m in messages) + "<assistant>")

    def token_logprobs(self, token_ids):
        return [0.0] * (len(token_ids) - 1)

    def generate(self, prompt_ids, *, max_tokens, stop=None, temperature=0.0, return_attention=False,
                 on_text=None):
        reply = self.script(self.detokenize(prompt_ids), len(self.calls))
        self.calls.append(Call(self.detokenize(prompt_ids), max_tokens, return_attention))
        ids = self.tokenize(reply.text)
        logprobs = list(reply.logprobs or [0.0] * len(ids))
        entropies = list(reply.entropies or [0.0] * len(ids))
        reason = "length" if len(ids) >= max_tokens or not reply.finish else "stop"
        ids, logprobs, entropies = ids[:max_tokens], logprobs[:max_tokens], entropies[:max_tokens]
        if reason == "stop":
            ids, logprobs, entropies = [*ids, EOS], [*logprobs, 0.0], [*entropies, 0.0]
        text = self.detokenize(ids)
        if on_text:
            for token in ids:
                if self.pieces[token]:
                    on_text(self.pieces[token])
        attention = []
        if return_attention:
            build = reply.attention or _uniform
            attention = build(len(prompt_ids), len(ids))
        return LMGeneration(ids, text, logprobs, entropies, attention, reason)


def _uniform(prompt_length: int, count: int) -> list[list[float]]:
    return [[1.0 / (prompt_length + i)] * (prompt_length + i) for i in range(count)]


@dataclass
class KeywordRetriever(Retriever):
    """Scores each document by the number of distinct lower-case query words it contains; records queries."""

    documents: list[Document]
    queries: list[str] = field(default_factory=list)

    def retrieve(self, query, top_k=5, filters=None):
        self.queries.append(query)
        wanted = set(re.findall(r"\w+", query.lower()))
        scored = []
        for d in self.documents:
            if filters and any(d.metadata.get(k) != v for k, v in filters.items()):
                continue
            score = len(wanted & set(re.findall(r"\w+", d.text.lower())))
            if score:
                scored.append((score, d))
        scored.sort(key=lambda pair: -pair[0])
        return [Hit(Chunk(d.document_id, d.document_id, d.text, 0, len(d.text), dict(d.metadata)), float(s))
                for s, d in scored[:top_k]]


def test_word_lm_round_trips_and_streams():
    lm = WordLM(lambda prompt, n: Reply("Hello big world."))
    text = "Some words,  here."
    assert lm.detokenize(lm.tokenize(text)) == text
    pieces = []
    out = lm.generate(lm.tokenize("hi"), max_tokens=10, on_text=pieces.append, return_attention=True)
    assert out.text == "Hello big world." == "".join(pieces) and out.token_ids[-1] == EOS
    assert [len(row) for row in out.attention] == [1, 2, 3, 4]
    assert lm.generate([], max_tokens=2).finish_reason == "length"


def test_keyword_retriever_ranks_by_overlap_and_filters():
    docs = [Document("a", "red apple", {"kind": "fruit"}), Document("b", "red apple pie", {"kind": "dish"})]
    retriever = KeywordRetriever(docs)
    assert [h.chunk.chunk_id for h in retriever.retrieve("apple pie")] == ["b", "a"]
    assert [h.chunk.chunk_id for h in retriever.retrieve("apple", filters={"kind": "fruit"})] == ["a"]
    assert retriever.retrieve("banana") == []
