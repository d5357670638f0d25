"""Sampling rules on hand-made logits (no model)."""

from __future__ import annotations

import pytest
import torch

from longbow.services.engine.sampler import SamplingError, entropy_and_logprobs, new_generator, sample_row
from longbow.services.engine.types import SamplingParams


def test_tiny_temperature_tends_to_greedy_without_overflow():
    logits = torch.tensor([1.0, 3.0, 2.9, -5.0])
    for temperature in (1e-45, 1e-30, 1e-6):
        token = sample_row(logits, SamplingParams(temperature=temperature), new_generator(0, "cpu"))
        assert token == 1


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    draws = {sample_row(logits, SamplingParams(temperature=1.0, top_k=2), new_generator(s, "cpu")) for s in range(200)}
    assert draws == {0, 1}
    draws = {sample_row(logits, SamplingParams(temperature=1.0, top_p=0.7), new_generator(s, "cpu")) for s in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    assert {sample_row(logits, SamplingParams(temperature=1.0, top_p=0.01), new_generator(s, "cpu")) for s in range(50)} == {0}


def test_banned_tokens_are_never_drawn_and_all_banned_is_an_error():
    logits = torch.tensor([5.0, 0.0, 0.0])
    assert sample_row(logits, SamplingParams(), new_generator(0, "cpu"), banned=(0,)) in (1, 2)
    with pytest.raises(SamplingError):
        sample_row(logits, SamplingParams(temperature=1.0), new_generator(0, "cpu"), banned=(0, 1, 2))


def test_entropy_of_uniform_is_log_v():
    entropy, logprobs = entropy_and_logprobs(torch.zeros(2, 8))
    assert torch.allclose(entropy, torch.full((2,), torch.log(torch.tensor(8.0)).item()))
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(2))
