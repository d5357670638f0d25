"""Fusing q/k/v and gate/up into one matmul each, and multiplying with oneDNN on weights it holds
(PackedLinear, the CPU default), change nothing but summation order (fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

from longbow.services.config import ModelSource
from longbow.services.engine.kv_cache import NoCacheAttention
from longbow.services.engine.model import ModelArgs, PackedLinear, Transformer, fuse_projections, pack_linears
from longbow.services.engine.weights import WeightsError, load_model


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


def test_packed_linear_matches_an_fp64_product_at_every_row_count():
    torch.manual_seed(0)
    for bias in (False, True):
        linear = torch.nn.Linear(96, 80, bias=bias)
        packed = PackedLinear(linear)
        for rows in (0, 1, 2, 7, 64):
            x = torch.randn(rows, 96)
            expected = x.double() @ linear.weight.double().T + (linear.bias.double() if bias else 0)
            got = packed(x)
            assert got.shape == (rows, 80) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
        # a strided input (attention output reshaped) is multiplied as its values
        x = torch.randn(96, 5).T
        torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)


def test_packed_model_equals_the_unpacked_one():
    for bias in (False, True):
        torch.manual_seed(0)
        model = fuse_projections(Transformer(_args(bias)).eval())
        packed = pack_linears(copy.deepcopy(model), lm_head=True)
        ids, positions = torch.randint(0, 97, (19,)), torch.arange(19)
        expected = model(ids, positions, NoCacheAttention(), positions)
        got = packed(ids, positions, NoCacheAttention(), positions)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert isinstance(packed.layers[1].self_attn.qkv_proj, PackedLinear)
        assert isinstance(packed.lm_head, PackedLinear)


def test_the_linear_kernel_setting_is_checked():
    with pytest.raises(WeightsError, match="linear_kernel"):
        load_model(ModelSource(device="cpu", dtype="float32", linear_kernel="mkl"))
