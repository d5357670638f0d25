"""One engine replica as `longbow serve`, the CLI and the gateway build it: the model, the executor the
configuration asks for (the in-process Worker, or a Ray ShardGroup splitting every sequence over
`engine.shards` actors) and the engine that drives it. The engine itself never imports Ray."""

from __future__ import annotations

from longbow.services.config import LongbowConfig, load_config
from longbow.services.engine.engine import LLMEngine
from longbow.services.engine.weights import LoadedModel, load_model


def build_engine(config: LongbowConfig | None = None, loaded: LoadedModel | None = None) -> LLMEngine:
    config = config or load_config()
    loaded = loaded or load_model(config.model)
    if not config.engine.shards:
        return LLMEngine(config, loaded)
    from longbow.services.shards.group import ShardGroup  # Ray only when shards are asked for

    return LLMEngine(config, loaded, executor=ShardGroup(config, loaded.args, config.engine.shards))
