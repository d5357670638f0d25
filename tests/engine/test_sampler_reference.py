"""The sampler's pieces against independent references (found by scripts/mutation.sh, docs/testing.md):
the device path's splitmix64 finaliser and Gumbel noise recomputed in plain Python integers (and the
published first splitmix64 output for seed 0), seeding, and top-k at its edges on the host path."""

from __future__ import annotations

import math
import random

import torch

from longbow.services.engine.sampler import _gumbel_noise, _mix64, new_generator, sample_row
from longbow.services.engine.types import SamplingParams

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def mix(z: int) -> int:
    """splitmix64's finaliser on unsigned 64-bit Python ints (Steele, Lea, Flood 2014)."""
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def signed(value: int) -> int:
    value &= MASK
    return value - (1 << 64) if value >= 1 << 63 else value


def test_reference_is_splitmix64():
    assert mix(0 + GOLDEN) == 0xE220A8397B1DCDAF  # splitmix64 seeded with 0: its first output


def test_mix64_equals_the_reference_on_every_bit_pattern_class():
    rng = random.Random(19)
    words = [0, 1, GOLDEN, 1 << 63, (1 << 63) - 1, MASK] + [rng.getrandbits(64) for _ in range(200)]
    got = _mix64(torch.tensor([signed(w) for w in words], dtype=torch.int64)).tolist()
    assert got == [signed(mix(w)) for w in words]


def test_gumbel_noise_equals_the_reference():
    seeds, draws, vocab = [0, 7, 2**62 + 3], [0, 1, 1000], 50
    noise = _gumbel_noise(torch.tensor(seeds), torch.tensor(draws), vocab)  # [R, V]
    for r, (seed, n) in enumerate(zip(seeds, draws)):
        row_key = mix(mix(seed + GOLDEN) + n * GOLDEN)
        for token in range(vocab):
            bits = mix(row_key + mix(token + GOLDEN))
            uniform = ((bits >> 12) + 0.5) * 2.0**-52
            assert abs(noise[r, token].item() - (-math.log(-math.log(uniform)))) < 1e-5, (r, token)


def test_a_seed_repeats_its_draws_and_no_seed_draws_afresh():
    logits, params = torch.zeros(1000), SamplingParams(temperature=1.0)
    runs = [[sample_row(logits, params, g) for _ in range(20)] for g in (new_generator(5, "cpu"),
                                                                         new_generator(5, "cpu"))]
    assert runs[0] == runs[1]
    fresh = [[sample_row(logits, params, new_generator(None, "cpu")) for _ in range(20)] for _ in range(2)]
    assert fresh[0] != fresh[1]  # 1000 equally likely tokens: equal only with probability 1e-60
    for _ in range(64):  # an unseeded generator takes a 63-bit seed from os.urandom: never an overflow
        new_generator(None, "cpu")


def test_top_k_edges():
    logits = torch.tensor([3.0, 2.9, 2.8, -5.0])
    generator = new_generator(1, "cpu")
    assert {sample_row(logits, SamplingParams(temperature=1.0, top_k=1), generator) for _ in range(50)} == {0}
    two = {sample_row(logits, SamplingParams(temperature=1.0, top_k=2), generator) for _ in range(200)}
    assert two == {0, 1}  # the second best is drawn too, and the third never
