"""LangChain adapters for a Longbow gateway (needs `langchain-core` beside the SDK; no torch).

    from longbow.langchain import LongbowChatModel, LongbowLLM, LongbowRetriever
"""

from longbow.services.client.langchain import LongbowChatModel, LongbowLLM, LongbowRetriever

__all__ = ["LongbowChatModel", "LongbowLLM", "LongbowRetriever"]
