"""Two models on the same cases: paired bootstrap of the difference in PI-CAI metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluation.bootstrap import Interval, PairedDifference
from evaluation.metrics import CaseRecord, FastScores, picai_metrics

METRICS = ("picai_score", "auroc", "ap")


def _scores(m: FastScores, idx: np.ndarray) -> dict[str, float]:
    auroc, ap = m.auroc(idx), m.ap(idx)
    return {"auroc": auroc, "ap": ap, "picai_score": (auroc + ap) / 2}


def compare_records(
    a: Sequence[CaseRecord],
    b: Sequence[CaseRecord],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Differences `b - a` in PI-CAI score, AUROC and AP with paired bootstrap CIs and p-values.

    Both lists must hold the same cases (matched by `case_id`); each bootstrap round resamples
    the cases once and scores both models on that resample (rounds with one class are skipped).
    """
    ids_a, ids_b = [r.case_id for r in a], [r.case_id for r in b]
    if sorted(ids_a) != sorted(ids_b) or len(set(ids_a)) != len(ids_a):
        raise ValueError("compared models must be evaluated on the same, uniquely named cases")
    ids = sorted(ids_a)
    truth = {r.case_id: r.is_cspca for r in a}
    positives = np.array([truth[i] for i in ids])
    by_a, by_b = {r.case_id: r for r in a}, {r.case_id: r for r in b}
    ra, rb = [by_a[i] for i in ids], [by_b[i] for i in ids]
    ma = FastScores(ra, picai_metrics(ra).lesion_results)
    mb = FastScores(rb, picai_metrics(rb).lesion_results)
    everything = np.arange(len(ids))
    point_a, point_b = _scores(ma, everything), _scores(mb, everything)
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {k: [] for k in METRICS}
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(ids), len(ids))
        if positives[idx].all() or not positives[idx].any():
            continue
        sa, sb = _scores(ma, idx), _scores(mb, idx)
        for k in METRICS:
            diffs[k].append(sb[k] - sa[k])
    tail = (1.0 - level) / 2 * 100
    out: dict[str, Any] = {"n_cases": len(ids), "n_bootstrap": n_bootstrap, "seed": seed}
    for k in METRICS:
        d = np.asarray(diffs[k], dtype=float)
        d = d[np.isfinite(d)]
        if d.size:
            low, high = (float(v) for v in np.percentile(d, [tail, 100 - tail]))
            p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
        else:
            low = high = p = math.nan
        diff = Interval(point_b[k] - point_a[k], low, high, level)
        out[k] = PairedDifference(point_a[k], point_b[k], diff, p, n_bootstrap).to_dict()
    return out
