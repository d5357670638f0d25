"""The one interface rag/ uses to reach a language model.

Implementations live outside rag/: `services.text.lm.EngineLM` (the in-process engine, tests and
`longbow serve`), `services.text.lm.AsyncEngineLM` (the gateway's engine, called from worker threads)
and `services.client.lm.ClientLM` (a remote gateway through the SDK). rag/ code takes an `LM` argument and
never constructs one.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LMGeneration:
    """What one generate() call produced. attention[i] is the last-layer attention row of generated token
    i over every position before it (prompt + earlier generated tokens), averaged over heads; present only
    when return_attention was asked for."""

    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    attention: list[list[float]] = field(default_factory=list)
    finish_reason: str = ""


class LM(abc.ABC):
    """Contract: token ids are the model's own; `max_context` is the most tokens one call may hold
    (prompt + generated). Methods are synchronous and may be called from any thread."""

    max_context: int

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens, no chat template)."""

    @abc.abstractmethod
    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and, for each, the (start, end) character span of `text` it covers."""

    @abc.abstractmethod
    def detokenize(self, token_ids: list[int]) -> str:
        """Text of token ids, special tokens skipped."""

    @abc.abstractmethod
    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat (role/content dicts) ending with the assistant's generation prompt."""

    @abc.abstractmethod
    def token_logprobs(self, token_ids: list[int]) -> list[float]:
        """logprob of token i given tokens < i, for i >= 1: len(token_ids) - 1 values, one forward pass."""

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], *, max_tokens: int, stop: list[str] | None = None,
                 temperature: float = 0.0, return_attention: bool = False,
                 on_text: Callable[[str], None] | None = None) -> LMGeneration:
        """Continue prompt_ids. Greedy at temperature 0. Generation ends at EOS, max_tokens or a stop
        string (not included in `text`). on_text, when given, receives the text as it is produced
        (the deltas concatenate to `text`)."""

    def token_logprobs_many(self, sequences: list[list[int]]) -> list[list[float]]:
        """`token_logprobs` of several independent sequences, in order. Default: one after another;
        engine-backed LMs submit them together so the scheduler batches them."""
        return [self.token_logprobs(ids) for ids in sequences]

    def next_token_logprobs(self, prompt_ids: list[int], candidates: list[int]) -> list[float]:
        """logprob of each candidate token right after prompt_ids. Default: one scoring pass each."""
        return [self.token_logprobs([*prompt_ids, c])[-1] for c in candidates]
