"""What every servicer may use, built once by `start_gateway` and handed to each servicer module's
`create_servicer(runtime)`. Servicer modules own their domain objects (store, sessions, workspace
indexes) and release them in `close()`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from longbow.services.config import LongbowConfig
from longbow.services.engine.engine import AsyncLLMEngine
from longbow.services.gateway.metrics import GatewayMetrics


@dataclass
class GatewayRuntime:
    config: LongbowConfig
    engine: AsyncLLMEngine
    tokenizer: object
    metrics: GatewayMetrics
    loop: asyncio.AbstractEventLoop

    def lm(self):
        """`rag.lm.LM` over the gateway's engine; call it from worker threads (asyncio.to_thread)."""
        from longbow.services.text.lm import AsyncEngineLM

        return AsyncEngineLM(self.engine, self.tokenizer, self.loop)
