"""Confidence intervals: seeded case-level bootstrap, paired bootstrap, Clopper-Pearson.

Every resampling is over *cases* (a patient is the unit of analysis, as in PI-CAI), with a
`numpy.random.default_rng(seed)` so the same seed gives the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

Statistic = Callable[[np.ndarray], float]  # indices of the resampled cases -> value


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided confidence interval."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def to_dict(self) -> dict[str, float | list[float]]:
        return {"value": self.value, "ci": [self.low, self.high], "level": self.level}


def _finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return a[np.isfinite(a)]


def bootstrap_ci(
    n_cases: int,
    statistic: Statistic,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Percentile bootstrap interval of `statistic` over `n_cases` resampled with replacement.

    Resamples where the statistic is undefined (NaN, e.g. AUROC of a resample with one class)
    are dropped; an all-NaN bootstrap gives a NaN interval.
    """
    if n_cases <= 0:
        raise ValueError("n_cases must be positive")
    point = float(statistic(np.arange(n_cases)))
    rng = np.random.default_rng(seed)
    samples = _finite([statistic(rng.integers(0, n_cases, n_cases)) for _ in range(n_bootstrap)])
    if samples.size == 0:
        return Interval(point, math.nan, math.nan, level)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(point, float(low), float(high), level)


@dataclass(frozen=True)
class PairedDifference:
    """Difference `b - a` of a statistic on the same cases, with a paired bootstrap test."""

    a: float
    b: float
    difference: Interval
    p_value: float  # two-sided: how often the resampled difference falls on the other side of 0
    n_bootstrap: int

    def to_dict(self) -> dict[str, object]:
        return {
            "a": self.a,
            "b": self.b,
            "difference": self.difference.to_dict(),
            "p_value": self.p_value,
            "n_bootstrap": self.n_bootstrap,
        }


def paired_bootstrap(
    n_cases: int,
    statistic_a: Statistic,
    statistic_b: Statistic,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifference:
    """Resample the cases once per round and evaluate both models on the same resample."""
    if n_cases <= 0:
        raise ValueError("n_cases must be positive")
    everything = np.arange(n_cases)
    a, b = float(statistic_a(everything)), float(statistic_b(everything))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n_cases, n_cases)
        diffs.append(statistic_b(idx) - statistic_a(idx))
    d = _finite(diffs)
    if d.size == 0:
        nan = math.nan
        return PairedDifference(a, b, Interval(b - a, nan, nan, level), nan, n_bootstrap)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(d, [tail, 100 - tail])
    # two-sided bootstrap p-value for H0: difference == 0 (proportion on the far side, doubled)
    p = 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0)))
    return PairedDifference(
        a, b, Interval(b - a, float(low), float(high), level), min(p, 1.0), n_bootstrap
    )


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval for a proportion (NaNs when `trials` is 0)."""
    if trials == 0:
        return (math.nan, math.nan)
    alpha = 1.0 - level
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = (
        1.0
        if successes == trials
        else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    )
    return (low, high)


def clopper_pearson_lower(successes: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound: the true proportion is >= this with `confidence`."""
    if trials == 0:
        return 0.0
    if successes == 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, successes, trials - successes + 1))
