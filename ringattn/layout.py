"""Where tokens live: position layouts across N shards, and the Shard a rank holds.

A layout assigns each of T token positions to one of N ranks. Schedules never assume a layout (masks
come from position ids), but the layout decides causal load balance:
- contiguous: rank r holds [r*T/N, (r+1)*T/N); under a causal mask the last rank does most of the work.
- zigzag: split T into 2N chunks; rank r holds chunks r and 2N-1-r, so every rank does the same work.
- interleaved: rank r holds positions r, r+N, r+2N, ... (round-robin, as a decode KV cache fills).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("contiguous", "zigzag", "interleaved")


@dataclass
class Shard:
    """What one rank holds: its query tokens and its KV, each with int64 position ids (and, for a packed
    batch of several sequences, int64 sequence ids)."""

    q: torch.Tensor  # [Tq, Hq, D]
    k: torch.Tensor  # [Tk, Hkv, D]
    v: torch.Tensor  # [Tk, Hkv, D]
    q_pos: torch.Tensor  # [Tq]
    k_pos: torch.Tensor  # [Tk]
    q_seq: torch.Tensor | None = None  # [Tq] sequence ids of a packed batch (None: one sequence)
    k_seq: torch.Tensor | None = None  # [Tk]


def check_packed(q_seq: torch.Tensor | None, k_seq: torch.Tensor | None) -> bool:
    """Whether a call is packed (several sequences); both sides must say so."""
    if (q_seq is None) != (k_seq is None):
        raise ValueError("a packed batch needs sequence ids for both queries and keys (q_seq and k_seq)")
    return q_seq is not None


def _even_bounds(length: int, parts: int) -> list[int]:
    """parts+1 boundaries splitting `length` items as evenly as possible (earlier parts get the extra)."""
    base, extra = divmod(length, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + base + (1 if part < extra else 0))
    return bounds


def layout_indices(length: int, world_size: int, layout: str) -> list[torch.Tensor]:
    """For each rank, the (sorted) token indices it holds under `layout`."""
    if layout == "contiguous":
        bounds = _even_bounds(length, world_size)
        return [torch.arange(bounds[r], bounds[r + 1]) for r in range(world_size)]
    if layout == "zigzag":
        bounds = _even_bounds(length, 2 * world_size)
        chunks = [torch.arange(bounds[c], bounds[c + 1]) for c in range(2 * world_size)]
        return [torch.cat([chunks[r], chunks[2 * world_size - 1 - r]]) for r in range(world_size)]
    if layout == "interleaved":
        return [torch.arange(r, length, world_size) for r in range(world_size)]
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def shard_by_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    q_indices: list[torch.Tensor],
    kv_indices: list[torch.Tensor] | None = None,
) -> list[Shard]:
    """Cut one sequence (q [T, Hq, D], k/v [T, Hkv, D], positions [T]) into per-rank shards.

    Query and KV placement may differ (kv_indices defaults to q_indices), e.g. decode: the new token's
    query on one rank, the KV cache spread over all.
    """
    kv_indices = q_indices if kv_indices is None else kv_indices
    return [
        Shard(q[qi], k[ki], v[ki], positions[qi], positions[ki]) for qi, ki in zip(q_indices, kv_indices)
    ]


def shard_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, world_size: int, layout: str
) -> list[Shard]:
    """Self-attention shards: rank r holds the queries and KV of the same tokens."""
    return shard_by_indices(q, k, v, positions, layout_indices(q.shape[0], world_size, layout))
