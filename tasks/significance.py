"""Paired comparisons of two models scored on the same items, for the promotion gate.

A gate that compares two means flips on noise: on 100 items, three answers more or less move
accuracy by 0.03. These functions say how big the difference between a candidate and production
is, and how sure we can be of it, from per-item scores on the **same** items:

- `mcnemar`: for 0/1 scores (accuracy, exact match). Only the discordant items carry information:
  `b` where the candidate is right and production wrong, `c` the reverse. Under "no difference",
  `b` is Binomial(b + c, 1/2); the exact two-sided p-value is `min(1, 2 P(X <= min(b, c)))`. The
  interval of the difference `(b - c) / n` comes from the exact (Clopper-Pearson) interval of
  `b / (b + c)`, which excludes 1/2 exactly when the p-value is below `1 - confidence`.
- `paired_bootstrap`: for any per-item score (ROUGE-L, ...). Items are resampled with replacement
  (the same indices for both models, which keeps the pairing), `resamples` times with a fixed
  seed, and the percentile interval of the mean difference is reported. Same inputs, same interval.

Both return a `Comparison`: both means, the difference (candidate - production), its two-sided
interval at `confidence`, the number of items and the method; the gate decides on the interval.
Plain Python (and numpy for the bootstrap), pinned by tests with hand-computed values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


class PairingError(ValueError):
    """The two score lists do not describe the same items."""


@dataclass(frozen=True)
class Comparison:
    method: str  # "mcnemar" or "paired_bootstrap"
    items: int
    candidate: float  # mean score of the candidate on the items
    production: float
    difference: float  # candidate - production
    low: float  # two-sided interval of the difference at `confidence`
    high: float
    confidence: float
    p_value: float | None = None  # McNemar's exact p-value for "no difference"
    discordant: tuple[int, int] | None = None  # McNemar's (b, c)

    def as_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["interval"] = [self.low, self.high]
        record["discordant"] = list(self.discordant) if self.discordant else None
        return {key: (round(value, 6) if isinstance(value, float) else value) for key, value in record.items()}


def _check_pairs(candidate: Sequence[float], production: Sequence[float], confidence: float) -> None:
    if len(candidate) != len(production):
        raise PairingError(f"paired scores need the same items: {len(candidate)} candidate scores, {len(production)} production scores")
    if not candidate:
        raise PairingError("paired scores need at least one item")
    if not 0 < confidence < 1:
        raise PairingError(f"confidence must lie between 0 and 1 (got {confidence})")


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)))


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Exact two-sided interval of a binomial proportion (each tail alpha/2), by bisection on the
    binomial CDF (no scipy needed; 60 halvings reach float precision)."""
    alpha = 1 - confidence
    if trials == 0:
        return 0.0, 1.0

    def solve(target: float, tail: Any, increasing: bool) -> float:
        low, high = 0.0, 1.0
        for _ in range(60):
            middle = (low + high) / 2
            if (tail(middle) < target) == increasing:
                low = middle
            else:
                high = middle
        return (low + high) / 2

    # Lower bound: P(X >= successes | p) = alpha/2, increasing in p.
    lower = 0.0 if successes == 0 else solve(alpha / 2, lambda p: 1 - binomial_cdf(successes - 1, trials, p), True)
    # Upper bound: P(X <= successes | p) = alpha/2, decreasing in p.
    upper = 1.0 if successes == trials else solve(alpha / 2, lambda p: binomial_cdf(successes, trials, p), False)
    return lower, upper


def mcnemar(candidate: Sequence[float], production: Sequence[float], confidence: float = 0.95) -> Comparison:
    """Exact McNemar test on 0/1 scores of the same items (see the module docstring)."""
    _check_pairs(candidate, production, confidence)
    if any(score not in (0, 1) for score in (*candidate, *production)):
        raise PairingError("McNemar's test needs 0/1 scores (accuracy, exact match); use the paired bootstrap for others")
    items = len(candidate)
    b = sum(1 for new, old in zip(candidate, production) if new == 1 and old == 0)
    c = sum(1 for new, old in zip(candidate, production) if new == 0 and old == 1)
    discordant = b + c
    p_value = 1.0 if discordant == 0 else min(1.0, 2 * binomial_cdf(min(b, c), discordant, 0.5))
    share_low, share_high = clopper_pearson(b, discordant, confidence)
    # difference = (b - c) / n = (2 b / (b + c) - 1) (b + c) / n
    low = (2 * share_low - 1) * discordant / items
    high = (2 * share_high - 1) * discordant / items
    return Comparison(
        method="mcnemar", items=items, candidate=sum(candidate) / items, production=sum(production) / items,
        difference=(b - c) / items, low=low, high=high, confidence=confidence, p_value=p_value, discordant=(b, c),
    )


def paired_bootstrap(
    candidate: Sequence[float], production: Sequence[float], confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
) -> Comparison:
    """Percentile interval of the mean paired difference over `resamples` resamples of the items
    (fixed seed: the same scores give the same interval on every run)."""
    import numpy as np

    _check_pairs(candidate, production, confidence)
    differences = np.asarray(candidate, dtype=np.float64) - np.asarray(production, dtype=np.float64)
    items = len(differences)
    generator = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // items)  # bounds memory: chunk x items indices at a time
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        means[start:start + count] = differences[generator.integers(0, items, size=(count, items))].mean(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Comparison(
        method="paired_bootstrap", items=items, candidate=float(np.mean(candidate)), production=float(np.mean(production)),
        difference=float(differences.mean()), low=float(low), high=float(high), confidence=confidence,
    )


def compare(candidate: Sequence[float], production: Sequence[float], confidence: float, method: str = "auto") -> Comparison:
    """`auto`: McNemar when every score is 0 or 1, else the paired bootstrap."""
    if method == "auto":
        binary = all(score in (0, 1) for score in (*candidate, *production))
        method = "mcnemar" if binary else "paired_bootstrap"
    if method == "mcnemar":
        return mcnemar(candidate, production, confidence)
    if method in ("bootstrap", "paired_bootstrap"):
        return paired_bootstrap(candidate, production, confidence)
    raise PairingError(f"unknown test {method!r}: use auto, mcnemar or bootstrap")
