"""A Llama-family decoder in plain torch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Single device, one file. The model computes q/k/v and hands them to an injected `AttentionBackend`,
which owns the KV cache and decides where keys live and which are visible (local paged cache here,
a ringattn schedule across shards later). The model never sees requests, blocks or text: it maps
(token ids [T], position ids [T]) to logits for the rows asked for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longbow.ringattn.rope import apply_rotary, inverse_frequencies, rotary_cos_sin


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_embeddings: bool
    attention_bias: bool  # Qwen2 has q/k/v biases
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # Mistral; the engine caps its context here rather than mask

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Read a Hugging Face config.json (Llama, Qwen2, Mistral; transformers 4.x or 5.x keys)."""
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        scaling = rope if rope.get("rope_type", "default") != "default" else cfg.get("rope_scaling")
        n_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            eos_token_ids=eos_ids,
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        )


class AttentionBackend(ABC):
    """Where attention happens and where KV lives.

    Contract: `prepare(meta)` runs once per step before the forward pass; it stores what every layer
    shares (the new tokens' position ids, masks, a kernel's tile plan) and returns the meta the layers
    receive (the same object, or a richer one). `attend(layer, q, k, v, meta)` receives the step's new
    tokens' q [T, Hq, D] and k, v [T, Hkv, D] (already rotated to their positions), stores k/v as `meta`
    says, and returns each new token's attention output [T, Hq, D] over every key of its own request with
    key_pos <= query_pos. `meta` is the backend's own per-step object; the model passes it through untouched.
    """

    def prepare(self, meta: Any) -> Any:
        return meta

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu":
            # NOTE: one fused kernel, bit-identical to the lines below in fp32 on CPU (checked on
            # 1-512 rows), ~4 us less per call; other dtypes keep transformers' cast-then-scale order.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.args = layer, args
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections (q, k, v in one matmul)

    def forward(self, x, cos, sin, backend: AttentionBackend, meta) -> torch.Tensor:
        t, a = x.shape[0], self.args
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim,
                                              a.n_kv_heads * a.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, a.n_heads, a.head_dim)  # [T, Hq, D]
        k = k.view(t, a.n_kv_heads, a.head_dim)  # [T, Hkv, D]
        v = v.view(t, a.n_kv_heads, a.head_dim)  # [T, Hkv, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = backend.attend(self.layer, q, k, v, meta)  # [T, Hq, D]
        return self.o_proj(out.to(x.dtype).reshape(t, a.n_heads * a.head_dim))  # T may be 0 on a shard


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, backend, meta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Parameter names follow Hugging Face's Llama layout, so checkpoints load without renaming."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer(
            "inv_freq", inverse_frequencies(args.head_dim, args.rope_theta, args.rope_scaling), persistent=False
        )

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        backend: AttentionBackend,
        meta: Any,
        logit_rows: torch.Tensor | None = None,  # [R] rows to project to the vocabulary; None: all
    ) -> torch.Tensor:  # [R, V] fp32
        cos, sin = rotary_cos_sin(positions, self.inv_freq)  # [T, D]
        x = self.embed_tokens(token_ids)  # [T, dim]
        for block in self.layers:
            x = block(x, cos, sin, backend, meta)
        if logit_rows is not None:
            x = x[logit_rows]
        return self.lm_head(self.norm(x)).float()


def fuse_projections(model: Transformer) -> Transformer:
    """q/k/v and gate/up weights concatenated into one matmul each (fewer kernels per layer; the same
    numbers up to summation order). Applied after loading, so checkpoints keep Hugging Face's names."""
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        attn.qkv_proj = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp.gate_up_proj = _concat_linears([mlp.gate_proj, mlp.up_proj])
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj
    return model


def _concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([p.weight.detach() for p in parts])  # [sum(out), in]
    bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if bias is not None:
            fused.bias.copy_(bias)
    return fused


class PackedLinear(nn.Module):
    """A linear layer (CPU, fp32) whose weight oneDNN holds in its own blocked layout, multiplied by
    oneDNN's matmul on dense activations. With the few rows of a decode step, or a decode step with a
    document's rows beside it, that stays near the time of reading the weight, where MKL's sgemm (what
    nn.Linear calls) costs up to twice as much for two rows as for one (docs/benchmarks.md, issue 12).
    The same numbers up to summation order."""

    # NOTE: mkldnn_linear on a to_mkldnn() weight needs the activation converted to and from oneDNN's
    # tensor type on every call (~45 us per call, ~5 ms of a 30-layer decode step); _linear_pointwise
    # takes dense activations and a weight reordered once, and measured 1.6-2.2x faster for 1-8 rows,
    # 1.1x at 380 (Intel Xeon, 2 threads, 2026-12-05). The reorder's batch-size hint changed nothing.

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous())
        self.register_buffer("weight", weight, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # a shard with no rows this step
            return x.new_empty(0, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")


def pack_linears(model: Transformer, lm_head: bool = False) -> Transformer:
    """The block projections (after fuse_projections) as `PackedLinear`s; `lm_head` too when asked (it
    is tied to the embedding in small checkpoints, so packing it keeps a second copy)."""
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        attn.qkv_proj, attn.o_proj = PackedLinear(attn.qkv_proj), PackedLinear(attn.o_proj)
        mlp.gate_up_proj, mlp.down_proj = PackedLinear(mlp.gate_up_proj), PackedLinear(mlp.down_proj)
    if lm_head:
        model.lm_head = PackedLinear(model.lm_head)
    return model
