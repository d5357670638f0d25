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
