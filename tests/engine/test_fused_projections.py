"""Fusing q/k/v and gate/up into one matmul each changes nothing but summation order (fp32)."""

from __future__ import annotations

import copy

import torch

from longbow.services.engine.kv_cache import NoCacheAttention
from longbow.services.engine.model import ModelArgs, Transformer, fuse_projections


def _args(bias: bool) -> ModelArgs:
    return ModelArgs(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, intermediate_size=64,
                     norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
                     tie_embeddings=True, attention_bias=bias)


def test_fused_model_equals_unfused():
    for bias in (False, True):  # Qwen2 has q/k/v biases
        torch.manual_seed(0)
        model = Transformer(_args(bias)).eval()
        fused = fuse_projections(copy.deepcopy(model))
        ids, positions = torch.randint(0, 97, (19,)), torch.arange(19)
        expected = model(ids, positions, NoCacheAttention(), positions)
        got = fused(ids, positions, NoCacheAttention(), positions)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert not hasattr(fused.layers[0].self_attn, "q_proj") and fused.layers[0].mlp.gate_up_proj is not None
        assert fused.lm_head.weight is fused.embed_tokens.weight  # tying survives
