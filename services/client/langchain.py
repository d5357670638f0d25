"""LangChain adapters over the Longbow SDK: `LongbowChatModel` (chat), `LongbowLLM` (text completion) and
`LongbowRetriever` (hybrid retrieval with citations in each Document's metadata).

Imports only langchain-core, grpcio, protobuf and the SDK (no torch), so it runs wherever the client does.
Each LangChain call is one Generate / GenerateStream call on the gateway; every streamed chunk becomes one
LangChain chunk and the last one carries the finish reason and the token usage. Errors are not
translated: a failed call raises the SDK's `LongbowError`, whose `.code` is the gRPC status code.

    chat = LongbowChatModel(target="localhost:50051", max_tokens=64)
    chat.invoke([SystemMessage("Be brief."), HumanMessage("Hi")]).usage_metadata
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForLLMRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document as LCDocument
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.language_models.llms import LLM
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from langchain_core.retrievers import BaseRetriever
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

from longbow.services.client.retrieval import Citation
from longbow.services.client.sdk import (
    AsyncLongbowClient,
    Generation,
    LongbowClient,
    RetryPolicy,
)
from longbow.services.client.sdk import GenerationChunk as StreamChunk

# Sampling settings a single call may override (`model.invoke(..., max_tokens=8)` or `.bind(...)`).
_PER_CALL = ("temperature", "max_tokens", "min_tokens", "top_p", "top_k", "seed")
_ROLES = {"system": "system", "human": "user", "ai": "assistant"}  # LangChain message type -> chat role


def to_chat_messages(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the gateway's chat: HumanMessage -> user, AIMessage -> assistant,
    SystemMessage -> system (a ChatMessage keeps its role if it is one of those). `name` is dropped:
    the chat template has no place for it."""
    return [{"role": _role(m), "content": _text(m)} for m in messages]


def _role(message: BaseMessage) -> str:
    if isinstance(message, ChatMessage) and message.role in {"system", "user", "assistant"}:
        return message.role
    if message.type not in _ROLES:
        raise ValueError(f"Longbow chat takes system, human and AI messages, not {message.type!r} "
                         "(tool calling is not supported)")
    return _ROLES[message.type]


def _text(message: BaseMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(block["text"])
        else:
            raise ValueError(f"the served model reads text only, got a {block.get('type')!r} content block")
    return "".join(parts)


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageMetadata:
    return UsageMetadata(input_tokens=prompt_tokens, output_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)


class _GatewaySettings(BaseModel):
    """Connection and sampling settings shared by both adapters; field names follow LangChain's
    standard parameters (model, api_key, timeout, max_retries, temperature, max_tokens, stop)."""

    model_config = ConfigDict(populate_by_name=True)

    target: str = "localhost:50051"
    # The gateway serves one model; this only names it in response metadata and traces.
    model_name: str = Field(default="longbow", alias="model")
    api_key: SecretStr | None = None  # the gateway's bearer token, when it has one
    root_certificates: bytes | None = None  # TLS; None: plaintext
    timeout: float | None = 120.0  # seconds per call (gRPC deadline)
    max_retries: int = 3  # retries of UNAVAILABLE only; other errors surface at once
    temperature: float = 0.0  # 0: greedy
    max_tokens: int | None = None  # None: the server default
    min_tokens: int = 0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    streaming: bool = False  # invoke() streams under the hood (callbacks see every token)

    _client: LongbowClient | None = PrivateAttr(default=None)
    _async_client: tuple[asyncio.AbstractEventLoop, AsyncLongbowClient] | None = PrivateAttr(default=None)

    def _request(self, stop: list[str] | None, overrides: dict[str, Any]) -> dict[str, Any]:
        """The SDK's generate() keyword arguments for one call (None settings take the server default)."""
        unknown = set(overrides) - set(_PER_CALL)
        if unknown:
            allowed = ", ".join(("stop", *_PER_CALL))
            raise TypeError(f"unsupported arguments {sorted(unknown)}; a call may set {allowed}")
        settings = {name: overrides.get(name, getattr(self, name)) for name in _PER_CALL}
        request = {name: value for name, value in settings.items() if value is not None}
        request["stop"] = [*(self.stop or []), *(stop or [])]
        return request

    def _connection(self) -> dict[str, Any]:
        return dict(token=self.api_key.get_secret_value() if self.api_key else "",
                    root_certificates=self.root_certificates, timeout_s=self.timeout,
                    retry=RetryPolicy(attempts=self.max_retries + 1))

    def _sync_client(self) -> LongbowClient:
        if self._client is None:  # made on first use: building a model opens no connection
            self._client = LongbowClient(self.target, **self._connection())
        return self._client

    def _async_client_for_loop(self) -> AsyncLongbowClient:
        # NOTE: a grpc.aio channel belongs to the event loop that made it; a model used from several
        # loops (asyncio.run per call, one loop per test) gets a client for the current one.
        loop = asyncio.get_running_loop()
        if self._async_client is None or self._async_client[0] is not loop:
            self._async_client = (loop, AsyncLongbowClient(self.target, **self._connection()))
        return self._async_client[1]

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"target": self.target, "model_name": self.model_name, "stop": self.stop,
                **{name: getattr(self, name) for name in _PER_CALL}}


class LongbowChatModel(_GatewaySettings, BaseChatModel):
    """A chat model served by a Longbow gateway. Text in, text out: no tools, images or structured output."""

    @property
    def _llm_type(self) -> str:
        return "longbow-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "longbow"
        return params

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        chat, request = to_chat_messages(messages), self._request(stop, kwargs)
        return self._chat_result(self._sync_client().generate(messages=chat, **request))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        if self.streaming:
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        chat, request = to_chat_messages(messages), self._request(stop, kwargs)
        return self._chat_result(await self._async_client_for_loop().generate(messages=chat, **request))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        chat, request = to_chat_messages(messages), self._request(stop, kwargs)
        for piece in self._sync_client().generate_stream(messages=chat, **request):
            chunk = self._chat_chunk(piece)
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        chat, request = to_chat_messages(messages), self._request(stop, kwargs)
        async for piece in self._async_client_for_loop().generate_stream(messages=chat, **request):
            chunk = self._chat_chunk(piece)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _chat_result(self, result: Generation) -> ChatResult:
        message = AIMessage(content=result.text,
                            usage_metadata=_usage(result.prompt_tokens, result.completion_tokens),
                            response_metadata=self._metadata(result.finish_reason, result.request_id))
        generation = ChatGeneration(message=message, generation_info={"finish_reason": result.finish_reason})
        return ChatResult(generations=[generation])

    def _chat_chunk(self, piece: StreamChunk) -> ChatGenerationChunk:
        if piece.finish_reason is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=piece.text))
        message = AIMessageChunk(content=piece.text, chunk_position="last",
                                 usage_metadata=_usage(piece.prompt_tokens, piece.completion_tokens),
                                 response_metadata=self._metadata(piece.finish_reason, piece.request_id))
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": piece.finish_reason})

    def _metadata(self, finish_reason: str | None, request_id: str) -> dict[str, Any]:
        return {"model_name": self.model_name, "finish_reason": finish_reason, "request_id": request_id}


class LongbowLLM(_GatewaySettings, LLM):
    """Plain text completion (no chat template) on a Longbow gateway."""

    @property
    def _llm_type(self) -> str:
        return "longbow"

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        if self.streaming:
            return "".join(chunk.text for chunk in self._stream(prompt, stop, run_manager, **kwargs))
        return self._sync_client().generate(prompt, **self._request(stop, kwargs)).text

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        if self.streaming:
            return "".join([chunk.text async for chunk in self._astream(prompt, stop, run_manager, **kwargs)])
        return (await self._async_client_for_loop().generate(prompt, **self._request(stop, kwargs))).text

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        for piece in self._sync_client().generate_stream(prompt=prompt, **self._request(stop, kwargs)):
            chunk = self._text_chunk(piece)
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        request = self._request(stop, kwargs)
        async for piece in self._async_client_for_loop().generate_stream(prompt=prompt, **request):
            chunk = self._text_chunk(piece)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    @staticmethod
    def _text_chunk(piece: StreamChunk) -> GenerationChunk:
        if piece.finish_reason is None:
            return GenerationChunk(text=piece.text)
        return GenerationChunk(text=piece.text, generation_info={
            "finish_reason": piece.finish_reason, "prompt_tokens": piece.prompt_tokens,
            "completion_tokens": piece.completion_tokens})


class LongbowRetriever(BaseRetriever):
    """Hybrid retrieval (BM25 + dense, RRF) from a Longbow gateway as a LangChain retriever. Each result is a
    LangChain Document whose page_content is the chunk text and whose metadata holds the document's own
    metadata plus the citation: document_id, chunk_id, char_start, char_end, score.

        retriever = LongbowRetriever(target="localhost:50051", k=4, filters={"team": "ops"})
        retriever.invoke("how do I reset the unit?", k=2)
    """

    target: str = "localhost:50051"
    api_key: SecretStr | None = None  # the gateway's bearer token, when it has one
    root_certificates: bytes | None = None  # TLS; None: plaintext
    timeout: float | None = 60.0
    max_retries: int = 3  # retries of UNAVAILABLE only
    k: int = 4  # documents per query; a call may override it (`invoke(q, k=2)`)
    filters: dict[str, str] | None = None  # metadata key/values every result must have

    _client: LongbowClient | None = PrivateAttr(default=None)
    _async_client: tuple[asyncio.AbstractEventLoop, AsyncLongbowClient] | None = PrivateAttr(default=None)

    def _connection(self) -> dict[str, Any]:
        return dict(token=self.api_key.get_secret_value() if self.api_key else "",
                    root_certificates=self.root_certificates, timeout_s=self.timeout,
                    retry=RetryPolicy(attempts=self.max_retries + 1))

    def _query(self, k: int | None, filters: dict[str, str] | None) -> dict[str, Any]:
        return {"top_k": self.k if k is None else k, "filters": self.filters if filters is None else filters}

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None, filters: dict[str, str] | None = None) -> list[LCDocument]:
        if self._client is None:
            self._client = LongbowClient(self.target, **self._connection())
        return [_lc_document(c) for c in self._client.query(query, **self._query(k, filters)).citations]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       k: int | None = None, filters: dict[str, str] | None = None) -> list[LCDocument]:
        loop = asyncio.get_running_loop()  # a grpc.aio channel belongs to the loop that made it
        if self._async_client is None or self._async_client[0] is not loop:
            self._async_client = (loop, AsyncLongbowClient(self.target, **self._connection()))
        result = await self._async_client[1].query(query, **self._query(k, filters))
        return [_lc_document(c) for c in result.citations]


def _lc_document(citation: Citation) -> LCDocument:
    metadata = {**citation.metadata, "document_id": citation.document_id, "chunk_id": citation.chunk_id,
                "char_start": citation.char_start, "char_end": citation.char_end, "score": citation.score}
    return LCDocument(page_content=citation.text, metadata=metadata, id=citation.chunk_id)
