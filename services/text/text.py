"""Text in and out of the token-id engine: chat templates, incremental detokenization, stop strings.

The engine never sees text. This layer, used by the gateway and the CLI, encodes prompts with the
checkpoint's own tokenizer and chat template, turns token streams into text deltas that never split a
multi-byte character, and ends a request as soon as a stop string appears (the stop string itself is
not returned).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from longbow.services.engine.engine import AsyncLLMEngine
from longbow.services.engine.errors import InvalidRequestError
from longbow.services.engine.types import FinishReason, Request, SamplingParams, TokenEvent


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat (role/content dicts) with the generation prompt appended."""
    for message in messages:
        if set(message) - {"role", "content"} or message.get("role") not in {"system", "user", "assistant"}:
            raise InvalidRequestError("each message needs a role (system, user, assistant) and content")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


class IncrementalDetokenizer:
    """Decodes a growing token list into text deltas. A delta is held back while it ends in an
    incomplete UTF-8 sequence (decoded as U+FFFD), so every emitted delta is final."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip)
        if full.endswith("\ufffd"):
            return ""
        delta, self.text = full[len(self.text):], full
        return delta


class StopStringMatcher:
    """Finds the first stop string in a stream of text deltas; holds back text that could be the
    start of a stop string so nothing after a stop is ever emitted."""

    def __init__(self, stops: list[str]):
        if any(not s for s in stops):
            raise InvalidRequestError("stop strings must be non-empty")
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text safe to emit now."""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((self._partial_suffix(s) for s in self.stops), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _partial_suffix(self, stop: str) -> int:
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:n]):
                return n
        return 0


@dataclass
class TextDelta:
    text: str
    event: TokenEvent


async def stream_text(
    engine: AsyncLLMEngine, tokenizer, request: Request, stop: list[str] = ()
) -> AsyncIterator[TextDelta]:
    """Stream a request as text deltas; a stop string finishes it with reason STOP."""
    detokenizer, matcher = IncrementalDetokenizer(tokenizer), StopStringMatcher(list(stop))
    stream = engine.stream(request)
    try:
        async for event in stream:
            text = matcher.feed(detokenizer.push(event.token_id)) if event.token_id is not None else ""
            if matcher.stopped:
                event.finished, event.reason = True, FinishReason.STOP
                yield TextDelta(text, event)
                return  # leaving the stream aborts the request in the engine
            if event.finished:
                text += matcher.flush()
            yield TextDelta(text, event)
    finally:
        await stream.aclose()


async def generate_text(engine: AsyncLLMEngine, tokenizer, prompt: str, params: SamplingParams,
                        stop: list[str] = (), request_id: str = "text") -> tuple[str, FinishReason | None]:
    ids = tokenizer(prompt).input_ids
    parts, reason = [], None
    async with contextlib.aclosing(stream_text(engine, tokenizer, Request(request_id, ids, params), stop)) as deltas:
        async for delta in deltas:
            parts.append(delta.text)
            reason = delta.event.reason or reason
    return "".join(parts), reason
