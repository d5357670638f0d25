"""`rag.lm.LM` over the engine: `EngineLM` drives a synchronous `LLMEngine` (tests, scripts, benchmarks);
`AsyncEngineLM` submits to the gateway's `AsyncLLMEngine` from worker threads, so RAG work shares the
engine's batches with every other request. `EngineLM.for_scoring` builds the embedded scorer's engine in
`rag.scoring_dtype` (bfloat16 where the hardware multiplies it natively)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading

import torch

from longbow.rag.lm import LM, LMGeneration
from longbow.services.config import LongbowConfig, load_config
from longbow.services.engine.engine import AsyncLLMEngine, Completion, LLMEngine
from longbow.services.text.text import IncrementalDetokenizer, StopStringMatcher, encode_chat, stream_text
from longbow.services.engine.types import FinishReason, Request, SamplingParams
from longbow.services.engine.weights import load_tokenizer, pick_device_dtype


# Scoring requests submitted together by token_logprobs_many: enough to fill a CPU step (512 tokens) or a
# GPU step (2048) several times over, few enough that the KV they hold stays small (16 x 512 tokens).
SCORE_GROUP = 16

SCORING_DTYPES = ("auto", "model", "float32", "bfloat16")


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a CUDA GPU that supports it without emulation
    (Ampere and later), or a CPU with AVX512-BF16 or AMX tiles."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    # NOTE: oneDNN's "bf16 supported" (torch.ops.mkldnn._is_mkldnn_bf16_supported) holds on any AVX512 core,
    # where bf16 is emulated; torch.cpu's instruction-set checks are private, hence getattr.
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def scoring_dtype(config: LongbowConfig) -> str:
    """`rag.scoring_dtype` resolved to a `model.dtype` value. NOTE: auto picks bfloat16 where it is native
    because Meta-Chunking compares neighbouring sentences' NLLs, which bf16 barely moves, and scores 1.5-1.6x
    faster (AVX512-BF16 CPU, 100k tokens: per-sentence mean NLL 0.012 nats from float32 on average, 99.4%
    of boundaries shared; docs/bench_rag.md section 5, tests/rag/test_scoring_dtype.py)."""
    choice = config.rag.scoring_dtype
    if choice not in SCORING_DTYPES:
        raise ValueError(f"rag.scoring_dtype must be one of {', '.join(SCORING_DTYPES)}, got {choice!r}")
    if choice == "model":
        return config.model.dtype
    if choice != "auto":
        return choice
    device, _ = pick_device_dtype(config.model)
    return "bfloat16" if native_bfloat16(device) else config.model.dtype


def scoring_config(config: LongbowConfig) -> LongbowConfig:
    """`config` with the model loaded in the scoring dtype: the embedded scorer's engine."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=scoring_dtype(config)))


class _TokenizerMixin:
    tokenizer = None

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded.input_ids), [tuple(span) for span in encoded.offset_mapping]

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)


def _params(max_tokens: int, temperature: float, return_attention: bool) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, return_attention=return_attention)


def _to_generation(completion: Completion, text: str, reason: str) -> LMGeneration:
    return LMGeneration(completion.token_ids, text, completion.logprobs, completion.entropies,
                        completion.attention, reason)


class EngineLM(_TokenizerMixin, LM):
    """The in-process synchronous engine. Not thread-safe (neither is LLMEngine)."""

    def __init__(self, engine: LLMEngine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_context = engine.max_model_len

    @classmethod
    def from_config(cls, config: LongbowConfig | None = None) -> "EngineLM":
        """A fresh engine on the configured (default: bundled) model, with its tokenizer (CLI, benchmarks)."""
        engine = LLMEngine(config or load_config())
        return cls(engine, load_tokenizer(engine.loaded.checkpoint))

    @classmethod
    def for_scoring(cls, config: LongbowConfig | None = None) -> "EngineLM":
        """A fresh engine in `rag.scoring_dtype`, for the chunkers that score text (perplexity, margin)."""
        return cls.from_config(scoring_config(config or load_config()))

    def token_logprobs(self, token_ids: list[int]) -> list[float]:
        return self.engine.score(token_ids)

    def token_logprobs_many(self, sequences: list[list[int]]) -> list[list[float]]:
        """All sequences in engine.generate calls of SCORE_GROUP: the scheduler batches them."""
        params, out = SamplingParams(max_tokens=0, prompt_logprobs=True), []
        for start in range(0, len(sequences), SCORE_GROUP):
            group = [list(ids) for ids in sequences[start:start + SCORE_GROUP]]
            out.extend(c.prompt_logprobs or [] for c in self.engine.generate(group, params))
        return out

    def generate(self, prompt_ids, *, max_tokens, stop=None, temperature=0.0, return_attention=False, on_text=None):
        emit = on_text or (lambda text: None)
        rid = self.engine.new_request_id()
        self.engine.add_request(Request(rid, list(prompt_ids), _params(max_tokens, temperature, return_attention)))
        completion, detok, matcher = Completion(rid), IncrementalDetokenizer(self.tokenizer), StopStringMatcher(stop or [])
        text = ""
        while completion.finish_reason is None:
            for event in self.engine.step():
                if event.id != rid:
                    continue
                completion.add(event)
                delta = matcher.feed(detok.push(event.token_id)) if event.token_id is not None else ""
                if matcher.stopped and completion.finish_reason is None:
                    self.engine.abort(rid)
                    completion.finish_reason = FinishReason.STOP
                elif completion.finish_reason is not None:
                    delta += matcher.flush()
                if delta:
                    emit(delta)
                    text += delta
        return _to_generation(completion, text, completion.finish_reason.value)


class AsyncEngineLM(_TokenizerMixin, LM):
    """The gateway's engine, called synchronously from threads other than the event loop's."""

    def __init__(self, engine: AsyncLLMEngine, tokenizer, loop: asyncio.AbstractEventLoop):
        self.engine, self.tokenizer, self.loop = engine, tokenizer, loop
        self.max_context = engine.engine.max_model_len
        self._ids = iter(range(1 << 62))
        self._lock = threading.Lock()

    def _request_id(self) -> str:
        with self._lock:
            return f"rag-{next(self._ids)}"

    def _run(self, coroutine):
        if threading.get_ident() == getattr(self.loop, "_thread_id", None):
            coroutine.close()
            raise RuntimeError("AsyncEngineLM must be called from a worker thread, not the event loop")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def token_logprobs(self, token_ids: list[int]) -> list[float]:
        request = Request(self._request_id(), list(token_ids), SamplingParams(max_tokens=0, prompt_logprobs=True))
        return self._run(self.engine.generate(request)).prompt_logprobs or []

    def token_logprobs_many(self, sequences: list[list[int]]) -> list[list[float]]:
        """SCORE_GROUP requests in flight at a time, so they share the engine's batches (and other users'
        requests still get their turn between groups)."""
        out = []
        for start in range(0, len(sequences), SCORE_GROUP):
            out.extend(self._run(self._score_group(sequences[start:start + SCORE_GROUP])))
        return out

    async def _score_group(self, sequences: list[list[int]]) -> list[list[float]]:
        params = SamplingParams(max_tokens=0, prompt_logprobs=True)
        requests = [Request(self._request_id(), list(ids), params) for ids in sequences]
        done = await asyncio.gather(*(self.engine.generate(r) for r in requests))
        return [c.prompt_logprobs or [] for c in done]

    def generate(self, prompt_ids, *, max_tokens, stop=None, temperature=0.0, return_attention=False, on_text=None):
        request = Request(self._request_id(), list(prompt_ids), _params(max_tokens, temperature, return_attention))
        return self._run(self._generate(request, stop or [], on_text))

    async def _generate(self, request: Request, stop: list[str], on_text) -> LMGeneration:
        completion, parts = Completion(request.id), []
        async with contextlib.aclosing(stream_text(self.engine, self.tokenizer, request, stop)) as deltas:
            async for delta in deltas:
                completion.add(delta.event)
                parts.append(delta.text)
                if on_text and delta.text:
                    on_text(delta.text)  # NOTE: runs on the event loop thread; keep it cheap (a queue put)
        reason = completion.finish_reason.value if completion.finish_reason else ""
        return _to_generation(completion, "".join(parts), reason)


def load_token_spans(config: LongbowConfig | None = None):
    """`TokenSpans` of the configured model's tokenizer, loaded without building an engine (no weights,
    no KV cache): how the CLI and scripts measure chunk length in model tokens for every chunker."""
    from tokenizers import Tokenizer

    from longbow.services.engine.weights import resolve_checkpoint

    checkpoint = resolve_checkpoint((config or load_config()).model.name_or_path)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokenizer.no_truncation()
    # add_special_tokens=False: the same spans as LM.tokenize_with_offsets, without BOS/EOS.
    return lambda text: [tuple(span) for span in tokenizer.encode(text, add_special_tokens=False).offsets]
