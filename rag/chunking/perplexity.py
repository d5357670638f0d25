"""Meta-Chunking, perplexity variant: cut where the model finds the text least surprising just before a jump.

1. Sentences (pysbd). 2. Per-sentence mean negative log-likelihood of its tokens, each conditioned on all
preceding text of the document, from one forward pass (`LM.token_logprobs`); texts longer than the model's
context are scored in overlapping windows. 3. A boundary after sentence i when i is a local minimum and a
neighbour is higher by >= theta (the rule of the Meta-Chunking reference code, plateaus included).
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


def scored_logprobs(lm: LM, token_ids: list[int], window: int) -> list[float]:
    """logprob of every token i >= 1 given all tokens before it, in windows of <= `window` tokens that
    overlap by a quarter, so each token after the first window still sees window*3/4 tokens of context."""
    # NOTE: exact "all preceding text" conditioning holds within one window (max_context tokens, 8192 for
    # SmolLM2); beyond it the context is the sliding window, the usual strided-perplexity approximation.
    if len(token_ids) <= window:
        return lm.token_logprobs(token_ids) if len(token_ids) > 1 else []
    overlap, scored, start = window // 4, [], 0
    while len(scored) < len(token_ids) - 1:
        piece = lm.token_logprobs(token_ids[start:start + window])  # logprobs of positions start+1 ..
        already = len(scored) - start  # positions start+1 .. len(scored) were scored by the last window
        scored.extend(piece[already:])
        start += window - overlap
    return scored


def sentence_nll(lm: LM, token_ids: list[int], offsets: list[tuple[int, int]], sentences: list[tuple[int, int]],
                 window: int | None = None) -> list[float]:
    """Mean NLL (nats per token) of each sentence's tokens given all preceding text; NaN when none scored.
    token_ids/offsets: `lm.tokenize_with_offsets` of the text the sentence spans index."""
    logprobs = scored_logprobs(lm, token_ids, max(8, min(window or lm.max_context, lm.max_context)))
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
