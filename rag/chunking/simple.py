"""The two baselines: fixed-size chunks of N tokens, and sentence chunks (whole sentences packed up to N
tokens). Length is counted with the model tokenizer's spans when given, else whitespace words."""

from __future__ import annotations

from longbow.rag.chunking.base import Chunker, TokenSpans, merge_to_target, sentence_spans, token_counts, word_spans


class FixedSizeChunker(Chunker):
    """Cuts every `target_tokens` tokens, at the start of the next token (never inside a token)."""

    name = "fixed"

    def __init__(self, target_tokens: int = 128, token_spans: TokenSpans | None = None):
        if target_tokens < 1:
            raise ValueError("target_tokens must be >= 1")
        self.target_tokens, self.token_spans = target_tokens, token_spans or word_spans

    def boundaries(self, text: str) -> list[int]:
        spans = self.token_spans(text)
        return [spans[i][0] for i in range(self.target_tokens, len(spans), self.target_tokens)]


class SentenceChunker(Chunker):
    """Consecutive whole sentences (pysbd), greedily packed while the chunk stays <= target_tokens."""

    name = "sentence"

    def __init__(self, target_tokens: int = 128, token_spans: TokenSpans | None = None):
        if target_tokens < 1:
            raise ValueError("target_tokens must be >= 1")
        self.target_tokens, self.token_spans = target_tokens, token_spans or word_spans

    def boundaries(self, text: str) -> list[int]:
        sentences = sentence_spans(text)
        return merge_to_target(sentences, token_counts(self.token_spans(text), sentences), self.target_tokens)
