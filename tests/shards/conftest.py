"""A tiny random Llama checkpoint with the bundled tokenizer: shard actors and `longbow serve` load it in
well under a second, so tests about placement, nodes and addresses spend their time on Ray, not on the
model. Greedy equality with one process holds for any weights."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer) -> Path:
    import torch
    import transformers

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=4096, tie_word_embeddings=True,
                                      eos_token_id=tokenizer.eos_token_id)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from longbow.services.config import ModelSource
    from longbow.services.engine.weights import load_model

    return load_model(ModelSource(name_or_path=str(tiny_checkpoint), device="cpu", dtype="float32"))
