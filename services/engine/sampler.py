"""Turning logits into tokens: greedy, temperature, top-k, top-p, min_tokens, seeds.

Two paths live here while the worker moves over (issue 12, item 4):
- `sample_batch` (the device path): every row of a step at once, as tensor ops on the logits' device,
  with no host synchronisation; `SamplingControls.build` makes its per-row inputs on the host with one
  host-to-device copy, and `SampledBatch.to_host` brings the results back with one device-to-host copy.
  Randomness is counter-based: the noise of token t at draw n of a request seeded s is a fixed integer
  hash of (s, n, t), so a seeded request draws the same tokens whatever shares its batch, whichever row
  it sits in, on CPU or CUDA, eager or replayed from a graph. Unseeded requests get a seed drawn once
  when the engine admits them (`request_seed`).
- `sample_row` (the per-request path the worker calls today): one torch.Generator per request, seeded
  from `SamplingParams.seed`, one draw per generated token. Kept until its callers are gone; the device
  path does not use it.
Reported logprob and entropy are those of the model's distribution (temperature 1, no cuts, no bans).
"""

from __future__ import annotations

import math
import os
import secrets
import struct
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

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


# ---------------------------------------------------------------- the device path: every row at once

_MASK64 = (1 << 64) - 1
# splitmix64's constants as signed int64 (torch has no uint64 arithmetic); multiplication wraps mod 2**64.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX_1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX_2 = 0x94D049BB133111EB - (1 << 64)
_CPU_CHUNK_ELEMENTS = 1 << 18  # logits per row chunk in eager CPU sampling (1 MB of fp32)
_CONTROL_COLUMNS = 6  # greedy, inverse temperature, top_k, top_p, seed, num_generated; then banned ids


def request_seed(params: SamplingParams) -> int:
    """The seed a request samples with: its own, or one drawn once at admission (the engine keeps it)."""
    return params.seed if params.seed is not None else secrets.randbits(63)


@dataclass(frozen=True)
class SamplingControls:
    """Per-row sampling inputs of one step, on the logits' device; built once per step by `build`.

    The flags are host facts (from the params), so `sample_batch` branches on them without a sync."""

    greedy: torch.Tensor  # [R] bool: temperature 0
    inverse_temperatures: torch.Tensor  # [R] fp32, 1 on greedy rows
    top_k: torch.Tensor  # [R] int64, 0: no cut
    top_p: torch.Tensor  # [R] fp32, 1: no cut
    seeds: torch.Tensor  # [R] int64
    num_generated: torch.Tensor  # [R] int64: tokens the request generated before this draw
    banned_token_ids: torch.Tensor  # [R, B] int64, -1 pads: eos/stop ids of rows still below min_tokens
    all_greedy: bool
    any_greedy: bool
    any_banned: bool
    max_top_k: int  # largest top_k asked for; 0 when no row cuts by top-k
    any_top_p: bool

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        num_generated: list[int],
        eos_token_ids: tuple[int, ...],
        device: torch.device | str,
    ) -> SamplingControls:
        """Row r samples for a request with params[r], seed seeds[r] (`request_seed`), which has
        generated num_generated[r] tokens so far. One host-to-device copy."""
        banned = [_banned_ids(p, n, eos_token_ids) for p, n in zip(params, num_generated)]
        width = max((len(ids) for ids in banned), default=0)
        rows = [_control_row(p, s, n) + list(ids) + [-1] * (width - len(ids))
                for p, s, n, ids in zip(params, seeds, num_generated, banned)]
        device = torch.device(device)
        packed = torch.tensor(rows, dtype=torch.int64).reshape(len(params), _CONTROL_COLUMNS + width)
        if device.type == "cuda":
            packed = packed.pin_memory()
        packed = packed.to(device, non_blocking=True)  # [R, 6 + B]
        top_k = [p.top_k for p in params if p.temperature > 0]
        return cls(
            greedy=packed[:, 0].bool(),
            inverse_temperatures=packed[:, 1].view(torch.float64).float(),
            top_k=packed[:, 2],
            top_p=packed[:, 3].view(torch.float64).float(),
            seeds=packed[:, 4],
            num_generated=packed[:, 5],
            banned_token_ids=packed[:, _CONTROL_COLUMNS:],
            all_greedy=all(p.temperature == 0 for p in params),  # bans are applied before the argmax
            any_greedy=any(p.temperature == 0 for p in params),
            any_banned=width > 0,
            max_top_k=max(top_k, default=0),
            any_top_p=any(p.top_p < 1.0 for p in params if p.temperature > 0),
        )

    def rows(self, start: int, stop: int) -> SamplingControls:
        """The controls of rows [start, stop); the host flags stay those of the whole batch (still true
        statements about any slice, so a slice may take a more general path, never a wrong one)."""
        return replace(self, **{f.name: getattr(self, f.name)[start:stop] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def _banned_ids(params: SamplingParams, num_generated: int, eos_token_ids: tuple[int, ...]) -> list[int]:
    # The same rule as worker.Sampler._sample: below min_tokens, stop ids and (unless ignore_eos) eos ids.
    if num_generated >= params.min_tokens:
        return []
    return sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids)))


def _control_row(params: SamplingParams, seed: int, num_generated: int) -> list[int]:
    greedy = params.temperature == 0
    # NOTE: the inverse temperature, computed in float64 and capped at fp32's max, replaces a division
    # by a temperature that fp32 would round to 0 or to a subnormal (1e-45; GPUs may flush those to 0).
    inverse_temperature = 1.0 if greedy else min(1.0 / params.temperature, 3.0e38)
    top_p = params.top_p if not greedy else 1.0
    return [int(greedy), _float_bits(inverse_temperature), params.top_k if not greedy else 0,
            _float_bits(top_p), _signed64(seed), num_generated]


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]  # the float64's bits as a signed int64


def _signed64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class SampledBatch:
    """One step's draws, on the device. A failed row (nothing can be drawn: every token banned, or
    non-finite logits) has token -1 and NaN logprob; only its request fails."""

    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor  # [R] fp32: of the drawn token under the model's distribution
    entropies: torch.Tensor  # [R] fp32: of the model's distribution
    failed: torch.Tensor  # [R] bool

    def to_host(self) -> HostSamples:
        """Python lists, in one device-to-host copy (float64 holds token ids and fp32 values exactly)."""
        columns = (self.token_ids, self.logprobs, self.entropies, self.failed)
        token_ids, logprobs, entropies, failed = torch.stack([c.double() for c in columns]).cpu().tolist()
        return HostSamples([int(t) for t in token_ids], logprobs, entropies, [bool(f) for f in failed])


class HostSamples(NamedTuple):
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    failed: list[bool]


def sample_batch(logits: torch.Tensor, controls: SamplingControls) -> SampledBatch:
    """logits [R, V] (fp32 or bf16, any device) -> one token per row; no host synchronisation.

    Branches only on the host flags of `controls`, so it traces with torch.compile(fullgraph=True)."""
    rows, vocab_size = logits.shape
    chunk = max(1, _CPU_CHUNK_ELEMENTS // vocab_size)
    if logits.device.type != "cpu" or rows <= chunk or torch.compiler.is_compiling():
        return _sample_rows(logits, controls)
    # NOTE: eager CPU runs cache-sized row chunks: each op is a full pass over [R, V], and at R=64,
    # V=49152 (12.6 MB per fp32 pass) the greedy path ran 1.7x slower whole than in chunks of 4-8 rows
    # (memory-bound). Rows are independent, so the result is the same; compiled code fuses instead.
    parts = [_sample_rows(logits[i:i + chunk], controls.rows(i, i + chunk)) for i in range(0, rows, chunk)]
    return SampledBatch(*(torch.cat(columns) for columns in zip(*(
        (p.token_ids, p.logprobs, p.entropies, p.failed) for p in parts))))


def _sample_rows(logits: torch.Tensor, controls: SamplingControls) -> SampledBatch:
    logits = logits.float()  # [R, V]
    logprobs, entropies = _model_distribution(logits)  # [R, V], [R]
    allowed = _ban(logits, controls.banned_token_ids) if controls.any_banned else logits  # [R, V]
    row_max = allowed.amax(dim=-1, keepdim=True)  # [R, 1]
    failed = ~torch.isfinite(row_max.squeeze(-1))  # all banned (-inf), or NaN / inf logits
    if controls.all_greedy:
        tokens = allowed.argmax(dim=-1)  # the fast path: no sort, no noise
    else:
        tokens = _draw(allowed, row_max, controls)
    tokens = tokens.masked_fill(failed, -1)  # [R]
    chosen = logprobs.gather(1, tokens.clamp(min=0).unsqueeze(1)).squeeze(1)  # [R]
    return SampledBatch(tokens, chosen.masked_fill(failed, math.nan), entropies, failed)


def _model_distribution(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] fp32 -> (log-probs [R, V], entropy [R])."""
    logprobs = torch.log_softmax(logits, dim=-1)
    # A token at -inf has probability 0 and must add 0 to the entropy, not 0 * -inf = NaN: the clamp to
    # the lowest finite fp32 does it in one cheap op (NOTE: torch.where here cost 7x the log-softmax on CPU).
    finite = logprobs.clamp(min=torch.finfo(torch.float32).min)
    return logprobs, -(logprobs.exp() * finite).sum(-1)


def _ban(logits: torch.Tensor, banned_token_ids: torch.Tensor) -> torch.Tensor:
    """logits [R, V], banned ids [R, B] (-1 pads) -> logits with those ids at -inf."""
    vocab_size = logits.shape[-1]
    # Pads and ids outside the vocabulary land in a spare column V, dropped after the scatter, so no
    # index can fault on the device.
    outside = (banned_token_ids < 0) | (banned_token_ids >= vocab_size)
    columns = banned_token_ids.masked_fill(outside, vocab_size)  # [R, B]
    mask = torch.zeros(logits.shape[0], vocab_size + 1, dtype=torch.bool, device=logits.device)
    mask = mask.scatter(1, columns, True)[:, :vocab_size]  # [R, V]
    return logits.masked_fill(mask, float("-inf"))


def _draw(allowed: torch.Tensor, row_max: torch.Tensor, controls: SamplingControls) -> torch.Tensor:
    """allowed [R, V] (bans at -inf), row_max [R, 1] -> tokens [R]: temperature, cuts, then a Gumbel-max
    draw; greedy rows of a mixed batch take their argmax."""
    # Subtract the max before scaling: a tiny temperature (1e-40) then tends to greedy instead of
    # overflowing to inf and NaN. Max-subtracted logits are log-probabilities up to a per-row constant.
    scores = (allowed - row_max) * controls.inverse_temperatures.unsqueeze(1)  # [R, V], max 0
    if controls.max_top_k > 0 or controls.any_top_p:
        scores = scores.masked_fill(scores < _cut_threshold(scores, controls), float("-inf"))
    # Gumbel-max: argmax(log p + Gumbel noise) is a draw from p. Cut and banned tokens stay at -inf.
    noise = _gumbel_noise(controls.seeds, controls.num_generated, allowed.shape[-1])  # [R, V]
    tokens = (scores + noise).argmax(dim=-1)  # [R]
    if controls.any_greedy:
        tokens = torch.where(controls.greedy, allowed.argmax(dim=-1), tokens)
    return tokens


def _cut_threshold(scores: torch.Tensor, controls: SamplingControls) -> torch.Tensor:
    """scores [R, V] (row max 0) -> [R, 1]: the lowest score top-k and top-p keep; ties with it stay.

    Top-p applies to the distribution left after top-k, as in `sample_row`; rows with top_k 0 and
    top_p 1 get -inf (nothing cut)."""
    vocab_size = scores.shape[-1]
    k = torch.where((controls.top_k > 0) & (controls.top_k < vocab_size), controls.top_k, vocab_size)  # [R]
    if not controls.any_top_p:
        # Top-k only: a partial sort up to the largest k asked for is enough.
        width = min(controls.max_top_k, vocab_size)
        largest = scores.topk(width, dim=-1).values  # [R, width], descending
        kth = largest.gather(1, (k.clamp(max=width) - 1).unsqueeze(1))  # [R, 1]
        return torch.where(controls.top_k.unsqueeze(1) > 0, kth, float("-inf"))
    ordered = scores.sort(dim=-1, descending=True).values  # [R, V]
    rank = torch.arange(vocab_size, device=scores.device)  # [V]
    in_top_k = rank.unsqueeze(0) < k.unsqueeze(1)  # [R, V]
    probs = torch.softmax(ordered.masked_fill(~in_top_k, float("-inf")), dim=-1)  # [R, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [R, V]: probability of the better-ranked tokens
    # The smallest prefix whose mass reaches top_p; rank 0 always stays (mass_before 0 < top_p). Rows
    # with top_p 1 skip the test: fp32 cumsum can reach 1 before the tail ends.
    top_p = controls.top_p.unsqueeze(1)  # [R, 1]
    keep = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))  # [R, V], a prefix of each row
    kept = keep.sum(dim=-1, keepdim=True).clamp(min=1)  # [R, 1]
    return ordered.gather(1, kept - 1)


def _gumbel_noise(seeds: torch.Tensor, num_generated: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seeds [R], num_generated [R] -> Gumbel(0, 1) noise [R, V] fp32, a pure function of
    (seed, num_generated, token id): independent of the batch, the row and the device.

    Integer ops only up to the uniform (exact everywhere): splitmix64's finaliser keys each (seed, draw)
    pair and each token id, and mixes the two keys' sum. The float transform may differ by an ulp between
    devices, which could only change a draw whose two best candidates tie to within that ulp."""
    row_keys = _mix64(_mix64(seeds + _GOLDEN) + num_generated * _GOLDEN)  # [R]
    # NOTE: token keys are mixed, not splitmix64's `(t + 1) * golden` counters: inductor's CPU codegen
    # (torch 2.13) treats arange times a 64-bit constant as an index expression and writes out of bounds.
    token_keys = _mix64(torch.arange(vocab_size, device=seeds.device) + _GOLDEN)  # [V]
    bits = _mix64(row_keys.unsqueeze(1) + token_keys.unsqueeze(0))  # [R, V]
    # The top 52 bits as a uniform in (0, 1): (m + 0.5) / 2**52 is exact in float64 and never 0 or 1.
    uniform = (_shift_right_logical(bits, 12).double() + 0.5) * 2.0**-52
    return (-torch.log(-torch.log(uniform))).float()


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (a bijection of 64-bit words)."""
    z = (z ^ _shift_right_logical(z, 30)) * _MIX_1
    z = (z ^ _shift_right_logical(z, 27)) * _MIX_2
    return z ^ _shift_right_logical(z, 31)


def _shift_right_logical(z: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic (copies the sign bit); masking the top bits makes it logical.
    return (z >> bits) & ((1 << (64 - bits)) - 1)
