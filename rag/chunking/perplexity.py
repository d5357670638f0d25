"""Meta-Chunking, perplexity variant: cut where the model finds the text least surprising just before a jump.

1. Sentences (pysbd). 2. Per-sentence mean negative log-likelihood of its tokens, each conditioned on the
preceding text of the document (all of it within the first 512 tokens, at least the last 128 after),
scored in fixed overlapping windows that the engine batches (`LM.token_logprobs_many`): linear in length.
3. A boundary after sentence i when i is a local minimum and a neighbour is higher by >= theta (the rule
of the Meta-Chunking reference code, plateaus included).
4. Pieces between boundaries are merged greedily up to the target length; a piece longer than the target
is cut at its largest NLL rise until it fits.
"""

from __future__ import annotations

import bisect
import itertools
import math

from longbow.rag.chunking.base import Chunker, merge_to_target, sentence_spans, token_counts
from longbow.rag.lm import LM


def perplexity_boundaries(values: list[float], theta: float) -> list[int]:
    """Indices i such that a chunk ends after sentence i: values[i] is a local minimum and a neighbour is
    higher by >= theta. NaN (a sentence with no scored token) never makes a boundary."""
    cuts = []
    for i in range(1, len(values) - 1):
        before, here, after = values[i - 1], values[i], values[i + 1]
        minimum = here < before and here < after and (before - here >= theta or after - here >= theta)
        plateau = here < before and here == after and before - here >= theta  # the left drop decides
        if minimum or plateau:
            cuts.append(i)
    return cuts


# NOTE: scoring cost is linear in text length: fixed windows of WINDOW tokens, each scoring its last STRIDE
# tokens with at least WINDOW - STRIDE tokens of context, so every token is forwarded WINDOW / STRIDE = 1.33
# times and attention never spans more than WINDOW tokens. One pass over the whole text (the rule before)
# was superlinear on CPU (1,024 tokens 2.7 s, 4,096 tokens 21.9 s: attention over up to 8,192 tokens).
# All windows go to the engine in one call (`LM.token_logprobs_many`), so its scheduler batches them.
WINDOW = 512
STRIDE = 384


def scoring_windows(length: int, window: int = WINDOW, stride: int = STRIDE) -> list[tuple[int, int, int]]:
    """(start, first_scored, end) token ranges: window [start, end) scores positions [first_scored, end),
    given at least window - stride tokens before them (all of them near the start). The scored ranges
    tile 1 .. length - 1. A text of <= window tokens is one window: exactly one pass."""
    if not 0 < stride <= window - 1:
        raise ValueError(f"stride must be in [1, window - 1], got window {window}, stride {stride}")
    if length <= window:
        return [(0, 1, length)] if length > 1 else []
    spans, first = [], 1
    while first < length:
        end = min(length, max(first + stride, window))
        spans.append((max(0, end - window), first, end))
        first = end
    return spans


def scored_logprobs(lm: LM, token_ids: list[int], window: int = WINDOW,
                    stride: int | None = None) -> list[float]:
    """logprob of every token i >= 1 given the tokens before it, within `scoring_windows`: exact (all
    preceding tokens) for i < window, else the last >= window - stride tokens (the strided-perplexity
    approximation; Meta-Chunking compares neighbouring sentences, which needs local context only)."""
    window = min(window, lm.max_context)
    stride = stride or max(1, min(window * 3 // 4, window - 1))
    spans = scoring_windows(len(token_ids), window, stride)
    pieces = lm.token_logprobs_many([token_ids[start:end] for start, _, end in spans])
    scored = []
    for (start, first, _), piece in zip(spans, pieces):
        scored.extend(piece[first - start - 1:])  # piece[j] is the logprob of position start + 1 + j
    return scored


def sentence_nll(lm: LM, token_ids: list[int], offsets: list[tuple[int, int]],
                 sentences: list[tuple[int, int]], window: int | None = None) -> list[float]:
    """Mean NLL (nats per token) of each sentence's tokens given the preceding text; NaN when none scored.
    token_ids/offsets: `lm.tokenize_with_offsets` of the text the sentence spans index."""
    return sentence_means(scored_logprobs(lm, token_ids, max(8, window or WINDOW)), offsets, sentences)


def sentence_means(logprobs: list[float], offsets: list[tuple[int, int]],
                   sentences: list[tuple[int, int]]) -> list[float]:
    """Mean NLL per sentence from logprobs of tokens 1.. (offsets: every token's character span)."""
    starts = [s for s, _ in sentences]
    totals, counts = [0.0] * len(sentences), [0] * len(sentences)
    for (_, end), logprob in zip(offsets[1:], logprobs):
        # A BPE token like " He" starts on the space that ends the previous sentence: place it by its last char.
        index = max(0, bisect.bisect_right(starts, max(end - 1, 0)) - 1)
        totals[index] -= logprob
        counts[index] += 1
    return [t / c if c else math.nan for t, c in zip(totals, counts)]


def split_oversized(pieces: list[list[int]], lengths: list[int], values: list[float], target: int) -> list[list[int]]:
    """Pieces are lists of sentence indices; one over `target` tokens (with > 1 sentence) is cut before
    its sentence with the largest NLL rise, recursively."""
    out = []
    for piece in pieces:
        out.extend(_split(piece, lengths, values, target))
    return out


def _split(piece: list[int], lengths: list[int], values: list[float], target: int) -> list[list[int]]:
    if len(piece) < 2 or sum(lengths[i] for i in piece) <= target:
        return [piece]
    rises = [_rise(values, piece[j - 1], piece[j]) for j in range(1, len(piece))]
    cut = 1 + max(range(len(rises)), key=rises.__getitem__)
    return _split(piece[:cut], lengths, values, target) + _split(piece[cut:], lengths, values, target)


def _rise(values: list[float], before: int, after: int) -> float:
    rise = values[after] - values[before]
    return -math.inf if math.isnan(rise) else rise


def pieces_to_boundaries(sentences: list[tuple[int, int]], lengths: list[int], ends: list[int],
                         values: list[float], target: int) -> list[int]:
    """Sentence-level chunk ends -> character boundaries, after splitting oversized pieces and merging small
    ones up to `target` tokens. Shared by both Meta-Chunking variants."""
    cuts = [-1, *ends, len(sentences) - 1]
    pieces = [list(range(a + 1, b + 1)) for a, b in itertools.pairwise(cuts) if b > a]
    pieces = split_oversized(pieces, lengths, values, target)
    spans = [(sentences[p[0]][0], sentences[p[-1]][1]) for p in pieces]
    return merge_to_target(spans, [sum(lengths[i] for i in p) for p in pieces], target)


class PerplexityChunker(Chunker):
    """Meta-Chunking PPL chunking over an `LM`; lengths in the LM's tokens."""

    name = "perplexity"

    def __init__(self, lm: LM, target_tokens: int = 128, theta: float = 0.0, window: int | None = None):
        if target_tokens < 1:
            raise ValueError("target_tokens must be >= 1")
        self.lm, self.target_tokens, self.theta, self.window = lm, target_tokens, theta, window

    def boundaries(self, text: str) -> list[int]:
        sentences = sentence_spans(text)
        if len(sentences) < 2:
            return []
        ids, offsets = self.lm.tokenize_with_offsets(text)
        values = sentence_nll(self.lm, ids, offsets, sentences, self.window)
        lengths = token_counts(offsets, sentences)
        ends = perplexity_boundaries(values, self.theta)
        return pieces_to_boundaries(sentences, lengths, ends, values, self.target_tokens)
