"""The domain behind the Generation RPCs: text and chats in, text and token details out.

No protobuf here (convert.py does that). Bounds the number of calls in flight, records TTFT/TPOT, and
relies on the engine stream's cleanup so a cancelled or timed-out call frees its KV at once.

Tokenizing (up to `max_prompt_chars`) runs on a small thread pool of its own, never on the event loop:
a megabyte prompt takes over a second, and every other RPC would wait for it. Engine request ids are
always the server's (`gw-N`, `score-N`); a client's `request_id` is echoed back and appended for logs
(`gw-N:client-id`), so no client id can collide with another request's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from longbow.services.config import GatewayConfig
from longbow.services.engine.engine import AsyncLLMEngine
from longbow.services.engine.errors import CapacityError, InvalidRequestError
from longbow.services.text.text import TextDelta, encode_chat, stream_text
from longbow.services.engine.types import FinishReason, Request, SamplingParams
from longbow.services.gateway.metrics import GatewayMetrics


@dataclass
class GenerationInput:
    prompt: str | None = None
    chat: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    request_id: str = ""


@dataclass
class GenerationResult:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    ttft_s: float = 0.0


class GenerationService:
    def __init__(self, engine: AsyncLLMEngine, tokenizer, config: GatewayConfig, metrics: GatewayMetrics):
        self.engine, self.tokenizer, self.config, self.metrics = engine, tokenizer, config, metrics
        self._inflight = 0
        self._ids = itertools.count()
        # NOTE: 2 threads: tokenizing a large prompt is CPU-bound; more threads would only contend with the
        # engine's own thread for the same cores, and a flood of Tokenize calls queues here, not on the loop.
        self._cpu = ThreadPoolExecutor(max_workers=2, thread_name_prefix="longbow-tokenize")

    async def off_loop(self, function, *args):
        """Runs CPU-heavy handler work (tokenizing, decoding pieces) on the tokenizer pool."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, function, *args)

    def encode(self, request: GenerationInput) -> list[int]:
        given = [x is not None for x in (request.prompt, request.chat, request.token_ids)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt, chat or token_ids")
        if request.token_ids is not None:
            return list(request.token_ids)
        if request.chat is not None:
            if not request.chat:
                raise InvalidRequestError("chat has no messages")
            self._check_size(sum(len(m.get("content", "")) for m in request.chat))
            return encode_chat(self.tokenizer, request.chat)
        self._check_size(len(request.prompt))
        return self.tokenizer(request.prompt).input_ids

    async def stream(self, request: GenerationInput) -> AsyncIterator[tuple[TextDelta, GenerationResult]]:
        """Yields each text delta with the running result (usage filled as it goes)."""
        ids = await self.off_loop(self.encode, request)
        engine_id = f"gw-{next(self._ids)}" + (f":{request.request_id}" if request.request_id else "")
        result = GenerationResult(request.request_id or engine_id, prompt_tokens=len(ids))
        with self._slot():
            start = last = time.perf_counter()
            deltas = stream_text(self.engine, self.tokenizer, Request(engine_id, ids, request.params), request.stop)
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    now = time.perf_counter()
                    self._account(delta, result, now, start, last)
                    last = now
                    yield delta, result

    async def generate(self, request: GenerationInput) -> GenerationResult:
        result = None
        parts = []
        async with contextlib.aclosing(self.stream(request)) as stream:
            async for delta, result in stream:
                parts.append(delta.text)
        result.text = "".join(parts)
        return result

    async def score(self, text: str | None, token_ids: list[int] | None) -> tuple[list[int], list[float]]:
        ids = await self.off_loop(self.encode, GenerationInput(prompt=text, token_ids=token_ids))
        if len(ids) < 2:
            raise InvalidRequestError("scoring needs at least two tokens")
        params = SamplingParams(max_tokens=0, prompt_logprobs=True)
        with self._slot():
            completion = await self.engine.generate(Request(f"score-{next(self._ids)}", ids, params))
        return ids, completion.prompt_logprobs or []

    async def tokenize(self, text: str, chat: bool) -> tuple[list[int], list[str]]:
        self._check_size(len(text))
        return await self.off_loop(self._tokenize, text, chat)

    def _tokenize(self, text: str, chat: bool) -> tuple[list[int], list[str]]:
        ids = encode_chat(self.tokenizer, [{"role": "user", "content": text}]) if chat else self.tokenizer(text).input_ids
        return ids, [self.tokenizer.decode([i]) for i in ids]

    async def refresh_metrics(self) -> None:
        self.metrics.record_engine(await self.engine.call(lambda e: e.stats()))

    def _account(self, delta: TextDelta, result: GenerationResult, now: float, start: float, last: float) -> None:
        event = delta.event
        if event.token_id is not None:
            if not result.token_ids:
                result.ttft_s = now - start
                self.metrics.ttft.observe(result.ttft_s)
            else:
                self.metrics.tpot.observe(now - last)
            result.token_ids.append(event.token_id)
            result.logprobs.append(event.logprob)
            result.entropies.append(event.entropy)
            self.metrics.tokens.inc()
        if event.finished:
            result.finish_reason = event.reason

    def _check_size(self, chars: int) -> None:
        if chars > self.config.max_prompt_chars:
            raise InvalidRequestError(f"prompt of {chars} characters exceeds the limit of {self.config.max_prompt_chars}")

    @contextlib.contextmanager
    def _slot(self):
        if self._inflight >= self.config.max_inflight:
            raise CapacityError(f"server busy: {self._inflight} generation calls in flight")
        self._inflight += 1
        self.metrics.inflight.set(self._inflight)
        try:
            yield
        finally:
            self._inflight -= 1
            self.metrics.inflight.set(self._inflight)
