"""The LangChain adapters against the real gateway (real gRPC socket, real SmolLM2): LangChain's own
standard suites for chat models, then what the suites do not pin down (streamed == invoked text, stop
strings, exact usage, the text-completion LLM, errors keeping their gRPC code)."""

from __future__ import annotations

import grpc
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from longbow.langchain import LongbowChatModel, LongbowLLM
from longbow.services.client.langchain import to_chat_messages
from longbow import LongbowClient, LongbowError

pytestmark = pytest.mark.slow

_NO = property(lambda self: False)


class _TextOnlyChatModel:
    """What the served model does not do, declared through the suites' own properties."""

    has_tool_calling = has_tool_choice = has_structured_output = supports_json_mode = _NO
    supports_image_inputs = supports_image_urls = supports_pdf_inputs = supports_audio_inputs = _NO
    supports_video_inputs = supports_image_tool_message = supports_pdf_tool_message = _NO
    supports_anthropic_inputs = _NO
    supports_model_override = _NO  # one gateway serves one model


class TestLongbowChatModelUnit(_TextOnlyChatModel, ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[LongbowChatModel]:
        return LongbowChatModel

    @property
    def chat_model_params(self) -> dict:
        return {"target": "127.0.0.1:1"}  # never dialled: unit tests make no calls


class TestLongbowChatModelIntegration(_TextOnlyChatModel, ChatModelIntegrationTests):
    # The suite's async tests need the mark (pytest-asyncio runs in strict mode here); on its sync tests
    # the class-wide mark is a no-op that pytest-asyncio warns about.
    pytestmark = [pytest.mark.asyncio,
                  pytest.mark.filterwarnings("ignore:The test <Function.*is not an async function")]

    @pytest.fixture(autouse=True)
    def _gateway_address(self, gateway):
        self.address = gateway.address  # autouse: set before the suite's `model` fixture reads the params

    @property
    def chat_model_class(self) -> type[LongbowChatModel]:
        return LongbowChatModel

    @property
    def chat_model_params(self) -> dict:
        return {"target": self.address, "max_tokens": 24, "timeout": 60}

    @property
    def returns_usage_metadata(self) -> bool:
        return True


@pytest.fixture
def chat(gateway) -> LongbowChatModel:
    return LongbowChatModel(target=gateway.address, max_tokens=12, timeout=60)


def test_messages_map_to_chat_roles():
    messages = [SystemMessage("be brief"),
                HumanMessage([{"type": "text", "text": "hi "}, "there"], name="ann"),
                AIMessage("hello"), ChatMessage(role="user", content="again")]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    with pytest.raises(ValueError, match="tool"):
        to_chat_messages([ToolMessage("42", tool_call_id="t1")])
    with pytest.raises(ValueError, match="text only"):
        to_chat_messages([HumanMessage([{"type": "image", "url": "http://x/y.png"}])])


def test_stream_joins_to_invoke_with_usage(chat, gateway):
    prompt = [SystemMessage("You are terse."), HumanMessage("Name three colours.")]
    invoked = chat.invoke(prompt, min_tokens=12)
    chunks = list(chat.stream(prompt, min_tokens=12))
    streamed = sum(chunks[1:], chunks[0])
    assert streamed.content == invoked.content and invoked.content
    assert streamed.usage_metadata == invoked.usage_metadata
    assert invoked.usage_metadata["output_tokens"] == 12
    assert chunks[-1].chunk_position == "last" and all(c.usage_metadata is None for c in chunks[:-1])
    assert invoked.response_metadata["finish_reason"] == "length"
    assert gateway.wait_until_idle()["kv_blocks_used"] == 0


def test_usage_counts_the_templated_prompt(chat, gateway):
    with LongbowClient(gateway.address, timeout_s=60) as client:
        templated = client.tokenize("What is two plus two?", chat=True)
    usage = chat.invoke("What is two plus two?").usage_metadata
    assert usage["input_tokens"] == len(templated)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > usage["input_tokens"]


def test_stop_sequence_cuts_before_the_stop_string(chat):
    prompt = "Write a sentence about cats."
    free = chat.invoke(prompt, min_tokens=12).content
    stop = free.split()[1]
    for cut in (chat.invoke(prompt, min_tokens=0, stop=[stop]), chat.bind(stop=[stop]).invoke(prompt)):
        assert cut.content == free[: free.index(stop)]
        assert cut.response_metadata["finish_reason"] == "stop"
    configured = LongbowChatModel(target=chat.target, max_tokens=12, stop=[stop])
    assert configured.invoke(prompt).content == free[: free.index(stop)]


@pytest.mark.asyncio
async def test_async_stream_joins_to_async_invoke(chat):
    invoked = await chat.ainvoke("Say something about the sea.", min_tokens=12)
    chunks = [chunk async for chunk in chat.astream("Say something about the sea.", min_tokens=12)]
    assert "".join(c.content for c in chunks) == invoked.content
    assert chunks[-1].usage_metadata == invoked.usage_metadata
    assert invoked.content == chat.invoke("Say something about the sea.", min_tokens=12).content


class _CollectTokens(BaseCallbackHandler):
    def __init__(self):
        self.seen: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.seen.append(token)


def test_streaming_flag_routes_invoke_through_the_stream(chat, gateway):
    streaming = LongbowChatModel(target=gateway.address, max_tokens=12, streaming=True)
    tokens = _CollectTokens()
    result = streaming.invoke("Hello there", min_tokens=12, config={"callbacks": [tokens]})
    assert result.content == chat.invoke("Hello there", min_tokens=12).content == "".join(tokens.seen)
    assert result.usage_metadata["output_tokens"] == 12


def test_llm_invoke_and_stream(gateway):
    llm = LongbowLLM(target=gateway.address, max_tokens=10, min_tokens=10)
    text = llm.invoke("The capital of France is")
    with LongbowClient(gateway.address, timeout_s=60) as client:
        assert text == client.generate("The capital of France is", max_tokens=10, min_tokens=10).text
    assert "".join(llm.stream("The capital of France is")) == text
    assert llm.invoke("The capital of France is", stop=[text[2:5]]) == text[: text.index(text[2:5])]


@pytest.mark.asyncio
async def test_llm_async(gateway):
    llm = LongbowLLM(target=gateway.address, max_tokens=8, min_tokens=8)
    text = await llm.ainvoke("Once upon a time")
    assert "".join([piece async for piece in llm.astream("Once upon a time")]) == text and text


def test_errors_surface_with_their_grpc_code(gateway):
    bad = LongbowChatModel(target=gateway.address, max_tokens=4, temperature=-1.0)
    with pytest.raises(LongbowError) as err:
        bad.invoke("hi")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.message
    with pytest.raises(LongbowError) as err:
        list(LongbowLLM(target=gateway.address, max_tokens=4).stream("hi", stop=[""]))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(TypeError, match="unsupported"):
        LongbowChatModel(target=gateway.address).invoke("hi", tools=[])
    unreachable = LongbowChatModel(target="127.0.0.1:1", max_retries=0, timeout=5)
    with pytest.raises(LongbowError) as err:
        unreachable.invoke("hi")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
