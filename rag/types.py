"""Types shared across rag/: documents, chunks, retrieval hits, and the Retriever plug point."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    document_id: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    """A piece of a document: text == document.text[char_start:char_end]."""

    chunk_id: str
    document_id: str
    text: str
    char_start: int
    char_end: int
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk with its score (higher is better) — a citation."""

    chunk: Chunk
    score: float


@dataclass(frozen=True)
class DocumentHit:
    """A retrieved document: its fused score and its best chunks as evidence (best first, each a citation)."""

    document_id: str
    score: float
    hits: list[Hit]


class Retriever(abc.ABC):
    """Contract: at most top_k hits, best first; every hit's chunk metadata contains all `filters`
    key/value pairs; an empty store gives []."""

    @abc.abstractmethod
    def retrieve(self, query: str, top_k: int = 5, filters: dict[str, str] | None = None) -> list[Hit]:
        ...
