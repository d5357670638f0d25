"""Local Hugging Face checkpoints of each supported family load and match transformers.

Tiny randomly initialised models cover what the bundled SmolLM2 does not: untied embeddings, Qwen2's
q/k/v biases, MHA (no GQA), Llama 3 rope scaling, linear rope scaling, Mistral.
"""

from __future__ import annotations

import pytest
import torch

from longbow.services.config import ModelSource
from longbow.services.engine.kv_cache import NoCacheAttention
from longbow.services.engine.weights import WeightsError, load_model

TOLERANCE = 1e-5  # fp32, tiny models: no massive activations, so the noise floor is far lower


def _tiny(family: str, **extra):
    import transformers

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    common.update(extra)
    configs = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }
    torch.manual_seed(0)
    config = configs[family](**common)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


CASES = {
    "llama-gqa-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("llama", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2-bias": ("qwen2", dict(tie_word_embeddings=False)),
    "mistral": ("mistral", dict(sliding_window=None)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@torch.inference_mode()
def test_local_checkpoint_matches_transformers(case, tmp_path):
    family, extra = CASES[case]
    reference = _tiny(family, **extra)
    reference.save_pretrained(tmp_path)
    loaded = load_model(ModelSource(name_or_path=str(tmp_path), device="cpu", dtype="float32"))
    ids = torch.randint(0, 320, (200,))
    positions = torch.arange(200)
    ours = loaded.model(ids, positions, NoCacheAttention(), positions)
    expected = reference(ids.unsqueeze(0)).logits[0]
    assert (ours - expected).abs().max().item() <= TOLERANCE


def test_unknown_model_and_unsupported_family_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="neither a bundled model"):
        load_model(ModelSource(name_or_path=str(tmp_path / "missing")))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(WeightsError, match="not Llama-family"):
        load_model(ModelSource(name_or_path=str(tmp_path)))
