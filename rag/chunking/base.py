"""The Chunker plug point and the pieces every chunker shares: sentence spans (pysbd), turning boundary
offsets into `Chunk`s, and greedy merging of small pieces up to a target length.

A chunker only decides *where* to cut. Every chunker's output therefore has the same guarantees, enforced
here once: chunk i covers text[boundaries[i]:boundaries[i+1]], chunks are never empty, and joining the chunk
texts restores the document text exactly (whitespace belongs to the chunk before it).
"""

from __future__ import annotations

import abc
import bisect
import functools
import itertools
import re
from collections.abc import Callable, Sequence

from longbow.rag.types import Chunk, Document

# (start, end) character spans of a text's tokens; how a chunker measures length.
TokenSpans = Callable[[str], list[tuple[int, int]]]
_WORD = re.compile(r"\S+")


def word_spans(text: str) -> list[tuple[int, int]]:
    """Whitespace-separated words: the length measure when no model tokenizer is given."""
    return [m.span() for m in _WORD.finditer(text)]


class Chunker(abc.ABC):
    """Contract: `boundaries(text)` returns sorted cut offsets strictly inside (0, len(text)); `chunk()`
    turns them into chunks that tile the document exactly. Chunkers may be slow (a model per sentence)
    but are stateless between documents and safe to call from one thread at a time."""

    name: str = ""

    @abc.abstractmethod
    def boundaries(self, text: str) -> list[int]:
        """Character offsets where a new chunk starts (excluding 0 and len(text))."""

    def chunk(self, document: Document, content_hash: str = "") -> list[Chunk]:
        return chunks_from_boundaries(document, self.boundaries(document.text), content_hash)


def chunks_from_boundaries(document: Document, boundaries: Sequence[int], content_hash: str = "") -> list[Chunk]:
    """Chunks of `document` cut at `boundaries`; ids are `<document_id>#<hash8>:<index>` so a citation names
    the version of the document it came from."""
    text = document.text
    cuts = [0, *sorted({b for b in boundaries if 0 < b < len(text)}), len(text)]
    tag = f"#{content_hash[:8]}" if content_hash else ""
    return [Chunk(f"{document.document_id}{tag}:{i}", document.document_id, text[start:end], start, end,
                  dict(document.metadata))
            for i, (start, end) in enumerate(itertools.pairwise(cuts)) if end > start]


@functools.lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentences as (start, end) spans that tile `text` exactly (trailing whitespace stays with its sentence)."""
    if not text.strip():
        return [(0, len(text))] if text else []
    starts, position = [0], 0
    for sentence in _segmenter().segment(text):
        # NOTE: pysbd with clean=False almost always returns pieces that concatenate to the text, but not
        # for every input; locating each stripped sentence keeps spans exact either way.
        found = text.find(sentence.strip(), position)
        if found < 0:
            continue
        if found > starts[-1]:
            starts.append(found)
        position = found + len(sentence.strip())
    return [(a, b) for a, b in zip(starts, [*starts[1:], len(text)]) if b > a]


def token_counts(token_spans: list[tuple[int, int]], pieces: list[tuple[int, int]]) -> list[int]:
    """For each (start, end) piece, the tokens whose span starts inside it."""
    token_starts = [s for s, _ in token_spans]
    return [bisect.bisect_left(token_starts, end) - bisect.bisect_left(token_starts, start) for start, end in pieces]


def merge_to_target(pieces: list[tuple[int, int]], lengths: list[int], target: int) -> list[int]:
    """Greedy merge of consecutive pieces while the merged length stays <= target; returns the start
    offsets of the merged chunks after the first. A piece longer than target stays whole."""
    cuts, current = [], 0
    for (start, _), length in zip(pieces, lengths):
        if current and current + length > target:
            cuts.append(start)
            current = 0
        current += length
    return cuts
