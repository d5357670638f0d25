"""Typed messages that cross the engine's boundaries. No torch here.

gateway -> engine: `Request`; engine -> gateway: `TokenEvent`s. scheduler -> worker: `StepPlan`;
worker -> scheduler: `StepResult`. The engine speaks token ids, never text.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from longbow.services.engine.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature == 0 means greedy."""

    max_tokens: int = 64
    min_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # per generated token logprob + entropy (always computed; kept for the API)
    prompt_logprobs: bool = False  # logprob of every prompt token given its prefix (score())
    return_attention: bool = False  # last-layer attention row of each generated token (DRAGIN)

    def validate(self, vocab_size: int) -> None:
        checks = [
            (self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            (0 <= self.min_tokens <= self.max_tokens, f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"),
            (math.isfinite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (math.isfinite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (all(0 <= t < vocab_size for t in self.stop_token_ids), "stop_token_ids out of vocabulary range"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)


@dataclass
class Request:
    """One generation request as the engine sees it."""

    id: str
    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # eos or a stop token
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the worker failed
    REFUSED = "refused"  # never admitted: the KV it needs is held outside requests (CapacityError)


@dataclass
class TokenEvent:
    """One step of one request's output stream. `token_id` is None on events that carry no token
    (an abort, or the end of a max_tokens=0 scoring request)."""

    id: str
    token_id: int | None
    logprob: float | None = None
    entropy: float | None = None
    attention: list[float] | None = None  # last-layer attention over the request's positions 0..n-1
    prompt_logprobs: list[float] | None = None  # only on the first event when asked for
    finished: bool = False
    reason: FinishReason | None = None
    error: str | None = None  # why, when reason is ERROR (a lost shard: retriable)


@dataclass(frozen=True)
class ScheduledChunk:
    """The tokens of one request computed in one forward pass.

    `slots` are flat KV slots (block_id * block_size + offset) where the new tokens' K/V go;
    `block_table` lists every block holding this request's KV after the step, `kv_len` tokens in all.
    """

    request_id: str
    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    block_table: list[int]
    kv_len: int
    sample: bool  # the chunk ends at the last known token: sample the next one
    num_generated: int  # output tokens so far (the sampler enforces min_tokens with it)
    shard: int = 0  # the shard holding the chunk's last token (it produces the logits to sample)
    next_token_id: int | None = None  # the known token after the chunk, for prompt logprobs
    prompt_logprobs: bool = False  # return the logprob of every token of the chunk given its prefix
    return_attention: bool = False  # return the last-layer attention row of the sampled position
    # Global slots of every key the chunk may see (its own new ones included), when they are not simply
    # the first kv_len positions of block_table: an edited document (PIE) whose tokens sit anywhere.
    kv_slots: tuple[int, ...] | None = None
    # Return the last row's logits (StepResult.logits) instead of sampling: a document pass whose job picks
    # its tokens itself (jobs.py). Set together with `sample`, so the row's logits are computed.
    want_logits: bool = False
    # The explicit kv_slots hold positions 0..len-1 in list order (a document's invariant: its token k sits
    # at position k), so attention may take the index-order fast path instead of masks by position id.
    kv_in_order: bool = False


@dataclass(frozen=True)
class StepPlan:
    """One forward pass. Sampling parameters travel once: in the first plan after a request arrives
    (`new_requests`, seed always set), and its id in `finished` of the first plan after it ends, so the
    executor keeps per-request sampling state without a second registry to keep in sync."""

    chunks: list[ScheduledChunk]
    preempted: list[str] = field(default_factory=list)
    new_requests: dict[str, SamplingParams] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)  # finished or aborted since the previous plan

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    entropy: float
    attention: list[float] | None = None


@dataclass
class StepResult:
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    # request id -> logprobs of the chunk's tokens given their prefixes (first prompt token excluded)
    prompt_logprobs: dict[str, list[float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # request id -> why it alone failed this step
    # chunk id -> last-row logits [V] of chunks with `want_logits` (a tensor on the executor's device)
    logits: dict[str, Any] = field(default_factory=dict)
