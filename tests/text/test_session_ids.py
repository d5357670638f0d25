"""Session ids name the replica that minted them (SessionManager's id_prefix; the gateway passes its
replica id), so a gateway can refuse another replica's session by id alone."""

from __future__ import annotations

import pytest

from longbow.services.config import EngineConfig, LongbowConfig
from longbow.services.engine.engine import LLMEngine
from longbow.services.text.sessions import SessionManager, replica_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(loaded_model):
    return LLMEngine(LongbowConfig(engine=EngineConfig(token_budget=128, block_size=16, num_blocks=64)), loaded_model)


def test_ids_carry_the_prefix_through_open_and_fork(engine, tokenizer):
    pod = "longbow-gateway-7d9f5c-x2k4q"  # a pod name: hyphens, as Kubernetes writes them
    manager = SessionManager(engine, tokenizer, id_prefix=pod)
    try:
        opened = manager.open("def f(x):\n    return x\n")
        forked = manager.fork(opened.session_id)
        assert opened.session_id.startswith(pod + "/") and forked.session_id.startswith(pod + "/")
        assert opened.session_id != forked.session_id
        assert replica_of(opened.session_id) == replica_of(forked.session_id) == pod
    finally:
        manager.close_all()
    assert engine.scheduler.kv_blocks_used == 0


def test_without_a_prefix_ids_name_no_replica(engine, tokenizer):
    manager = SessionManager(engine, tokenizer)
    try:
        session_id = manager.open("x = 1\n").session_id
        assert "/" not in session_id and replica_of(session_id) is None
    finally:
        manager.close_all()


def test_replica_of_parses_what_a_replica_id_may_hold():
    assert replica_of("a.b-c/s0-00ff") == "a.b-c"
    assert replica_of("ns/pod/s1-abcd") == "ns/pod"  # the local part never holds a slash
    assert replica_of("s3-abcdef") is None and replica_of("") is None
