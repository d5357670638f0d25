"""The Retrieval service over a real socket: ingest (progress) -> query -> delete on the embedded store,
errors with clear status codes, answers (unary and streamed) from the real model, the default Meta-Chunking
chunker through the gateway's engine, and two Redis-backed gateways that agree."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest

from longbow.v1 import retrieval_pb2 as pb
from longbow.rag.types import Document
from longbow.services.client.sdk import AsyncLongbowClient, LongbowClient, LongbowError
from tests.conftest import RunningGateway

pytestmark = pytest.mark.slow

FACTS = [
    ("Zorvath is a mountain town famous for blue cheese. Its cheese caves are a thousand years old.", "food"),
    ("The Quillon river floods every spring. Farmers along it grow rice in the wet fields.", "geo"),
    ("Kettleby Motors builds electric buses. Its factory is in the port city of Amberlee.", "industry"),
]


def documents(tag: str) -> list[dict]:
    return [{"document_id": f"{tag}-{i}", "text": text, "metadata": {"topic": topic, "tag": tag}}
            for i, (text, topic) in enumerate(FACTS)]


@pytest.fixture
def client(gateway):
    with LongbowClient(gateway.address, timeout_s=120) as c:
        yield c


def test_ingest_query_delete(client):
    tag = uuid.uuid4().hex[:8]
    progress = list(client.ingest_stream(documents(tag), chunker="sentence", target_chunk_tokens=8))
    assert [p.documents_done for p in progress] == [0, 1, 2, 3]
    assert progress[-1].documents_total == 3 and progress[-1].chunks_written == 6  # one chunk per sentence
    hits = client.query("Which town is known for cheese?", top_k=3, filters={"tag": tag}).citations
    assert hits[0].document_id == f"{tag}-0" and hits[0].metadata["topic"] == "food"
    assert FACTS[0][0][hits[0].char_start:hits[0].char_end] == hits[0].text and hits[0].score > 0
    again = client.ingest(documents(tag), chunker="sentence", target_chunk_tokens=8)
    assert again.documents_unchanged == 3 and again.chunks_written == 0
    assert client.delete([f"{tag}-0", f"{tag}-0", "never-existed"]) == 1
    after = client.query("Which town is known for cheese?", top_k=5, filters={"tag": tag}).citations
    assert after and all(c.document_id != f"{tag}-0" for c in after)
    assert client.delete([f"{tag}-1", f"{tag}-2"]) == 2  # the shared gateway is left as found (conftest checks)


def test_default_chunker_is_meta_chunking_on_the_served_model(client):
    tag = uuid.uuid4().hex[:8]
    text = " ".join(t for t, _ in FACTS)
    final = client.ingest([Document(f"{tag}-all", text)], target_chunk_tokens=24)  # rag.types objects work too
    assert final.documents_done == 1 and final.chunks_written >= 2
    hits = client.query("electric buses factory", top_k=10, filters={}).citations
    mine = sorted((c for c in hits if c.document_id == f"{tag}-all"), key=lambda c: c.char_start)
    assert mine and all(text[c.char_start:c.char_end] == c.text for c in mine)
    client.delete([f"{tag}-all"])


def test_answer_unary_and_streamed_agree(client):
    tag = uuid.uuid4().hex[:8]
    client.ingest(documents(tag), chunker="sentence", target_chunk_tokens=32)
    question, filters = "Where is the Kettleby Motors factory?", {"tag": tag}
    unary = client.query(question, top_k=2, filters=filters, answer=True, flow="single", max_tokens=8)
    assert unary.answer and unary.citations and unary.citations[0].document_id == f"{tag}-2"
    chunks = list(client.query_stream(question, top_k=2, filters=filters, flow="single", max_tokens=8))
    assert chunks[0].citations and chunks[0].citations[0].document_id == f"{tag}-2" and not chunks[0].done
    assert chunks[-1].done and chunks[-1].citations and all(not c.done for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == unary.answer and len(chunks) >= 3
    client.delete([d["document_id"] for d in documents(tag)])


def test_async_client(gateway):
    tag = uuid.uuid4().hex[:8]

    async def run():
        async with AsyncLongbowClient(gateway.address, timeout_s=120) as aclient:
            seen = [p async for p in aclient.ingest_stream(documents(tag), chunker="fixed", target_chunk_tokens=8)]
            result = await aclient.query("rice fields that flood", top_k=1, filters={"tag": tag})
            deleted = await aclient.delete([d["document_id"] for d in documents(tag)])
            return seen, result, deleted

    seen, result, deleted = asyncio.run(run())
    assert seen[-1].documents_done == 3 and result.citations[0].document_id == f"{tag}-1" and deleted == 3


def _ingest(**request):
    return lambda c: list(c._retrieval_stub.Ingest(pb.IngestRequest(**request), timeout=60))


def _query(**request):
    return lambda c: c._retrieval_stub.Query(pb.QueryRequest(**request), timeout=60)


@pytest.mark.parametrize("call, message", [
    (_ingest(documents=[]), "no documents"),
    (_ingest(documents=[pb.Document(document_id="a", text=" \n ")]), "empty"),
    (_ingest(documents=[pb.Document(document_id="", text="text")]), "document id"),
    (_ingest(documents=[pb.Document(document_id="a", text="x" * 1_000_001)]), "limit is 1000000"),
    (_ingest(documents=[pb.Document(document_id=f"d{i}", text="x") for i in range(1001)]), "limit is 1000"),
    (_ingest(documents=[pb.Document(document_id="a", text="x")] * 2), "twice"),
    (_ingest(documents=[pb.Document(document_id="a", text="x")], chunker=42), "unknown chunker"),
    (_ingest(documents=[pb.Document(document_id="a", text="x")], target_chunk_tokens=10**6), "target chunk"),
    (_query(query="x", flow=99), "unknown flow"),
    (_query(query="x", top_k=101), "top_k"),
    (_query(query="   "), "empty"),
    (_query(query="x", grouping=7), "unknown grouping"),
    (_query(query="x", chunks_per_document=11), "chunks_per_document"),
    (lambda c: c._retrieval_stub.Delete(pb.DeleteRequest(), timeout=60), "document ids"),
])
def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving(client, call, message):
    with pytest.raises(grpc.RpcError) as err:
        call(client)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    assert client.query("still serving?", top_k=1) is not None


def test_query_citations_grouped_by_document(client):
    """Default: top_k documents, one chunk each; chunks_per_document adds each one's next chunks in a row;
    grouping="chunks" gives plain chunks, where one long document can fill the list."""
    tag = uuid.uuid4().hex[:8]
    long = ("The Brask kettle boils water in two minutes. Descale the Brask kettle with vinegar. "
            "The Brask kettle warranty covers the heating element. A Brask kettle lid is sold separately.")
    client.ingest([{"document_id": f"{tag}-long", "text": long, "metadata": {"tag": tag}},
                   *documents(tag)], chunker="sentence", target_chunk_tokens=8)
    query, only = "Brask kettle care and warranty", {"tag": tag}
    grouped = [c.document_id for c in client.query(query, top_k=3, filters=only).citations]
    assert grouped[0] == f"{tag}-long" and len(grouped) == len(set(grouped)) == 3
    several = client.query(query, top_k=2, filters=only, chunks_per_document=3).citations
    several = [c.document_id for c in several]
    assert several[:3] == [f"{tag}-long"] * 3 and len(set(several)) == 2  # documents in a row, up to 3 chunks
    assert 4 <= len(several) <= 6 and several[3:] == [several[3]] * len(several[3:])
    chunks = client.query(query, top_k=3, filters=only, grouping="chunks").citations
    assert [c.document_id for c in chunks] == [f"{tag}-long"] * 3
    assert [c.score for c in chunks] == sorted((c.score for c in chunks), reverse=True)
    client.delete([f"{tag}-long", *(f"{tag}-{i}" for i in range(len(FACTS)))])


def test_sdk_reports_errors_as_longbow_error(client):
    with pytest.raises(LongbowError) as err:
        client.query("x", top_k=500)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError, match="unknown flow"):
        client.query("x", flow="telepathy")


def test_server_info_lists_retrieval(client):
    assert "longbow.v1.Retrieval" in client.server_info().implemented_services


def indexed(running: RunningGateway) -> dict[str, str]:
    """Document id -> content hash in the gateway's own derived index."""
    retrieval = running.gateway.servicers[0]
    return retrieval.retriever.index.document_hashes()


def wait_for(condition, timeout_s: float = 30.0) -> bool:
    """Polls (bounded) for a condition another thread makes true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_two_redis_backed_gateways_agree(loaded_model, tokenizer, redis_server):
    first = RunningGateway(loaded_model, tokenizer, store_url=redis_server)
    second = RunningGateway(loaded_model, tokenizer, store_url=redis_server)
    tag = uuid.uuid4().hex[:8]
    try:
        with LongbowClient(first.address, timeout_s=120) as a, LongbowClient(second.address, timeout_s=120) as b:
            assert a.ingest(documents(tag), chunker="sentence", target_chunk_tokens=16).documents_done == 3
            # With no query at all, the second replica's follower applies the change stream.
            assert wait_for(lambda: {f"{tag}-{i}" for i in range(3)} <= set(indexed(second)))
            hit = b.query("electric buses", top_k=1, filters={"tag": tag}).citations[0]
            assert hit.document_id == f"{tag}-2"
            assert b.delete([f"{tag}-2"]) == 1
            for replica in (a, b):
                left = replica.query("electric buses", top_k=5, filters={"tag": tag}).citations
                assert {c.document_id for c in left} == {f"{tag}-0", f"{tag}-1"}
        third = RunningGateway(loaded_model, tokenizer, store_url=redis_server)  # rebuilt from Redis at start
        try:
            with LongbowClient(third.address, timeout_s=120) as c:
                assert c.query("floods every spring", top_k=1, filters={"tag": tag}).citations[0].document_id == f"{tag}-1"
        finally:
            third.close()
    finally:
        first.close()
        second.close()
