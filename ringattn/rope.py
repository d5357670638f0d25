"""Rotary position embedding (the rotate-half convention of Llama checkpoints) and PIE re-rotation.

RoPE rotates each (x_i, x_{i+D/2}) pair by angle pos * theta_i. Rotations compose additively, so a key
cached at position p becomes the key at position p + d by one more rotation of d * theta: that is PIE's
update, `rotate_keys_by`, and it leaves values untouched.
"""

from __future__ import annotations

import math

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """theta_i for i in [0, D/2), fp32, with the checkpoint's rope scaling applied (linear, llama3)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    raise NotImplementedError(f"rope scaling {kind!r} is not supported")


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(is_mid, ramp, scaled)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [T, D] fp32 for integer (or float) positions [T]."""
    # NOTE: angles in fp64, then cos/sin rounded to fp32. An fp32 product pos * theta is off by up to
    # ~6e-8 * pos radians, so a key rotated at p then moved by d (PIE) differed from a key rotated at
    # p + d by 2.7e-5 at p ~ 300 (layer-0 keys of SmolLM2); in fp64 the two agree within 1e-6.
    angles = positions.double().unsqueeze(-1) * inv_freq.to(positions.device, torch.float64).unsqueeze(0)  # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, D]
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, D]. Computed in fp32, returned in x's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def rotate_keys_by(keys: torch.Tensor, delta: torch.Tensor | int, inv_freq: torch.Tensor) -> torch.Tensor:
    """PIE: move already-rotated keys [T, H, D] by `delta` positions (an int or [T] per key)."""
    if isinstance(delta, int):
        delta = torch.full((keys.shape[0],), delta, dtype=torch.int64, device=keys.device)
    cos, sin = rotary_cos_sin(delta, inv_freq)
    return apply_rotary(keys, cos, sin)
