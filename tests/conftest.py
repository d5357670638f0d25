"""Shared fixtures. The real model is loaded once per test session (its first conversion is cached
under LONGBOW_HOME, so only the first run on a machine pays the ~30 s GGUF de-quantization)."""

from __future__ import annotations

import os

import pytest

# NOTE: Ray turns token authentication on when ~/.ray/auth_token exists, and a process keeps the mode it
# read at its first ray.init. A test that pinned it off for one connection then left later local Rays
# (started with the default) demanding a token this process would not send. Every Ray the tests start
# is local and throwaway, so the whole test session pins it off, for its own processes and children.
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session")
def loaded_model():
    from longbow.services.config import ModelSource
    from longbow.services.engine.weights import load_model

    return load_model(ModelSource(device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def tokenizer(loaded_model):
    from longbow.services.engine.weights import load_tokenizer

    return load_tokenizer(loaded_model.checkpoint)


@pytest.fixture(scope="session")
def hf_model(loaded_model):
    """transformers' own Llama on the same weights: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(loaded_model.checkpoint), dtype=torch.float32)
    return model.eval()


class RunningGateway:
    """A real gateway on 127.0.0.1 (free port), its own asyncio loop on a thread, the real model."""

    def __init__(self, loaded_model, tokenizer, store_url: str = "", sections: dict | None = None, engine_config=None,
                 **gateway_overrides):
        import asyncio
        import tempfile
        import threading

        from longbow.services.config import EngineConfig, GatewayConfig, LongbowConfig, RagConfig
        from longbow.services.engine.engine import AsyncLLMEngine
        from longbow.services.replica import build_engine

        gateway = GatewayConfig(port=0, metrics_port=0, **gateway_overrides)
        self._data_dir = tempfile.TemporaryDirectory(prefix="longbow-gw-")
        rag = RagConfig(store_url=store_url, data_dir=self._data_dir.name)
        engine_config = engine_config or EngineConfig(token_budget=128, block_size=16, num_blocks=256)
        self.config = LongbowConfig(engine=engine_config,
                                    gateway=gateway, rag=rag, **(sections or {}))  # sections: e.g. code=...
        self.engine = AsyncLLMEngine(build_engine(self.config, loaded_model))  # engine.shards > 0: Ray actors
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.gateway = self.run(self._start(tokenizer))
        self.address = f"127.0.0.1:{self.gateway.port}"

    async def _start(self, tokenizer):
        from longbow.services.gateway.server import start_gateway

        return await start_gateway(self.config, self.engine, tokenizer)

    def run(self, coroutine, timeout: float = 120):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def engine_stats(self) -> dict:
        return self.run(self.engine.call(lambda e: e.stats()))

    def wait_for_stats(self, predicate, what: str, timeout_s: float = 30.0) -> dict:
        """Polls engine stats until `predicate(stats)` holds (bounded: fails with `what` and the last stats)."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.engine_stats()
            if predicate(stats):
                return stats
            assert time.monotonic() < deadline, f"{what} within {timeout_s} s: {stats}"
            time.sleep(0.02)  # polling interval of a bounded wait

    def wait_until_idle(self, timeout: float = 30.0) -> dict:
        """Waits (bounded) for the engine to hold no KV: aborts travel from a cancelled call to the
        engine thread asynchronously. Returns the final stats."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine_stats()
            if (stats["kv_blocks_used"] == 0 and stats["running"] == 0) or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)

    # ---- what a test may leave behind on a shared gateway (see `shared_gateway_left_clean`) ----------
    def session_ids(self) -> set[str]:
        from longbow.services.gateway.sessions import SessionsServicer

        manager = next(s for s in self.gateway.servicers if isinstance(s, SessionsServicer)).manager
        return set(self.run(self.engine.call(lambda engine: list(manager.sessions))))

    def close_sessions(self, session_ids) -> None:
        from longbow.services.gateway.sessions import SessionsServicer

        manager = next(s for s in self.gateway.servicers if isinstance(s, SessionsServicer)).manager
        for session_id in session_ids:
            close = lambda engine, sid=session_id: manager.close(sid, "closed after a test")  # noqa: E731
            self.run(self.engine.call(close))

    def document_ids(self) -> set[str]:
        """Ids of the documents the gateway serves (empty until its store has started). The index follows the
        store in the background (a Delete lands in the store first): catch it up, then read it."""
        from longbow.services.gateway.retrieval import RetrievalServicer

        retrieval = next(s for s in self.gateway.servicers if isinstance(s, RetrievalServicer))
        if retrieval.retriever is None:
            return set()
        retrieval.retriever.index.follow(retrieval.store)
        return set(retrieval.retriever.index.document_hashes())

    def leaks_since(self, before: dict, bound_s: float = 30.0) -> list[str]:
        """What the gateway holds now that it did not hold at `before` (a `state()`): sessions and documents
        are named and then closed/deleted, so the next test starts clean; KV must come back to its level at
        `before`, with no request running or waiting, within `bound_s` (aborts and closes travel to the
        engine thread asynchronously). Returns one line per leak."""
        import time

        leaks = []
        sessions = self.session_ids() - before["sessions"]
        if sessions:
            leaks.append(f"{len(sessions)} edit session(s) left open: {sorted(sessions)}")
            self.close_sessions(sessions)
        documents = self.document_ids() - before["documents"]
        if documents:
            leaks.append(f"{len(documents)} document(s) left in the index: {sorted(documents)}")
            from longbow.services.client.sdk import LongbowClient

            with LongbowClient(self.address, timeout_s=60) as client:
                client.delete(sorted(documents))
        deadline = time.monotonic() + bound_s
        while True:
            stats = self.engine_stats()
            idle = stats["running"] == stats["waiting"] == 0
            if idle and stats["kv_blocks_used"] <= before["kv_blocks_used"]:
                return leaks
            if time.monotonic() > deadline:
                return leaks + [f"KV blocks in use {stats['kv_blocks_used']} "
                                f"(was {before['kv_blocks_used']}), running {stats['running']}, waiting {stats['waiting']} after {bound_s:g} s"]
            time.sleep(0.02)  # polling interval of a bounded wait

    def state(self) -> dict:
        return {"sessions": self.session_ids(), "documents": self.document_ids(),
                "kv_blocks_used": self.engine_stats()["kv_blocks_used"]}

    def close(self):
        self.run(self.gateway.stop(0.5))
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self._data_dir.cleanup()


@pytest.fixture(scope="session")
def engine_lm(loaded_model, tokenizer):
    """`rag.lm.LM` over a synchronous in-process engine on the real model (one per test session)."""
    from longbow.services.config import EngineConfig, LongbowConfig
    from longbow.services.engine.engine import LLMEngine
    from longbow.services.text.lm import EngineLM

    config = LongbowConfig(engine=EngineConfig(token_budget=256, block_size=16, num_blocks=512))
    return EngineLM(LLMEngine(config, loaded_model), tokenizer)


@pytest.fixture(scope="session")
def gateway(loaded_model, tokenizer):
    """One real gateway shared by every test that asks for it (starting one costs seconds); a test must leave
    it as it found it, which `shared_gateway_left_clean` checks after each of them."""
    running = RunningGateway(loaded_model, tokenizer)
    yield running
    running.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item: a fixture's teardown can see whether the test passed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"longbow_report_{report.when}", report)


@pytest.fixture(autouse=True)
def shared_gateway_left_clean(request):
    """After each test that uses the shared `gateway`: KV back to where it was, no request running, no edit
    session or document it added left behind. A passing test that leaks fails here, at its own teardown, and
    not some later test in another module that asserts zero KV; the leak is then cleaned up so the tests
    after it start clean. A test that already failed is only cleaned up (its own failure is the report).
    Runs after the test's own function fixtures are torn down (an editor stopped, a client closed)."""
    if "gateway" not in request.fixturenames:
        yield
        return
    shared = request.getfixturevalue("gateway")
    before = shared.state()
    yield
    leaks = shared.leaks_since(before)
    call = getattr(request.node, "longbow_report_call", None)
    if leaks and call is not None and call.passed:
        pytest.fail(f"{request.node.nodeid} left the shared gateway dirty: " + "; ".join(leaks),
                    pytrace=False)


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free loopback port for this test session, run as the README tells
    operators to (append-only file on, fsync every second; the gateway refuses a Redis without it).
    Yields its URL. Fails (does not skip) when redis-server is missing: .ci/run installs it."""
    import shutil
    import socket
    import subprocess
    import tempfile

    import redis

    binary = shutil.which("redis-server")
    assert binary, "redis-server not found: apt-get install -y redis-server (.ci/run does)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.TemporaryDirectory(prefix="longbow-redis-")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                                "--dir", workdir.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(500):  # the server accepts connections within ~10 ms; bounded wait, then fail loudly
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            process.poll()
            assert process.returncode is None, "redis-server exited at start"
            import time

            time.sleep(0.01)
    else:
        raise AssertionError("redis-server did not answer PING within 5 s")
    yield url
    client.close()
    process.terminate()
    process.wait(10)
    workdir.cleanup()
