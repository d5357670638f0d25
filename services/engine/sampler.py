"""Turning logits into tokens: greedy, temperature, top-k, top-p, min_tokens, seeds.

Every request has its own torch.Generator, seeded from `SamplingParams.seed`, and draws exactly once
per generated token, so a seeded request gives the same output whatever else shares its batches.
Reported logprob and entropy are those of the model's distribution (temperature 1, no cuts).
"""

from __future__ import annotations

import os

import torch

from longbow.services.engine.types import SamplingParams


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return generator


def entropy_and_logprobs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] -> (entropy [R], log-probs [R, V]) in fp32."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return entropy, logprobs


def sample_row(
    logits: torch.Tensor,  # [V] fp32
    params: SamplingParams,
    generator: torch.Generator,
    banned: tuple[int, ...] = (),
) -> int:
    """One token id. `banned` (eos/stop ids while below min_tokens) can never be chosen."""
    if banned:
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
    if params.temperature == 0:
        return int(torch.argmax(logits))
    # Subtract the max before dividing: a tiny temperature (1e-40) would otherwise overflow logits to
    # inf and softmax to NaN; this way it tends to greedy, as it should.
    logits = (logits - logits.max()) / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = _top_p_filter(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # e.g. every token banned: nothing sensible to draw
        raise SamplingError("no token can be sampled: the distribution is empty or not finite")
    return int(torch.multinomial(probs, 1, generator=generator))


class SamplingError(RuntimeError):
    """One request's distribution cannot be sampled; only that request fails."""


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    # Keep the smallest set of tokens whose probability reaches top_p (always at least the top one).
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
