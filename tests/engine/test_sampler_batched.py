"""The batched device sampler (`sample_batch`) on hand-made logits, checked against independent
per-row references written here in float64. CPU only and small vocabularies; the CUDA test runs where
a GPU is present."""

from __future__ import annotations

import math
import random

import pytest
import torch

from longbow.services.engine.sampler import (
    SamplingControls,
    _gumbel_noise,
    _sample_rows,
    entropy_and_logprobs,
    request_seed,
    sample_batch,
)
from longbow.services.engine.types import SamplingParams

EOS = (0,)
MASK64 = (1 << 64) - 1


def controls(params, seeds=None, num_generated=None, eos=EOS, device="cpu") -> SamplingControls:
    seeds = seeds if seeds is not None else list(range(len(params)))
    num_generated = num_generated if num_generated is not None else [0] * len(params)
    return SamplingControls.build(params, seeds, num_generated, eos, device)


def draw(logits, params, seeds=None, num_generated=None, eos=EOS) -> list[int]:
    return sample_batch(logits, controls(params, seeds, num_generated, eos)).to_host().token_ids


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------- seeds and the noise hash

def _noise_reference(seed: int, num_generated: int, token: int) -> float:
    """The documented hash in plain Python integers (unbounded, masked to 64 bits): the uniform in
    (0, 1) that token `token` gets at draw `num_generated` of a request seeded `seed`."""
    golden = 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z &= MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    row_key = mix(mix(seed + golden) + num_generated * golden)
    bits = mix(row_key + mix(token + golden))
    return ((bits >> 12) + 0.5) * 2.0**-52


def test_noise_is_the_documented_integer_hash():
    # Pins the hash: int64 tensor ops (wrapping multiply, masked arithmetic shifts) must equal exact
    # unsigned 64-bit arithmetic, including seeds with the sign bit set. Changing the hash changes every
    # seeded output, which must be a deliberate decision.
    seeds = [0, 1, 12345, (1 << 63) - 1, -1, -(1 << 63)]
    steps = [0, 7, 3, 1 << 40, 2, 0]
    noise = _gumbel_noise(torch.tensor(seeds), torch.tensor(steps), 50).double()  # [6, 50]
    for row, (seed, step) in enumerate(zip(seeds, steps)):
        for token in (0, 1, 17, 49):
            uniform = _noise_reference(seed & MASK64, step, token)
            expected = -math.log(-math.log(uniform))
            assert noise[row, token].item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_seeded_rows_reproduce_whatever_shares_the_batch_and_in_any_row():
    vocab = 40
    target_params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=7)
    target_logits = random_logits(1, vocab, seed=1)
    others = [SamplingParams(), SamplingParams(temperature=1.3), SamplingParams(temperature=0.5, top_p=0.5),
              SamplingParams(temperature=1.0, top_k=3, min_tokens=5, stop_token_ids=(4, 5))]
    for step in range(5):  # several draws of the same request
        alone = draw(target_logits, [target_params], seeds=[7], num_generated=[step])[0]
        for trial in range(6):
            companions = random.Random(trial).sample(others, k=trial % len(others) + 1)
            position = trial % (len(companions) + 1)
            params = companions[:position] + [target_params] + companions[position:]
            logits = random_logits(len(params), vocab, seed=100 + trial)
            logits[position] = target_logits[0]
            seeds = [1000 + i for i in range(len(params))]
            seeds[position] = 7
            counts = [3] * len(params)
            counts[position] = step
            assert draw(logits, params, seeds, counts)[position] == alone


def test_draws_differ_across_seeds_and_steps():
    logits = torch.zeros(64, 1000)  # uniform: repeated tokens would mean correlated noise
    by_seed = draw(logits, [SamplingParams(temperature=1.0)] * 64, seeds=list(range(64)))
    by_step = draw(logits, [SamplingParams(temperature=1.0)] * 64, seeds=[5] * 64, num_generated=list(range(64)))
    assert len(set(by_seed)) > 55 and len(set(by_step)) > 55  # ~62 distinct expected for 64 of 1000


def test_unseeded_requests_get_a_seed_at_admission():
    assert request_seed(SamplingParams(seed=3)) == 3
    drawn = {request_seed(SamplingParams()) for _ in range(8)}
    assert len(drawn) == 8 and all(0 <= s < 1 << 63 for s in drawn)


# ---------------------------------------------------------------- greedy and temperature

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_equals_argmax(dtype):
    logits = random_logits(16, 300, seed=2).to(dtype)
    params = [SamplingParams()] * 16
    assert controls(params).all_greedy
    assert draw(logits, params) == logits.float().argmax(-1).tolist()
    # Greedy rows among sampled rows take the argmax too.
    mixed = [SamplingParams(temperature=1.0 if i % 2 else 0.0, top_p=0.9) for i in range(16)]
    tokens = draw(logits, mixed)
    assert [tokens[i] for i in range(0, 16, 2)] == logits.float().argmax(-1)[::2].tolist()


def test_tiny_temperature_tends_to_greedy_without_overflow():
    logits = torch.tensor([[1.0, 3.0, 2.9, -5.0]]).repeat(4, 1)
    for temperature in (1e-45, 1e-40, 1e-30, 1e-6):
        params = [SamplingParams(temperature=temperature, top_p=p) for p in (1.0, 0.5, 1.0, 0.9)]
        batch = sample_batch(logits, controls(params, seeds=[0, 1, 2, 3])).to_host()
        assert batch.token_ids == [1, 1, 1, 1] and not any(batch.failed)


def test_reported_logprob_and_entropy_are_of_the_model_distribution():
    logits = random_logits(6, 50, seed=3)
    params = [SamplingParams(temperature=0.3, top_k=2, min_tokens=1, stop_token_ids=(9,))] * 3 + [SamplingParams()] * 3
    batch = sample_batch(logits, controls(params)).to_host()
    entropy, logprobs = entropy_and_logprobs(logits)  # temperature 1, no cuts, no bans
    for row, token in enumerate(batch.token_ids):
        assert batch.logprobs[row] == pytest.approx(logprobs[row, token].item(), abs=1e-5)
        assert batch.entropies[row] == pytest.approx(entropy[row].item(), abs=1e-5)


def test_bf16_and_fp32_logits_sample_alike():
    logits = random_logits(8, 64, seed=4).bfloat16()
    params = [SamplingParams(temperature=0.8, top_p=0.9)] * 8
    assert draw(logits, params) == draw(logits.float(), params)


# ---------------------------------------------------------------- cuts, against a per-row reference

def _allowed_reference(logits: torch.Tensor, params: SamplingParams) -> tuple[set[int], float]:
    """The tokens top-k then top-p keep for one row (float64, per row), and the distance of the nucleus
    boundary from top_p (a tiny margin would make fp32 and float64 disagree legitimately)."""
    probs = torch.softmax(logits.double() / params.temperature, -1)
    order = torch.argsort(probs, descending=True).tolist()
    if params.top_k > 0:
        order = order[: params.top_k]
    if params.top_p >= 1.0:
        return set(order), math.inf
    kept_probs = probs[order] / probs[order].sum()
    kept, mass, margin = [], 0.0, math.inf
    for token, p in zip(order, kept_probs.tolist()):
        if mass >= params.top_p:
            break
        margin = min(margin, abs(mass - params.top_p))
        kept.append(token)
        mass += p
    return set(kept), margin


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (17, 1.0), (0, 0.3), (0, 0.8), (0, 0.95), (8, 0.6),
                                         (1, 0.99), (3, 0.999)])  # top-k binding inside the top-p path
def test_cuts_never_emit_a_token_outside_the_reference_set(top_k, top_p):
    vocab, draws = 64, 400
    for case in range(3):
        logits = random_logits(1, vocab, seed=10 * case + top_k)[0]
        params = SamplingParams(temperature=0.7 + 0.3 * case, top_k=top_k, top_p=top_p)
        allowed, margin = _allowed_reference(logits, params)
        assert margin > 1e-4, "test case too close to the nucleus boundary: pick another seed"
        # Many seeds in one call, each row its own seed; other rows uncut, so per-row values matter.
        params_rows = [params if i % 4 else SamplingParams(temperature=1.0) for i in range(draws)]
        tokens = draw(logits.repeat(draws, 1), params_rows, seeds=list(range(draws)))
        cut_rows = {tokens[i] for i in range(draws) if i % 4}
        assert cut_rows <= allowed
        assert len(cut_rows) == len(allowed) or len(allowed) > 10  # small sets get fully explored
        if top_k == 1:
            assert cut_rows == {int(logits.argmax())}
    uncut = {tokens[i] for i in range(0, draws, 4)}
    assert len(uncut) > 1  # the uncut rows were not cut by their neighbours' values


# ---------------------------------------------------------------- the distribution itself

def _chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    expected = probs.double() * len(tokens)
    support = expected > 0
    assert counts[~support].sum() == 0, "a token of zero probability was drawn"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


# The 0.9999 quantile of chi-square with d degrees of freedom; the draws are deterministic (fixed seeds),
# so this only bounds how unlucky the fixed seeds may be for a correct sampler (1 in 10,000).
CHI2_9999 = {2: 18.42, 3: 21.11, 5: 25.74}


@pytest.mark.parametrize("over", ["seeds", "steps"])
def test_empirical_distribution_matches_softmax_over_temperature(over):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature, n = 0.7, 20_000
    params = [SamplingParams(temperature=temperature)] * n
    if over == "seeds":  # many requests, first draw each
        tokens = draw(logits.repeat(n, 1), params, seeds=list(range(n)))
    else:  # one request, many consecutive draws
        tokens = draw(logits.repeat(n, 1), params, seeds=[99] * n, num_generated=list(range(n)))
    expected = torch.softmax(logits / temperature, -1)
    assert _chi_square(tokens, expected) < CHI2_9999[5]
    empirical = torch.bincount(torch.tensor(tokens), minlength=6).double() / n
    assert 0.5 * (empirical - expected.double()).abs().sum() < 0.02  # total variation; ~0.006 typical


def test_cut_distribution_is_the_renormalised_nucleus():
    logits = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    n = 20_000
    # top_k 4 keeps 0.4/0.25/0.15/0.1, renormalised 0.444/0.278/0.167/0.111; top_p 0.75 then keeps the
    # first three (the mass before the third, 0.722, is below 0.75; before the fourth, 0.889, is not).
    params = [SamplingParams(temperature=1.0, top_k=4, top_p=0.75)] * n
    tokens = draw(logits.repeat(n, 1), params, seeds=list(range(n)))
    expected = torch.tensor([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8
    assert _chi_square(tokens, expected) < CHI2_9999[2]


# ---------------------------------------------------------------- min_tokens and failures

def test_min_tokens_bans_eos_and_stop_ids_until_the_count_then_releases():
    vocab = 12
    logits = torch.full((1, vocab), -2.0)
    logits[0, 0], logits[0, 7], logits[0, 3] = 10.0, 9.0, 1.0  # eos 0 best, stop id 7 next, then 3
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, top_k=3, min_tokens=3, stop_token_ids=(7,))
        ignore = SamplingParams(temperature=temperature, top_k=3, min_tokens=3, stop_token_ids=(7,), ignore_eos=True)
        for generated in range(5):
            rows = [params, ignore] * 8
            tokens = draw(logits.repeat(16, 1), rows, seeds=list(range(16)), num_generated=[generated] * 16)
            if generated < 3:
                assert all(t not in (0, 7) for t in tokens[0::2])  # eos and stop id banned
                assert all(t != 7 for t in tokens[1::2])  # ignore_eos: eos allowed, stop id still banned
                if temperature == 0:
                    assert tokens[0::2] == [3] * 8 and tokens[1::2] == [0] * 8
            elif temperature == 0:
                assert tokens == [0] * 16  # released at the count: eos wins again


def test_a_failed_row_fails_alone():
    vocab = 5
    logits = random_logits(4, vocab, seed=5)
    logits[2] = float("nan")
    every_token = tuple(range(1, vocab))  # with eos 0: the whole vocabulary
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=every_token),
              SamplingParams(), SamplingParams(min_tokens=2, stop_token_ids=every_token)]
    batch = sample_batch(logits, controls(params, seeds=[11, 12, 13, 14])).to_host()
    assert batch.failed == [False, True, True, True]
    assert batch.token_ids[1:] == [-1, -1, -1] and all(math.isnan(lp) for lp in batch.logprobs[1:])
    alone = draw(logits[:1], params[:1], seeds=[11])
    assert batch.token_ids[0] == alone[0] and math.isfinite(batch.logprobs[0])


def test_banned_ids_outside_the_vocabulary_are_ignored():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    params = [SamplingParams(min_tokens=1, stop_token_ids=(1,))]
    assert draw(logits, params, eos=(50_000,)) == [2]


def test_cpu_row_chunks_give_the_whole_batch_result():
    vocab = 50_000  # 5 rows per CPU chunk: 12 rows run as 3 chunks
    logits = random_logits(12, vocab, seed=9)
    params = [SamplingParams(temperature=[0.0, 0.9, 1.2][i % 3], top_k=[0, 40][i % 2], top_p=[1.0, 0.9][i % 2],
                             min_tokens=1, stop_token_ids=(5,)) for i in range(12)]
    control = controls(params, seeds=list(range(12)), num_generated=[0] * 12)
    chunked, whole = sample_batch(logits, control), _sample_rows(logits, control)
    for name in ("token_ids", "logprobs", "entropies", "failed"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name


# ---------------------------------------------------------------- no host synchronisation

PATHS = {
    "greedy": [SamplingParams()] * 3,
    "greedy_banned": [SamplingParams(min_tokens=1), SamplingParams(), SamplingParams()],
    "sampled": [SamplingParams(temperature=0.8)] * 3,
    "top_k": [SamplingParams(temperature=0.8, top_k=4), SamplingParams(temperature=1.0), SamplingParams()],
    "top_p": [SamplingParams(temperature=0.8, top_p=0.9, min_tokens=2, stop_token_ids=(3,)),
              SamplingParams(temperature=1.0, top_k=5), SamplingParams()],
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_sample_batch_traces_as_one_graph(path):
    # The design's CPU proxy for CUDA-graph safety: fullgraph=True raises on any graph break, which
    # every host synchronisation (.item(), .tolist(), bool(tensor), data-dependent Python) causes.
    torch._dynamo.reset()
    logits = random_logits(3, 32, seed=6)
    control = controls(PATHS[path], seeds=[1, 2, 3], num_generated=[0, 1, 5])
    compiled = torch.compile(sample_batch, fullgraph=True, backend="eager")
    traced, eager = compiled(logits, control), sample_batch(logits, control)
    assert torch.equal(traced.token_ids, eager.token_ids)


@pytest.mark.slow
def test_inductor_code_matches_eager():
    # Inductor generates its own C++ for the int64 hash (wrapping multiply, shifts): it must agree.
    torch._dynamo.reset()
    logits = random_logits(64, 500, seed=7)
    params = [SamplingParams(temperature=float(i % 3), top_p=0.9 if i % 2 else 1.0, top_k=i % 7, min_tokens=i % 2,
                             stop_token_ids=(3,)) for i in range(64)]
    control = controls(params, seeds=list(range(64)), num_generated=list(range(64)))
    compiled = torch.compile(sample_batch, fullgraph=True)
    assert torch.equal(compiled(logits, control).token_ids, sample_batch(logits, control).token_ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_cpu_draws_without_synchronising():
    logits = random_logits(64, 4096, seed=8)
    params = [SamplingParams(temperature=[0.0, 0.7, 1.0, 1.5][i % 4], top_k=[0, 50][i % 2],
                             top_p=[1.0, 0.9, 0.5][i % 3], min_tokens=i % 3, stop_token_ids=(5,)) for i in range(64)]
    seeds, steps = list(range(64)), [i % 5 for i in range(64)]
    on_cpu = sample_batch(logits, controls(params, seeds, steps)).to_host()
    control = controls(params, seeds, steps, device="cuda")
    device_logits = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside raises
    try:
        batch = sample_batch(device_logits, control)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_gpu = batch.to_host()
    mismatches = sum(a != b for a, b in zip(on_cpu.token_ids, on_gpu.token_ids))
    assert mismatches <= 1  # only a within-an-ulp tie of the float transform may differ
    assert on_gpu.failed == on_cpu.failed


# ---------------------------------------------------------------- edges found by the mutation check

def test_greedy_rows_of_a_mixed_batch_take_the_argmax():
    """Greedy rows beside rows sampled at a temperature other than 1 (the batch takes the sampling path)."""
    logits = random_logits(40, 64, seed=3, scale=0.5)  # flat: a sampled row would often miss the argmax
    params = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=0.7) for i in range(40)]
    tokens = draw(logits, params)
    assert [tokens[i] for i in range(1, 40, 2)] == logits[1::2].argmax(dim=-1).tolist()
    assert any(tokens[i] != int(logits[i].argmax()) for i in range(0, 40, 2))  # the others were sampled


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_single_banned_id_is_banned(temperature):
    """min_tokens with one eos id and no stop ids: a ban list one id wide."""
    logits = random_logits(16, 32, seed=4)
    logits[:, 5] = 50.0  # eos would win every draw
    params = [SamplingParams(temperature=temperature, min_tokens=2)] * 16
    tokens = draw(logits, params, num_generated=[1] * 16, eos=(5,))
    assert 5 not in tokens
    assert draw(logits, params, num_generated=[2] * 16, eos=(5,)) == [5] * 16  # released at the count


def test_seeds_past_two_to_the_63_are_the_same_bits():
    """Seeds are uint64 in the API; the sampler keeps them as int64 with the same bits."""
    logits = random_logits(3, 64, seed=5)
    params = [SamplingParams(temperature=1.0)] * 3
    big = [2**63, 2**63 + 7, 2**64 - 1]
    assert draw(logits, params, seeds=big) == draw(logits, params, seeds=[b - 2**64 for b in big])
    noise = _gumbel_noise(torch.tensor([b - 2**64 for b in big]), torch.zeros(3, dtype=torch.int64), 64)
    assert torch.isfinite(noise).all()


def test_the_logprob_of_token_zero_is_its_own():
    logits = random_logits(2, 32, seed=6)
    logits[:, 0] = 20.0
    result = sample_batch(logits, controls([SamplingParams(temperature=0.0)] * 2, eos=(31,))).to_host()
    assert result.token_ids == [0, 0]
    expected = torch.log_softmax(logits, dim=-1)[:, 0].tolist()
    assert result.logprobs == pytest.approx(expected, abs=1e-6)
