"""Chunkers: fixed-size and sentence baselines, and Meta-Chunking (perplexity, margin sampling).
`make_chunker(name, ...)` builds one by name; the model-based ones need an `LM`."""

from __future__ import annotations

from longbow.rag.chunking.base import Chunker, TokenSpans, chunks_from_boundaries, sentence_spans, word_spans
from longbow.rag.chunking.margin import MarginChunker
from longbow.rag.chunking.perplexity import PerplexityChunker, perplexity_boundaries
from longbow.rag.chunking.simple import FixedSizeChunker, SentenceChunker
from longbow.rag.lm import LM

CHUNKERS = ("fixed", "sentence", "perplexity", "margin")
DEFAULT_CHUNKER = "perplexity"  # the one default: Ingestor, ingest_paths, and RagConfig.default_chunker
DEFAULT_TARGET_TOKENS = 128


def lm_token_spans(lm: LM):
    """Token spans from the model's tokenizer, so every chunker measures length in the same tokens."""
    return lambda text: lm.tokenize_with_offsets(text)[1]


def make_chunker(name: str, target_tokens: int = DEFAULT_TARGET_TOKENS, lm: LM | None = None,
                 theta: float = 0.0, token_spans: TokenSpans | None = None) -> Chunker:
    """A chunker by name. fixed/sentence count the LM's tokens when `lm` is given, else `token_spans`
    (a tokenizer without the engine: `services.text.lm.load_token_spans`), else whitespace words."""
    if name not in CHUNKERS:
        raise ValueError(f"unknown chunker {name!r}; choose one of {', '.join(CHUNKERS)}")
    if name in ("perplexity", "margin") and lm is None:
        raise ValueError(f"the {name} chunker needs a language model")
    spans = lm_token_spans(lm) if lm is not None else token_spans
    if name == "fixed":
        return FixedSizeChunker(target_tokens, spans)
    if name == "sentence":
        return SentenceChunker(target_tokens, spans)
    if name == "perplexity":
        return PerplexityChunker(lm, target_tokens, theta)
    return MarginChunker(lm, target_tokens)


__all__ = ["CHUNKERS", "DEFAULT_CHUNKER", "Chunker", "FixedSizeChunker", "MarginChunker", "PerplexityChunker",
           "SentenceChunker", "TokenSpans", "chunks_from_boundaries", "make_chunker", "perplexity_boundaries",
           "sentence_spans", "word_spans"]
