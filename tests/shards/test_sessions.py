"""PIE edit sessions on a real 2-shard Ray group: the document's KV is spread over both shards, each
shard re-rotates the keys it holds, and the result equals the in-process engine's."""

from __future__ import annotations

import pytest
import torch

from longbow.services.config import EngineConfig, LongbowConfig, ModelSource
from longbow.services.engine.engine import LLMEngine
from longbow.services.replica import build_engine
from longbow.services.text.sessions import SessionManager, TextEdit

pytestmark = pytest.mark.slow

SOURCE = (
    "def tokens(text: str) -> list[str]:\n"
    "    return text.split()\n\n\n"
    "def count(text: str) -> dict[str, int]:\n"
    "    counts = {}\n"
    "    for token in tokens(text):\n"
    "        counts[token] = counts.get(token, 0) + 1\n"
    "    return counts\n"
)
EDITS = [TextEdit(4, 10, "split_words"), TextEdit(0, 0, "import collections\n\n")]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _engine(loaded_model, shards: int) -> LLMEngine:
    config = LongbowConfig(model=ModelSource(device="cpu", dtype="float32"),
                           engine=EngineConfig(token_budget=32, block_size=8, num_blocks=64, shards=shards,
                                               collective_timeout_s=30, step_timeout_s=120))
    return build_engine(config, loaded_model)


def _edited(engine, tokenizer):
    manager = SessionManager(engine, tokenizer)
    session = manager.open(SOURCE)
    manager.apply_edits(session.session_id, EDITS)
    twin = manager.fork(session.session_id)
    manager.apply_edits(twin.session_id, [TextEdit(len(SOURCE), len(SOURCE), "")])
    layers = (0, engine.loaded.args.n_layers - 1)
    return {
        "keys": [session.kv.keys(layer) for layer in layers],
        "twin_keys": [twin.kv.keys(layer) for layer in layers],
        "positions": session.kv.positions(),
        "blocks": list(session.kv.blocks),
        "line": manager.predict(session.session_id, len(manager.text(session.session_id)), max_tokens=8),
        "pool": engine.scheduler.pool,
    }, manager


def test_sharded_session_equals_in_process(ray_session, loaded_model, tokenizer):
    local_engine = _engine(loaded_model, 0)
    local, local_manager = _edited(local_engine, tokenizer)
    sharded_engine = _engine(loaded_model, 2)
    try:
        sharded, sharded_manager = _edited(sharded_engine, tokenizer)
        assert {sharded["pool"].shard_of(b) for b in sharded["blocks"]} == {0, 1}  # KV on both shards
        assert sharded["positions"] == local["positions"] == list(range(len(local["positions"])))
        for ours, reference in zip(sharded["keys"], local["keys"]):
            torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
        for ours, reference in zip(sharded["twin_keys"], sharded["keys"]):
            assert torch.equal(ours, reference)  # a fork copies KV within each shard
        assert sharded["line"] == local["line"]
        sharded_manager.close_all()
        assert sharded_engine.scheduler.kv_blocks_used == 0
    finally:
        sharded_engine.shutdown()
    local_manager.close_all()
