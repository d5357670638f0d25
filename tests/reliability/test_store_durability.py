"""Acknowledged documents survive: a Redis that could lose them is refused at start (unless the operator
opts out), a kill -9 of Redis loses nothing acknowledged, and a gateway started while Redis is down
serves everything else, reports Retrieval NOT_SERVING, retries quietly and serves once Redis arrives."""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from longbow.rag.store import NotDurableError, open_store
from longbow.services.client.sdk import LongbowClient, LongbowError
from tests.conftest import RunningGateway

# Distinct made-up words: each document is the only one a query for its word can find.
WORDS = ["zorblat", "quenmar", "vextrel", "pollidan", "strumwick", "yavrenti", "koldmere", "tessivar",
         "mirrowen", "dashkaly", "fenwroth", "glimmerak", "hostavel", "irribund", "jaskovar", "lunderath",
         "morvessa", "nimbraud", "orrestil", "pyxalor"]


def _documents() -> list[dict]:
    return [{"document_id": f"doc-{i}", "text": f"The {word} is a rare kind of lantern made in the north."}
            for i, word in enumerate(WORDS)]


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def test_a_redis_without_aof_is_refused_with_the_fix(redis_process, caplog):
    redis = redis_process(appendonly=False).start()
    with pytest.raises(NotDurableError) as refused:
        open_store(redis.url)
    assert "--appendonly yes" in str(refused.value) and "require_durable = false" in str(refused.value)
    with caplog.at_level(logging.WARNING, logger="longbow.rag.store"):
        open_store(redis.url, require_durable=False).close()
    assert any("appendonly no" in r.getMessage() for r in caplog.records)
    open_store(redis_process(appendonly=True).start().url).close()  # AOF on: accepted


def test_acknowledged_documents_survive_kill_9_of_redis(loaded_model, tokenizer, redis_process):
    redis = redis_process().start()
    gateway = RunningGateway(loaded_model, tokenizer, store_url=redis.url)
    try:
        with LongbowClient(gateway.address, timeout_s=300) as client:
            progress = client.ingest(_documents(), chunker="fixed")
        assert progress.documents_done == len(WORDS)  # every document acknowledged
        redis.kill()  # at once: no shutdown save, the AOF holds what was acknowledged
    finally:
        gateway.close()
    redis.start()  # the same directory and port: the AOF is replayed
    assert open_store(redis.url).document_ids() == sorted(d["document_id"] for d in _documents())
    gateway = RunningGateway(loaded_model, tokenizer, store_url=redis.url)  # rebuilds its index from Redis
    try:
        with LongbowClient(gateway.address, timeout_s=300) as client:
            for i, word in enumerate(WORDS):
                [top] = client.query(f"What is a {word}?", top_k=1).citations
                assert top.document_id == f"doc-{i}" and word in top.text
    finally:
        gateway.close()


def test_gateway_started_with_redis_down_serves_once_it_arrives(loaded_model, tokenizer, redis_process, caplog):
    redis = redis_process()  # a port reserved, nothing listening yet
    caplog.set_level(logging.WARNING, logger="longbow.services.gateway.retrieval")
    gateway = RunningGateway(loaded_model, tokenizer, store_url=redis.url)
    try:
        retrieval = "longbow.v1.Retrieval"
        _wait_for(lambda: _health(gateway.address, retrieval) == health_pb2.HealthCheckResponse.NOT_SERVING,
                  30, "Retrieval NOT_SERVING")
        assert _health(gateway.address, "longbow.v1.Generation") == health_pb2.HealthCheckResponse.SERVING
        with LongbowClient(gateway.address, timeout_s=60) as client:
            assert client.tokenize("still serving")
            with pytest.raises(LongbowError) as down:
                client.query("anything")
            assert down.value.code == grpc.StatusCode.UNAVAILABLE
        servicer = gateway.gateway.servicers[0]
        _wait_for(lambda: servicer.connect_attempts >= 4, 30, "several connection attempts")
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # the rest are rate-limited
        redis.start()
        _wait_for(lambda: _health(gateway.address, retrieval) == health_pb2.HealthCheckResponse.SERVING,
                  30, "Retrieval SERVING after Redis arrived")
        with LongbowClient(gateway.address, timeout_s=300) as client:
            client.ingest(_documents()[:2], chunker="fixed")
            assert client.query(f"What is a {WORDS[1]}?", top_k=1).citations[0].document_id == "doc-1"
    finally:
        gateway.close()
