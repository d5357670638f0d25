"""Meta-Chunking, margin-sampling variant: the model is asked, sentence by sentence, whether the next
sentence should start a new chunk. margin = P(keep) - P(split), normalised over the two answer tokens;
the sentence joins the current chunk when the margin exceeds a running threshold (the mean of the last
few margins, as in the reference code), so the decision adapts to the model's bias toward one answer.
The resulting pieces are split/merged to the target length like the perplexity variant.
"""

from __future__ import annotations

import math

from longbow.rag.chunking.base import Chunker, sentence_spans, token_counts
from longbow.rag.chunking.perplexity import pieces_to_boundaries
from longbow.rag.lm import LM

_INSTRUCTION = (
    "Text chunking. Does Sentence 2 continue the topic of Text 1? Answer 1 if Sentence 2 starts a new "
    "topic (split), 2 if it continues (keep). Answer with one digit.\n\nText 1: {context}\n\n"
    "Sentence 2: {sentence}"
)
# NOTE: only the end of the current chunk is shown (about two sentences): every decision costs two forward
# passes over the prompt, and on CPU prompt length is what the chunker's speed is made of.
_CONTEXT_CHARS = 400
_HISTORY = 5  # margins averaged into the running threshold


def answer_token(lm: LM, answer: str) -> int:
    """Our tokenizer's id for an answer; it must be one token or the margin would compare prefixes."""
    ids = lm.tokenize(answer)
    if len(ids) != 1:
        raise ValueError(f"answer {answer!r} is {len(ids)} tokens for this tokenizer; margin sampling needs 1")
    return ids[0]


def keep_margin(lm: LM, context: str, sentence: str, split_id: int, keep_id: int) -> float:
    """P(keep) - P(split) with the two probabilities renormalised to sum to 1."""
    prompt = lm.chat([{"role": "user", "content": _INSTRUCTION.format(context=context[-_CONTEXT_CHARS:].strip(),
                                                                       sentence=sentence.strip())}])
    split_lp, keep_lp = lm.next_token_logprobs(prompt, [split_id, keep_id])
    top = max(split_lp, keep_lp)
    p_split, p_keep = math.exp(split_lp - top), math.exp(keep_lp - top)
    return (p_keep - p_split) / (p_keep + p_split)


class MarginChunker(Chunker):
    """Meta-Chunking margin sampling over an `LM`; lengths in the LM's tokens."""

    name = "margin"

    def __init__(self, lm: LM, target_tokens: int = 128, split_answer: str = "1", keep_answer: str = "2"):
        if target_tokens < 1:
            raise ValueError("target_tokens must be >= 1")
        self.lm, self.target_tokens = lm, target_tokens
        self.split_id, self.keep_id = answer_token(lm, split_answer), answer_token(lm, keep_answer)

    def margins(self, text: str, sentences: list[tuple[int, int]]) -> tuple[list[int], list[float]]:
        """Sentence indices after which a chunk ends, and each decision's margin (index i: before sentence i+1)."""
        ends, margins, threshold, chunk_start = [], [], 0.0, 0
        for i in range(1, len(sentences)):
            margin = keep_margin(self.lm, text[sentences[chunk_start][0]:sentences[i][0]],
                                 text[sentences[i][0]:sentences[i][1]], self.split_id, self.keep_id)
            if margin <= threshold:
                ends.append(i - 1)
                chunk_start = i
            margins.append(margin)
            threshold = sum(margins[-_HISTORY:]) / len(margins[-_HISTORY:])
        return ends, margins

    def boundaries(self, text: str) -> list[int]:
        sentences = sentence_spans(text)
        if len(sentences) < 2:
            return []
        ends, margins = self.margins(text, sentences)
        _, offsets = self.lm.tokenize_with_offsets(text)
        # For oversized pieces, cut where the model most wanted to split: value = -margin before sentence i.
        values = [0.0, *(-m for m in margins)]
        return pieces_to_boundaries(sentences, token_counts(offsets, sentences), ends, values,
                                    self.target_tokens)
