"""Sync and asyncio clients for the Longbow gateway, with typed results.

Only grpcio and protobuf are needed. UNAVAILABLE is retried with exponential backoff (a restarting
replica; `retry=RetryPolicy(...)` tunes it, `retry=None` turns it off); every other error surfaces as
`LongbowError` carrying the gRPC status code. Streaming generation is an iterator; breaking out of it
cancels the call, which aborts generation on the server. A stream answered UNAVAILABLE before its first
chunk is retried like a unary call; after its first chunk it never is (a retry would repeat output).

Several gateways: a target that can name several addresses (`dns:///longbow-gateway-headless:50051`, the
Kubernetes headless Service, or `ipv4:10.0.0.1:50051,10.0.0.2:50051`) gets gRPC's `round_robin` policy, so
calls spread over every ready replica instead of sticking to the first connection; `load_balancing=` picks
another policy. Edit sessions live in one replica, so session calls go over a second channel that stays
on one replica (`pick_first` over the same addresses, shuffled per client so clients spread out).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc

from longbow.v1 import generation_pb2 as gen_pb
from longbow.v1 import generation_pb2_grpc, server_info_pb2, server_info_pb2_grpc
from longbow.services.client.errors import LongbowError
from longbow.services.client.code_assist import AsyncCodeAssistCalls, CodeAssistCalls
from longbow.services.client.retrieval import AsyncRetrievalCalls, RetrievalCalls
from longbow.services.client.sessions import AsyncSessionCalls, Edit, EditResult, SessionCalls  # noqa: F401 (re-exported)

_FINISH = {gen_pb.FINISH_REASON_LENGTH: "length", gen_pb.FINISH_REASON_STOP: "stop",
           gen_pb.FINISH_REASON_ABORT: "abort", gen_pb.FINISH_REASON_UNSPECIFIED: None}


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    request_id: str = ""
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)


@dataclass
class GenerationChunk:
    """A streamed piece. The last one (finish_reason set) also carries the usage and request id."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    request_id: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    """How a call answered UNAVAILABLE is retried: `attempts` calls in all (1: no retries), waiting
    initial_backoff_s before the second, doubling up to max_backoff_s, each wait scaled by a jitter
    in [0.5, 1.5). Clients take `retry=DEFAULT_RETRY`; `retry=None` means no retries."""

    attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"attempts counts calls, so it is at least 1 (1 = no retries), not {self.attempts}")

    def delays(self, uniform: Callable[[], float] = random.random) -> Iterator[float]:
        """The waits before retries 1 .. attempts-1; `uniform` draws the jitter (tests pass a constant)."""
        delay = self.initial_backoff_s
        for _ in range(self.attempts - 1):
            yield delay * (0.5 + uniform())  # jitter so replicas are not hit in lockstep
            delay = min(delay * 2, self.max_backoff_s)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)


def build_request(prompt=None, *, messages=None, token_ids=None, max_tokens=0, temperature=0.0, top_p=0.0,
                  top_k=0, seed=None, stop=(), stop_token_ids=(), min_tokens=0, logprobs=False,
                  ignore_eos=False, request_id="") -> gen_pb.GenerateRequest:
    sampling = gen_pb.SamplingOptions(max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature,
                                      top_p=top_p, top_k=top_k, stop=list(stop), stop_token_ids=list(stop_token_ids),
                                      logprobs=logprobs, ignore_eos=ignore_eos)
    if seed is not None:
        sampling.seed = seed
    request = gen_pb.GenerateRequest(sampling=sampling, request_id=request_id)
    if messages is not None:
        request.chat.messages.extend(gen_pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    else:
        request.prompt = prompt if prompt is not None else ""
    return request


def _generation(r: gen_pb.GenerateResponse) -> Generation:
    return Generation(r.text, list(r.token_ids), _FINISH[r.finish_reason], r.usage.prompt_tokens,
                      r.usage.completion_tokens, r.usage.time_to_first_token_s, r.request_id,
                      [t.logprob for t in r.tokens], [t.entropy for t in r.tokens])


def _chunk(c: gen_pb.GenerateChunk) -> GenerationChunk:
    return GenerationChunk(c.text, list(c.token_ids), _FINISH[c.finish_reason], [t.logprob for t in c.tokens],
                           c.usage.prompt_tokens, c.usage.completion_tokens, c.request_id)


# Target schemes whose resolver may return several addresses (gRPC naming: dns, ipv4/ipv6 address lists).
_MULTI_ADDRESS_SCHEMES = ("dns:", "ipv4:", "ipv6:")
# One replica for every session call of a client; shuffled so that clients do not all pick the first pod.
_PINNED = '{"loadBalancingConfig": [{"pick_first": {"shuffleAddressList": true}}]}'


def balancing_policy(target: str, load_balancing: str | None = None) -> str | None:
    """The gRPC load-balancing policy a client uses for generation calls on `target`: `load_balancing` when
    given, else round_robin for targets that may name several replicas, else gRPC's default (pick_first)."""
    if load_balancing is not None:
        return load_balancing
    return "round_robin" if target.startswith(_MULTI_ADDRESS_SCHEMES) else None


def _open_channel(target: str, root_certificates: bytes | None, aio: bool, options: list[tuple[str, object]]):
    make = grpc.aio if aio else grpc
    if root_certificates is not None:
        return make.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=options)
    return make.insecure_channel(target, options=options)


def _open_channels(target: str, root_certificates: bytes | None, aio: bool, load_balancing: str | None):
    """(the channel for stateless calls, the channel for session calls): one channel when calls cannot
    spread over replicas anyway."""
    policy = balancing_policy(target, load_balancing)
    if policy in (None, "pick_first"):
        channel = _open_channel(target, root_certificates, aio, [])
        return channel, channel
    # NOTE: gRPC's reconnect backoff grows to 120 s by default; a replica restarted by a rolling update is
    # back within seconds and should get calls again within seconds, not minutes.
    balanced = _open_channel(target, root_certificates, aio, [("grpc.lb_policy_name", policy),
                                                               ("grpc.max_reconnect_backoff_ms", 2000)])
    pinned = _open_channel(target, root_certificates, aio, [("grpc.service_config", _PINNED)])
    return balanced, pinned


def _retry_delay(exc: grpc.RpcError, delays: Iterator[float]) -> float | None:
    """The wait before retrying a failed call, None when it must not be retried."""
    return next(delays, None) if exc.code() == grpc.StatusCode.UNAVAILABLE else None


class LongbowClient(RetrievalCalls, CodeAssistCalls, SessionCalls):
    """Blocking client. `with LongbowClient("host:port") as c: c.generate("Hi")`.
    `LongbowClient("dns:///longbow-gateway-headless.longbow:50051")` balances over every pod (round_robin)."""

    def __init__(self, target: str = "localhost:50051", *, token: str = "", root_certificates: bytes | None = None,
                 timeout_s: float | None = 120.0, retry: RetryPolicy | None = DEFAULT_RETRY,
                 load_balancing: str | None = None):
        self._channel, self._session_channel = _open_channels(target, root_certificates, False, load_balancing)
        self._generation = generation_pb2_grpc.GenerationStub(self._channel)
        self._info = server_info_pb2_grpc.ServerInfoServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s, self.retry = timeout_s, NO_RETRY if retry is None else retry

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._channel.close()
        self._session_channel.close()

    def generate(self, prompt: str | None = None, **kwargs) -> Generation:
        request = build_request(prompt, **kwargs)
        return _generation(self._call(self._generation.Generate, request))

    def generate_stream(self, prompt: str | None = None, **kwargs) -> Iterator[GenerationChunk]:
        request, delays = build_request(prompt, **kwargs), self.retry.delays()
        while True:
            call = self._generation.GenerateStream(request, timeout=self.timeout_s, metadata=self._metadata)
            produced = False
            try:
                for chunk in call:
                    produced = True
                    yield _chunk(chunk)
                return
            except grpc.RpcError as exc:
                # NOTE: never after the first chunk: the caller has used it, and a retry would repeat it.
                delay = None if produced else _retry_delay(exc, delays)
                if delay is None:
                    raise LongbowError(exc.code(), exc.details()) from None
            finally:
                call.cancel()  # no-op when finished; aborts generation when the caller stopped early
            time.sleep(delay)

    def score(self, text: str | None = None, token_ids: list[int] | None = None) -> tuple[list[int], list[float]]:
        request = gen_pb.ScoreRequest(text=text) if token_ids is None else gen_pb.ScoreRequest(
            token_ids=gen_pb.TokenIds(ids=token_ids))
        response = self._call(self._generation.Score, request)
        return list(response.token_ids), list(response.logprobs)

    def tokenize(self, text: str, chat: bool = False) -> list[int]:
        return list(self._call(self._generation.Tokenize, gen_pb.TokenizeRequest(text=text, chat=chat)).token_ids)

    def server_info(self) -> server_info_pb2.ServerInfo:
        return self._call(self._info.GetServerInfo, server_info_pb2.GetServerInfoRequest())

    def _call(self, method, request):
        delays = self.retry.delays()
        while True:
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                delay = _retry_delay(exc, delays)
                if delay is None:
                    raise LongbowError(exc.code(), exc.details()) from None
                time.sleep(delay)


class AsyncLongbowClient(AsyncRetrievalCalls, AsyncCodeAssistCalls, AsyncSessionCalls):
    """asyncio client with the same methods as LongbowClient (awaitable / async iterators)."""

    def __init__(self, target: str = "localhost:50051", *, token: str = "", root_certificates: bytes | None = None,
                 timeout_s: float | None = 120.0, retry: RetryPolicy | None = DEFAULT_RETRY,
                 load_balancing: str | None = None):
        self._channel, self._session_channel = _open_channels(target, root_certificates, True, load_balancing)
        self._generation = generation_pb2_grpc.GenerationStub(self._channel)
        self._info = server_info_pb2_grpc.ServerInfoServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s, self.retry = timeout_s, NO_RETRY if retry is None else retry

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self._channel.close()
        await self._session_channel.close()

    async def generate(self, prompt: str | None = None, **kwargs) -> Generation:
        return _generation(await self._call(self._generation.Generate, build_request(prompt, **kwargs)))

    async def generate_stream(self, prompt: str | None = None, **kwargs) -> AsyncIterator[GenerationChunk]:
        request, delays = build_request(prompt, **kwargs), self.retry.delays()
        while True:
            call = self._generation.GenerateStream(request, timeout=self.timeout_s, metadata=self._metadata)
            produced = False
            try:
                async for chunk in call:
                    produced = True
                    yield _chunk(chunk)
                return
            except grpc.RpcError as exc:
                delay = None if produced else _retry_delay(exc, delays)  # never repeat output (see LongbowClient)
                if delay is None:
                    raise LongbowError(exc.code(), exc.details()) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def score(self, text: str | None = None, token_ids: list[int] | None = None):
        request = gen_pb.ScoreRequest(text=text) if token_ids is None else gen_pb.ScoreRequest(
            token_ids=gen_pb.TokenIds(ids=token_ids))
        response = await self._call(self._generation.Score, request)
        return list(response.token_ids), list(response.logprobs)

    async def tokenize(self, text: str, chat: bool = False) -> list[int]:
        response = await self._call(self._generation.Tokenize, gen_pb.TokenizeRequest(text=text, chat=chat))
        return list(response.token_ids)

    async def server_info(self) -> server_info_pb2.ServerInfo:
        return await self._call(self._info.GetServerInfo, server_info_pb2.GetServerInfoRequest())

    async def _call(self, method, request):
        delays = self.retry.delays()
        while True:
            try:
                return await method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                delay = _retry_delay(exc, delays)
                if delay is None:
                    raise LongbowError(exc.code(), exc.details()) from None
                await asyncio.sleep(delay)
