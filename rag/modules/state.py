"""What a running flow carries from module to module: the question, the retriever and LM, the context
hits, the committed answer text, routing decisions, counters and the trace."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from longbow.rag.lm import LM
from longbow.rag.types import Hit, Retriever


@dataclass(frozen=True)
class FlowSettings:
    """Per-call options from run_flow. max_tokens bounds the committed answer over all rounds;
    max_context_hits bounds the documents kept in the prompt across rounds; prompt names the prompt shape."""

    top_k: int = 5
    filters: dict[str, str] | None = None
    max_tokens: int = 128
    on_text: Callable[[str], None] | None = None
    max_context_hits: int = 10
    prompt: str = "phrase"  # a name in rag.modules.generation.PROMPTS


@dataclass
class Usage:
    """Counters shared by a state and its branches."""

    retrieval_rounds: int = 0  # retrieve steps run (one step may send several queries)
    retrievals: int = 0  # retriever calls
    lm_calls: int = 0  # generate / scoring calls
    generated_tokens: int = 0  # every generated token, kept or thrown away
    committed_tokens: int = 0  # tokens of the answer


@dataclass
class TraceEvent:
    step: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pending:
    """A tentative sentence (FLARE look-ahead) not yet part of the answer."""

    text: str
    token_count: int
    min_probability: float
    masked_query: str
    ends_answer: bool


@dataclass
class FlowState:
    question: str
    retriever: Retriever
    lm: LM
    settings: FlowSettings
    queries: list[str] = field(default_factory=list)
    retrieved: list[list[Hit]] = field(default_factory=list)  # one hit list per query of the last retrieve
    hits: list[Hit] = field(default_factory=list)  # the documents in the prompt, oldest first
    answer: str = ""  # committed text: only ever appended to, and streamed as it is
    finished: bool = False
    pending: Pending | None = None
    decision: str = ""  # the last answer of a decision module (routers and loop judges)
    usage: Usage = field(default_factory=Usage)
    trace: list[TraceEvent] = field(default_factory=list)

    def record(self, step: str, **detail: Any) -> None:
        self.trace.append(TraceEvent(step, detail))

    def commit(self, text: str, token_count: int, stream: bool = True) -> None:
        """Append text to the answer (streamed unless the caller already streamed it)."""
        self.answer += text
        self.usage.committed_tokens += token_count
        if stream and text and self.settings.on_text:
            self.settings.on_text(text)

    @property
    def tokens_left(self) -> int:
        return max(0, self.settings.max_tokens - self.usage.committed_tokens)
