"""Choose the `urgent` and `soon` priority thresholds from labelled validation cases.

Rules (documented in the model metadata `thresholds.source` and in docs/simulation.md):

- `soon` (a study is at least `soon` when likelihood >= soon): the *highest* threshold whose
  one-sided Clopper-Pearson lower confidence bound on csPCa sensitivity is >= the target
  (default: sensitivity >= 0.95 with 95% confidence). This needs enough csPCa cases: with all
  n positives caught the bound is (1 - confidence)^(1/n), so 0.95 at 95% needs n >= 59. With
  fewer, `meets_target` is False and `soon` falls back to catching every validation positive.
- `urgent`: the lowest threshold at or above `soon` whose specificity on the validation
  negatives is >= `urgent_specificity` (default 0.90): urgent means "report first", so its
  flag must be rare among csPCa-negative studies. It is also kept strictly above the score that
  decided `soon` (halfway to the next higher score), so the three bands are distinct: the
  `soon` band holds at least the cases at that score (`distinct` says whether this held).

Split rule (docs/models.md, "Calibrated three-band priorities"): `radtriage evaluate
--write-thresholds` chooses these on a calibration split and measures each band on a held-out
check split (`band_metrics`: PPV of urgent and of soon, NPV of routine, Clopper-Pearson CIs).
The `soon` rule is a split-conformal (PAC) bound: the threshold is an order statistic of the
calibration positives, so for a new exchangeable csPCa case P(sensitivity >= target) >=
confidence.

A threshold is placed halfway between the deciding score and the next lower score in the data,
so the counts on the validation set are exactly those stated, with a margin for new cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import InputError
from core.priority import Thresholds
from evaluation.bootstrap import clopper_pearson, clopper_pearson_lower


@dataclass(frozen=True)
class ThresholdChoice:
    """Chosen thresholds with the evidence behind them."""

    thresholds: Thresholds
    target_sensitivity: float
    confidence: float
    urgent_specificity: float
    meets_target: bool
    sensitivity_soon: float
    sensitivity_soon_lower: float  # one-sided lower bound at `confidence`
    specificity_soon: float
    sensitivity_urgent: float
    specificity_urgent: float
    n_cases: int
    n_cspca: int
    min_cspca_needed: int
    rule: str
    distinct: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "urgent": self.thresholds.urgent,
            "soon": self.thresholds.soon,
            "target_sensitivity": self.target_sensitivity,
            "confidence": self.confidence,
            "urgent_specificity": self.urgent_specificity,
            "meets_target": self.meets_target,
            "sensitivity_soon": self.sensitivity_soon,
            "sensitivity_soon_lower_bound": self.sensitivity_soon_lower,
            "specificity_soon": self.specificity_soon,
            "sensitivity_urgent": self.sensitivity_urgent,
            "specificity_urgent": self.specificity_urgent,
            "n_cases": self.n_cases,
            "n_cspca": self.n_cspca,
            "min_cspca_needed": self.min_cspca_needed,
            "rule": self.rule,
            "distinct": self.distinct,
        }


def min_positives_needed(target_sensitivity: float, confidence: float) -> int:
    """Fewest csPCa cases for which catching all of them proves the target at `confidence`."""
    if target_sensitivity <= 0:
        return 1
    if target_sensitivity >= 1:
        raise ValueError("a sensitivity target of 1.0 can never be proven from finite data")
    return max(1, math.ceil(math.log(1.0 - confidence) / math.log(target_sensitivity) - 1e-12))


def _below(value: float, scores: np.ndarray) -> float:
    """Halfway between `value` and the next lower distinct score (or 0)."""
    lower = scores[scores < value]
    nxt = float(lower.max()) if lower.size else 0.0
    return (value + nxt) / 2


def choose_thresholds(
    likelihoods: Sequence[float],
    is_cspca: Sequence[bool],
    *,
    target_sensitivity: float = 0.95,
    confidence: float = 0.95,
    urgent_specificity: float = 0.90,
) -> ThresholdChoice:
    """Apply the module's rules to validation likelihoods and labels."""
    s = np.asarray(likelihoods, dtype=float)
    y = np.asarray(is_cspca, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise InputError("likelihoods and labels must be 1-D sequences of the same length")
    if not 0 < target_sensitivity < 1 or not 0 < confidence < 1 or not 0 < urgent_specificity < 1:
        raise InputError("target_sensitivity, confidence and urgent_specificity must be in (0, 1)")
    if np.any((s < 0) | (s > 1) | np.isnan(s)):
        raise InputError("likelihoods must lie in [0, 1]")
    pos, neg = np.sort(s[y])[::-1], np.sort(s[~y])[::-1]
    if pos.size == 0 or neg.size == 0:
        raise InputError(
            f"threshold selection needs csPCa-positive and negative cases; got {pos.size} "
            f"positive and {neg.size} negative: evaluate on more (or more varied) cases"
        )

    # soon: highest threshold with a lower confidence bound on sensitivity >= target
    soon_score = float(pos[-1])
    meets = False
    for k in range(1, pos.size + 1):
        candidate = float(pos[k - 1])
        caught = int(np.sum(pos >= candidate))
        if clopper_pearson_lower(caught, pos.size, confidence) >= target_sensitivity:
            soon_score, meets = candidate, True
            break
    soon = _below(soon_score, s)

    # urgent: lowest threshold >= soon with specificity >= urgent_specificity
    allowed_fp = math.floor((1.0 - urgent_specificity) * neg.size + 1e-9)
    if allowed_fp >= neg.size:
        urgent = soon
    else:
        deciding_negative = float(neg[allowed_fp])  # the highest negative that must stay below
        higher = s[s > deciding_negative]
        urgent = (
            (deciding_negative + float(higher.min())) / 2
            if higher.size
            else ((deciding_negative + 1.0) / 2)
        )
        urgent = max(urgent, soon)
    above = s[s > soon_score]
    distinct = bool(above.size)
    if distinct:  # keep the soon band non-empty: urgent above the score that decided soon
        urgent = max(urgent, (soon_score + float(above.min())) / 2)

    caught_soon = int(np.sum(pos >= soon))
    rule = (
        f"soon: highest threshold with one-sided {confidence:.0%} Clopper-Pearson lower bound "
        f"on csPCa sensitivity >= {target_sensitivity:.2f}"
        + ("" if meets else " (NOT MET: too few csPCa cases; soon catches every positive)")
        + f"; urgent: lowest threshold >= soon with specificity >= {urgent_specificity:.2f}"
        + ", strictly above the score deciding soon (three distinct bands)"
    )
    return ThresholdChoice(
        thresholds=Thresholds(urgent=float(urgent), soon=float(soon)),
        target_sensitivity=target_sensitivity,
        confidence=confidence,
        urgent_specificity=urgent_specificity,
        meets_target=meets,
        sensitivity_soon=caught_soon / pos.size,
        sensitivity_soon_lower=clopper_pearson_lower(caught_soon, pos.size, confidence),
        specificity_soon=float(np.mean(neg < soon)),
        sensitivity_urgent=float(np.mean(pos >= urgent)),
        specificity_urgent=float(np.mean(neg < urgent)),
        n_cases=int(s.size),
        n_cspca=int(pos.size),
        min_cspca_needed=min_positives_needed(target_sensitivity, confidence),
        rule=rule,
        distinct=distinct,
    )


def stratified_split(
    labels: Sequence[bool], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (first, second) of a seeded split stratified by label: `fraction` of the
    positives and of the negatives go to the first part."""
    if not 0 < fraction < 1:
        raise InputError("the split fraction must be in (0, 1)")
    y = np.asarray(labels, dtype=bool)
    rng = np.random.default_rng(seed)
    first: list[int] = []
    for value in (True, False):
        idx = np.flatnonzero(y == value)
        rng.shuffle(idx)
        first.extend(idx[: round(fraction * idx.size)].tolist())
    a = np.sort(np.asarray(first, dtype=int))
    b = np.setdiff1d(np.arange(y.size), a)
    return a, b


def _proportion(k: int, n: int, level: float) -> dict[str, Any]:
    low, high = clopper_pearson(k, n, level)
    return {"value": k / n if n else None, "ci": [low, high], "k": k, "n": n}


SMALL_LESION_ML = 0.5


def lesion_size_class(largest_lesion_ml: float | None) -> str | None:
    """`< 0.5 ml` / `>= 0.5 ml` by a case's largest csPCa lesion (None without one)."""
    if largest_lesion_ml is None:
        return None
    return (
        f"< {SMALL_LESION_ML} ml"
        if largest_lesion_ml < SMALL_LESION_ML
        else (f">= {SMALL_LESION_ML} ml")
    )


def band_metrics(
    likelihoods: Sequence[float],
    is_cspca: Sequence[bool],
    thresholds: Thresholds,
    *,
    level: float = 0.95,
    strata: Mapping[str, Sequence[str | None]] | None = None,
) -> dict[str, Any]:
    """Each band's measured value on labelled cases: PPV of `urgent` and of `soon` (csPCa
    fraction inside the band), NPV of `routine`, sensitivity/PPV of soon-or-above and
    specificity of urgent, all with exact Clopper-Pearson intervals at `level`.

    `strata` (e.g. vendor, lesion size class per case) adds the sensitivity at soon-or-above
    within each stratum, so a guarantee that holds overall but not for small lesions or one
    vendor shows."""
    s = np.asarray(likelihoods, dtype=float)
    y = np.asarray(is_cspca, dtype=bool)
    urgent = s >= thresholds.urgent
    soon = (s >= thresholds.soon) & ~urgent
    routine = s < thresholds.soon
    flagged = urgent | soon

    def count(mask: np.ndarray, positive: bool = True) -> tuple[int, int]:
        return int(np.sum(mask & (y if positive else ~y))), int(mask.sum())

    by: dict[str, dict[str, Any]] = {}
    for key, values in (strata or {}).items():
        if len(values) != s.size:
            raise ValueError(f"stratum {key!r} has {len(values)} values for {s.size} cases")
        v = np.asarray([str(x) if x is not None else "" for x in values])
        by[key] = {
            name: _proportion(
                int(np.sum(flagged & y & (v == name))), int(np.sum(y & (v == name))), level
            )
            for name in sorted(set(v[y].tolist()) - {""})
        }
    return {
        "n_cases": int(s.size),
        "n_cspca": int(y.sum()),
        "urgent": {"threshold": thresholds.urgent, "ppv": _proportion(*count(urgent), level)},
        "soon": {"threshold": thresholds.soon, "ppv": _proportion(*count(soon), level)},
        "routine": {"npv": _proportion(*count(routine, False), level)},
        "soon_or_above": {
            "sensitivity": _proportion(int(np.sum(flagged & y)), int(y.sum()), level),
            "ppv": _proportion(*count(flagged), level),
            "sensitivity_by": by,
        },
        "urgent_specificity": _proportion(int(np.sum(~urgent & ~y)), int(np.sum(~y)), level),
        "distinct": bool(urgent.any() and soon.any() and routine.any()),
        "ci_method": f"clopper-pearson {level:.0%}",
    }


def record_strata(records: Sequence[Any]) -> dict[str, list[str | None]]:
    """Vendor and lesion size class of each `CaseRecord`, for `band_metrics(strata=...)`."""
    return {
        "vendor": [r.vendor for r in records],
        "lesion_size": [lesion_size_class(r.extra.get("largest_lesion_ml")) for r in records],
    }
