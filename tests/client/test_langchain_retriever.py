"""LongbowRetriever against the real gateway: LangChain's standard retriever suite, then citations in the
metadata, filters, and errors keeping their gRPC code."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from langchain_tests.integration_tests import RetrieversIntegrationTests

from longbow.langchain import LongbowRetriever
from longbow import LongbowClient, LongbowError

pytestmark = pytest.mark.slow

TAG = uuid.uuid4().hex[:8]
TEXTS = ["Ravens can imitate human speech.", "Crows remember faces for years.", "Magpies recognise themselves.",
         "Jays hide acorns in autumn.", "Owls hunt at night."]


@pytest.fixture(scope="module")
def corpus(gateway):
    with LongbowClient(gateway.address, timeout_s=120) as client:
        documents = [{"document_id": f"{TAG}-{i}", "text": t, "metadata": {"tag": TAG, "bird": t.split()[0]}}
                     for i, t in enumerate(TEXTS)]
        client.ingest(documents, chunker="sentence", target_chunk_tokens=32)
        yield gateway.address
        client.delete([d["document_id"] for d in documents])


class TestLongbowRetrieverStandard(RetrieversIntegrationTests):
    # The suite's async test needs the mark (pytest-asyncio runs in strict mode here); on its sync tests
    # the class-wide mark is a no-op that pytest-asyncio warns about.
    pytestmark = [pytest.mark.asyncio,
                  pytest.mark.filterwarnings("ignore:The test <Function.*is not an async function")]

    @pytest.fixture(autouse=True)
    def _address(self, corpus):
        self.address = corpus

    @property
    def retriever_constructor(self) -> type[LongbowRetriever]:
        return LongbowRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"target": self.address, "filters": {"tag": TAG}}

    @property
    def retriever_query_example(self) -> str:
        return "Which bird can talk?"


def test_citations_are_in_the_metadata(corpus):
    retriever = LongbowRetriever(target=corpus, k=2, filters={"tag": TAG})
    documents = retriever.invoke("Which bird can talk?")
    assert len(documents) == 2 and documents[0].page_content == TEXTS[0]
    meta = documents[0].metadata
    assert meta["document_id"] == f"{TAG}-0" and meta["bird"] == "Ravens" and meta["char_start"] == 0
    assert meta["char_end"] == len(TEXTS[0]) and meta["score"] >= documents[1].metadata["score"]
    assert documents[0].id == meta["chunk_id"]
    only_owls = asyncio.run(retriever.ainvoke("night hunting", filters={"tag": TAG, "bird": "Owls"}, k=5))
    assert [d.metadata["document_id"] for d in only_owls] == [f"{TAG}-4"]


def test_errors_keep_their_grpc_code(corpus):
    with pytest.raises(LongbowError) as err:
        LongbowRetriever(target=corpus, k=10_000).invoke("anything")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
