"""Protobuf <-> domain objects. The only module (with handlers.py) that touches generated code."""

from __future__ import annotations

import math

from longbow.v1 import generation_pb2 as gen_pb
from longbow.services.engine.errors import InvalidRequestError
from longbow.services.engine.types import FinishReason, SamplingParams
from longbow.services.gateway.generation import GenerationInput, GenerationResult

_MAX_U32 = 2**32 - 1
_FINISH = {
    FinishReason.LENGTH: gen_pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: gen_pb.FINISH_REASON_STOP,
    FinishReason.ABORT: gen_pb.FINISH_REASON_ABORT,
    None: gen_pb.FINISH_REASON_UNSPECIFIED,
}


def sampling_from_pb(options: gen_pb.SamplingOptions, default_max_tokens: int) -> SamplingParams:
    if not math.isfinite(options.temperature) or not math.isfinite(options.top_p):
        raise InvalidRequestError("temperature and top_p must be finite numbers")
    return SamplingParams(
        max_tokens=options.max_tokens or default_max_tokens,
        min_tokens=options.min_tokens,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p or 1.0,
        seed=options.seed if options.HasField("seed") else None,
        stop_token_ids=tuple(options.stop_token_ids),
        ignore_eos=options.ignore_eos,
        logprobs=options.logprobs,
    )


def generate_from_pb(request: gen_pb.GenerateRequest, default_max_tokens: int) -> GenerationInput:
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("request has no input: set prompt, chat or token_ids")
    return GenerationInput(
        prompt=request.prompt if which == "prompt" else None,
        chat=[{"role": m.role, "content": m.content} for m in request.chat.messages] if which == "chat" else None,
        token_ids=list(request.token_ids.ids) if which == "token_ids" else None,
        params=sampling_from_pb(request.sampling, default_max_tokens),
        stop=list(request.sampling.stop),
        request_id=request.request_id[:128],
    )


def tokens_to_pb(ids, logprobs, entropies, wanted: bool) -> list[gen_pb.TokenInfo]:
    if not wanted:
        return []
    return [gen_pb.TokenInfo(token_id=i, logprob=lp, entropy=h) for i, lp, h in zip(ids, logprobs, entropies)]


def usage_to_pb(result: GenerationResult) -> gen_pb.Usage:
    return gen_pb.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids),
                        time_to_first_token_s=result.ttft_s)


def result_to_pb(result: GenerationResult, logprobs: bool) -> gen_pb.GenerateResponse:
    return gen_pb.GenerateResponse(
        request_id=result.request_id, text=result.text, token_ids=result.token_ids,
        tokens=tokens_to_pb(result.token_ids, result.logprobs, result.entropies, logprobs),
        finish_reason=_FINISH[result.finish_reason], usage=usage_to_pb(result),
    )


def chunk_to_pb(text: str, event, result: GenerationResult, logprobs: bool) -> gen_pb.GenerateChunk:
    ids = [event.token_id] if event.token_id is not None else []
    chunk = gen_pb.GenerateChunk(
        request_id=result.request_id, text=text, token_ids=ids,
        tokens=tokens_to_pb(ids, [event.logprob], [event.entropy], logprobs and bool(ids)),
        finish_reason=_FINISH[event.reason if event.finished else None],
    )
    if event.finished:
        chunk.usage.CopyFrom(usage_to_pb(result))
    return chunk
