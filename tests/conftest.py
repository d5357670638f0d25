"""Shared fixtures. The real model is loaded once per test session (its first conversion is cached
under LONGBOW_HOME, so only the first run on a machine pays the ~30 s GGUF de-quantization)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def loaded_model():
    from services.config import ModelSource
    from services.engine.weights import load_model

    return load_model(ModelSource(device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def tokenizer(loaded_model):
    from services.engine.weights import load_tokenizer

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

    def __init__(self, loaded_model, tokenizer, **gateway_overrides):
        import asyncio
        import threading

        from services.config import EngineConfig, GatewayConfig, LongbowConfig
        from services.engine.engine import AsyncLLMEngine, LLMEngine

        gateway = GatewayConfig(port=0, metrics_port=0, **gateway_overrides)
        self.config = LongbowConfig(engine=EngineConfig(token_budget=128, block_size=16, num_blocks=256), gateway=gateway)
        self.engine = AsyncLLMEngine(LLMEngine(self.config, loaded_model))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.gateway = self.run(self._start(tokenizer))
        self.address = f"127.0.0.1:{self.gateway.port}"

    async def _start(self, tokenizer):
        from services.gateway.server import start_gateway

        return await start_gateway(self.config, self.engine, tokenizer)

    def run(self, coroutine, timeout: float = 120):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def engine_stats(self) -> dict:
        return self.run(self.engine.call(lambda e: e.stats()))

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

    def close(self):
        self.run(self.gateway.stop(0.5))
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="session")
def gateway(loaded_model, tokenizer):
    running = RunningGateway(loaded_model, tokenizer)
    yield running
    running.close()
