"""Scores for rag/ evaluations: answers (exact match and token F1 after SQuAD normalisation, gold
containment), segmentations (boundary F1 with a tolerance, Pk), a Wilson interval for small samples, and
paired tests of two systems on the same questions (exact sign test, paired bootstrap)."""

from __future__ import annotations

import collections
import math
import re
import string

import numpy as np


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and the articles a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall over normalised tokens (SQuAD); 1.0 when both empty."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def answer_contains(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold answer occurs as whole words in the normalised prediction."""
    return float(f" {normalize_answer(gold)} " in f" {normalize_answer(prediction)} ")


def boundary_f1(predicted: list[int], gold: list[int], tolerance: int = 0) -> float:
    """F1 of predicted boundary offsets against gold ones; a prediction within `tolerance` of a gold
    boundary matches it, each gold boundary at most once (greedy by distance). 1.0 when both are empty."""
    if not predicted and not gold:
        return 1.0
    pairs = sorted((abs(p - g), i, j) for i, p in enumerate(predicted) for j, g in enumerate(gold)
                   if abs(p - g) <= tolerance)
    used_predicted, used_gold = set(), set()
    for _, i, j in pairs:
        if i not in used_predicted and j not in used_gold:
            used_predicted.add(i)
            used_gold.add(j)
    matched = len(used_gold)
    if matched == 0:
        return 0.0
    precision, recall = matched / len(predicted), matched / len(gold)
    return 2 * precision * recall / (precision + recall)


def pk(predicted: list[int], gold: list[int], length: int, window: int | None = None) -> float:
    """Beeferman's Pk over character positions of a text of `length` chars: the share of position pairs
    (i, i + window) on which prediction and gold disagree about being in the same segment. window
    defaults to half the mean gold segment length. 0 is perfect; lower is better."""
    if window is None:
        window = max(1, round(length / (len(gold) + 1) / 2))
    if length <= window:
        return 0.0
    starts = np.arange(length - window)
    same_gold = _segment_of(gold, starts) == _segment_of(gold, starts + window)
    same_predicted = _segment_of(predicted, starts) == _segment_of(predicted, starts + window)
    return float(np.mean(same_gold != same_predicted))


def _segment_of(boundaries: list[int], positions: np.ndarray) -> np.ndarray:
    # a boundary b starts a new segment at position b
    return np.searchsorted(np.asarray(sorted(boundaries), dtype=np.int64), positions, side="right")


def wilson_interval(successes: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (successes may be fractional sums of 0/1 scores)."""
    if total == 0:
        return 0.0, 1.0
    share = successes / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test (McNemar's exact test on 0/1 scores): the probability, with wins and
    losses equally likely, of a split at least as uneven as this one. Ties are left out; 1.0 when none."""
    trials = wins + losses
    if trials == 0:
        return 1.0
    extreme = min(wins, losses)
    tail = sum(math.comb(trials, k) for k in range(extreme + 1)) / 2 ** trials
    return min(1.0, 2 * tail)


def paired_bootstrap(better: list[float], baseline: list[float], samples: int = 10_000,
                     seed: int = 0) -> float:
    """One-sided paired bootstrap p-value that `better` does not beat `baseline` on average: the share of
    resamples of the questions (with replacement, same questions for both) whose mean difference is <= 0."""
    if len(better) != len(baseline) or not better:
        raise ValueError("paired_bootstrap needs two score lists of the same, non-zero length")
    differences = np.asarray(better, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(samples, len(differences)))
    return float(np.mean(differences[picks].mean(axis=1) <= 0))
