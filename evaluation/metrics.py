"""PI-CAI metrics for a set of evaluated cases, computed by `picai_eval` itself.

- case level: AUROC over the model's case likelihood (the number the server turns into a
  priority), plus case-level average precision;
- lesion level: PI-CAI detection maps matched to ground-truth lesions by `picai_eval.evaluate_case`
  (hit = IoU >= 0.1, Hungarian matching), giving PI-CAI's AP and the FROC curve;
- the PI-CAI ranking score (AUROC + AP) / 2, where AP is PI-CAI's lesion-level AP;
- sensitivity/specificity at the priority thresholds, calibration, gland Dice, subgroups.

Where cases carry no detection maps (likelihoods only) lesion-level results fall back to one
pseudo-lesion per case, so AP becomes case-level AP; `ap_level` in the output says which.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from core.domain import Prediction
from core.priority import Thresholds
from evaluation.bootstrap import Interval, bootstrap_ci, clopper_pearson

FROC_FP_PER_CASE = (0.25, 0.5, 1.0, 2.0, 3.0)
SUBGROUP_KEYS = ("vendor", "scanner", "field_strength")


def picai_eval_module() -> Any:
    """`picai_eval`, imported without the banner it prints on stdout (it would corrupt --json)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import picai_eval
        import picai_eval.eval
    return picai_eval


@dataclass(frozen=True, eq=False)
class CaseRecord:
    """One labelled case after inference: what every metric is computed from.

    Arrays are [z, y, x] on one grid (the T2W grid for model outputs).
    """

    case_id: str
    is_cspca: bool
    likelihood: float  # model case-level csPCa likelihood, 0..1
    detection_map: np.ndarray | None = None  # PI-CAI detection map: blobs of constant confidence
    lesion_mask: np.ndarray | None = None  # ground-truth csPCa lesions, 0/1
    gland_pred: np.ndarray | None = None
    gland_true: np.ndarray | None = None
    vendor: str | None = None
    scanner: str | None = None
    field_strength: str | None = None
    image: np.ndarray | None = None  # 2D T2W slice of highest likelihood, for the report
    overlay: np.ndarray | None = None  # 2D likelihood on that slice
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.case_id:
            raise ValueError("case_id must be non-empty")
        if not 0.0 <= self.likelihood <= 1.0 or math.isnan(self.likelihood):
            raise ValueError(f"likelihood must be in [0, 1], got {self.likelihood}")

    def subgroup(self, key: str) -> str | None:
        value = getattr(self, key)
        return None if value in (None, "") else str(value)


def detection_map_from_prediction(
    prediction: Prediction, min_likelihood: float = 0.1
) -> np.ndarray:
    """A PI-CAI detection map from a model prediction.

    Prefers the model's own lesion candidates (`lesion_labels` + `lesions`: each lesion's voxels
    get its likelihood). Otherwise the likelihood map is split into connected components above
    `min_likelihood`, each filled with its peak likelihood.
    """
    if prediction.lesion_labels is not None:
        labels = np.asarray(prediction.lesion_labels.array)
        det = np.zeros(labels.shape, dtype=np.float32)
        for lesion in prediction.lesions:
            if lesion.label > 0:
                det[labels == lesion.label] = lesion.likelihood
        return det
    if prediction.likelihood_map is None:
        raise ValueError("prediction has neither lesion_labels nor a likelihood_map")
    return detection_map_from_likelihood(prediction.likelihood_map.array, min_likelihood)


def detection_map_from_likelihood(
    likelihood: np.ndarray, min_likelihood: float = 0.1
) -> np.ndarray:
    """26-connected components of `likelihood >= min_likelihood`, each set to its peak."""
    lik = np.asarray(likelihood, dtype=np.float32)
    blobs, n = ndimage.label(lik >= min_likelihood, structure=np.ones((3, 3, 3)))
    det = np.zeros_like(lik)
    if n:
        peaks = ndimage.maximum(lik, blobs, index=np.arange(1, n + 1))
        det[blobs > 0] = np.asarray(peaks, dtype=np.float32)[blobs[blobs > 0] - 1]
    return det


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice similarity of two binary masks (1.0 when both are empty)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom


# --- picai_eval glue ---------------------------------------------------------------------------


LesionResults = dict[str, list[tuple[int, float, float]]]


def lesion_results(records: Sequence[CaseRecord]) -> tuple[LesionResults, str]:
    """Per-case PI-CAI lesion results `(is_lesion, confidence, overlap)` and their level."""
    evaluate_case = picai_eval_module().eval.evaluate_case
    if records and all(r.detection_map is not None for r in records):
        out: LesionResults = {}
        for r in records:
            label = r.lesion_mask if r.lesion_mask is not None else np.zeros_like(r.detection_map)
            if bool(np.any(label)) != r.is_cspca:
                raise ValueError(
                    f"case {r.case_id}: is_cspca={r.is_cspca} but its lesion mask is "
                    f"{'non-empty' if np.any(label) else 'empty'}; fix the labels"
                )
            det, lab = _crop_to_content(np.asarray(r.detection_map), np.asarray(label))
            results, *_ = evaluate_case(y_det=det, y_true=lab)
            out[r.case_id] = [(int(t), float(c), float(o)) for t, c, o in results]
        return out, "lesion"
    return {r.case_id: [(int(r.is_cspca), r.likelihood, 0.0)] for r in records}, "case"


def _crop_to_content(det: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays cut to the bounding box of their non-zero voxels (plus one voxel): matching,
    IoU and connected components are unchanged, and big grids evaluate much faster."""
    if det.shape != label.shape:
        return det, label
    nz = np.argwhere((det > 0) | (label > 0))
    if nz.size == 0:
        return det[:1, :1, :1], label[:1, :1, :1]
    lo = np.maximum(nz.min(axis=0) - 1, 0)
    hi = nz.max(axis=0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return det[box], label[box]


class FastScores:
    """AUROC and PI-CAI AP on resampled case indices, without sklearn's per-call overhead.

    Same definitions as picai_eval (AP: step-wise precision over lesion candidates, candidates
    of confidence 0 have precision 0); tests check both agree.
    """

    def __init__(self, records: Sequence[CaseRecord], results: LesionResults) -> None:
        self.y = np.array([int(r.is_cspca) for r in records])
        self.s = np.array([r.likelihood for r in records], dtype=float)
        self.lesion_y = [np.array([t for t, _, _ in results[r.case_id]], float) for r in records]
        self.lesion_s = [np.array([c for _, c, _ in results[r.case_id]], float) for r in records]

    def auroc(self, idx: np.ndarray) -> float:
        return _auroc(self.y[idx], self.s[idx])

    def ap(self, idx: np.ndarray) -> float:
        y = np.concatenate([self.lesion_y[i] for i in idx]) if len(idx) else np.zeros(0)
        s = np.concatenate([self.lesion_s[i] for i in idx]) if len(idx) else np.zeros(0)
        return picai_ap(y, s)


def picai_ap(y: np.ndarray, s: np.ndarray) -> float:
    """picai_eval's average precision of lesion results `y` (0/1) with confidences `s`."""
    positives = float(np.sum(y))
    if positives == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    precision[s[last] == 0] = 0.0
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def picai_metrics(records: Sequence[CaseRecord]) -> Any:
    """A `picai_eval.Metrics` whose case scores are the model's case likelihoods."""
    if len({r.case_id for r in records}) != len(records):
        raise ValueError("case_id values must be unique")
    results, _ = lesion_results(records)
    return picai_eval_module().Metrics(
        lesion_results=results,
        case_target={r.case_id: int(r.is_cspca) for r in records},
        case_pred={r.case_id: float(r.likelihood) for r in records},
    )


# --- case-level statistics on index arrays (for the bootstrap) ---------------------------------


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count 1/2); NaN when one class is absent."""
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    ranks = _rankdata(np.concatenate([pos, neg]))
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def _rankdata(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return np.asarray(rankdata(x), dtype=float)


def case_average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Step-wise average precision over the case likelihoods (NaN without positives)."""
    if not np.any(y == 1):
        return math.nan
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, s))


@dataclass(frozen=True)
class OperatingPoint:
    """Sensitivity and specificity of `likelihood >= threshold` as the positive call."""

    name: str
    threshold: float
    tp: int
    fn: int
    tn: int
    fp: int
    level: float = 0.95

    @property
    def sensitivity(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "sensitivity": self.sensitivity,
            "sensitivity_ci": list(clopper_pearson(self.tp, self.tp + self.fn, self.level)),
            "specificity": self.specificity,
            "specificity_ci": list(clopper_pearson(self.tn, self.tn + self.fp, self.level)),
            "ci_method": "clopper-pearson",
            "tp": self.tp,
            "fn": self.fn,
            "tn": self.tn,
            "fp": self.fp,
        }


def operating_point(
    name: str, threshold: float, y: np.ndarray, s: np.ndarray, level: float = 0.95
) -> OperatingPoint:
    called = s >= threshold
    return OperatingPoint(
        name,
        float(threshold),
        tp=int(np.sum(called & (y == 1))),
        fn=int(np.sum(~called & (y == 1))),
        tn=int(np.sum(~called & (y == 0))),
        fp=int(np.sum(called & (y == 0))),
        level=level,
    )


def threshold_points(
    thresholds: Thresholds, y: np.ndarray, s: np.ndarray, level: float = 0.95
) -> dict[str, OperatingPoint]:
    """Operating points of the two priority thresholds: `urgent` and `soon` (= urgent|soon)."""
    return {
        "urgent": operating_point("urgent", thresholds.urgent, y, s, level),
        "soon": operating_point("soon", thresholds.soon, y, s, level),
    }


def calibration(y: np.ndarray, s: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Reliability curve on equal-width bins, expected calibration error (ECE) and Brier score."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(s, edges[1:-1], right=False), 0, n_bins - 1)
    bins = []
    ece = 0.0
    for b in range(n_bins):
        m = which == b
        n = int(m.sum())
        if n:
            conf, acc = float(s[m].mean()), float(y[m].mean())
            ece += n / len(s) * abs(acc - conf)
        else:
            conf = acc = math.nan
        bins.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": n,
                "mean_likelihood": conf,
                "observed_fraction": acc,
            }
        )
    return {"bins": bins, "ece": float(ece), "brier": float(np.mean((s - y) ** 2))}


def _ece(y: np.ndarray, s: np.ndarray) -> float:
    return float(calibration(y, s)["ece"])


def froc(metrics: Any, fp_per_case: Iterable[float] = FROC_FP_PER_CASE) -> dict[str, Any]:
    """Lesion-level FROC from picai_eval: sensitivity against false positives per case."""
    fpr = np.asarray(metrics.lesion_FPR, dtype=float)
    tpr = np.asarray(metrics.lesion_TPR, dtype=float)
    finite = np.isfinite(fpr)
    return {
        "fp_per_case": [float(v) for v in fpr[finite]],
        "sensitivity": [float(v) for v in tpr[finite]],
        "sensitivity_at": {f"{fp:g}": float(metrics.lesion_TPR_at_FPR(fp)) for fp in fp_per_case},
        "num_lesions": int(metrics.num_lesions),
    }


# --- the whole evaluation ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Everything `radtriage evaluate` reports; `summary` is the JSON document."""

    records: tuple[CaseRecord, ...]
    metrics: Any  # picai_eval.Metrics
    summary: dict[str, Any]


def evaluate_records(
    records: Sequence[CaseRecord],
    thresholds: Thresholds | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Evaluation:
    """Compute every metric with seeded bootstrap intervals over cases."""
    if not records:
        raise ValueError("no cases to evaluate")
    records = tuple(records)
    metrics = picai_metrics(records)
    ap_level = _ap_level(records)
    y = np.array([int(r.is_cspca) for r in records])
    s = np.array([r.likelihood for r in records], dtype=float)
    n = len(records)

    def boot(stat: Any, offset: int) -> Interval:
        return bootstrap_ci(n, stat, n_bootstrap=n_bootstrap, seed=seed + offset, level=level)

    fast = FastScores(records, metrics.lesion_results)
    auroc_stat, ap_stat = fast.auroc, fast.ap

    # one resample stream for AUROC, AP and score, as picai_eval's bootstrap_score_ci does
    auroc_i = boot(auroc_stat, 0)
    ap_i = boot(ap_stat, 0)
    score_i = boot(lambda idx: (auroc_stat(idx) + ap_stat(idx)) / 2, 0)
    case_ap_i = boot(lambda idx: case_average_precision(y[idx], s[idx]), 0)

    summary: dict[str, Any] = {
        "n_cases": n,
        "n_cspca": int(y.sum()),
        "auroc": auroc_i.value,
        "auroc_ci": [auroc_i.low, auroc_i.high],
        "ap": ap_i.value,
        "ap_ci": [ap_i.low, ap_i.high],
        "ap_level": ap_level,
        "picai_score": score_i.value,
        "picai_score_ci": [score_i.low, score_i.high],
        "case_ap": case_ap_i.value,
        "case_ap_ci": [case_ap_i.low, case_ap_i.high],
        "picai_eval": {
            "auroc": float(metrics.auroc),
            "ap": float(metrics.AP),
            "score": float(metrics.score),
        },
        "ci_level": level,
        "bootstrap": {"n": n_bootstrap, "seed": seed, "unit": "case"},
        "froc": froc(metrics) if ap_level == "lesion" else None,
    }
    cal = calibration(y, s)
    ece_i = boot(lambda idx: _ece(y[idx], s[idx]), 1)
    cal["ece_ci"] = [ece_i.low, ece_i.high]
    summary["calibration"] = cal
    summary["thresholds"] = (
        {k: p.to_dict() for k, p in threshold_points(thresholds, y, s, level).items()}
        if thresholds is not None
        else None
    )
    summary["dice"] = _dice_summary(records, n_bootstrap, seed, level)
    summary["subgroups"] = _subgroups(records, thresholds, level)
    summary["roc"] = _roc_curve(y, s)
    summary["cases"] = [
        {
            "case_id": r.case_id,
            "is_cspca": r.is_cspca,
            "likelihood": r.likelihood,
            "vendor": r.vendor,
            "scanner": r.scanner,
            "field_strength": r.field_strength,
            "gland_dice": (
                dice(r.gland_pred, r.gland_true)
                if r.gland_pred is not None and r.gland_true is not None
                else None
            ),
            **r.extra,
        }
        for r in records
    ]
    return Evaluation(records, metrics, json_safe(summary))


def _ap_level(records: Sequence[CaseRecord]) -> str:
    return "lesion" if all(r.detection_map is not None for r in records) else "case"


def _roc_curve(y: np.ndarray, s: np.ndarray) -> dict[str, list[float]] | None:
    if y.min() == y.max():
        return None
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, s)
    return {
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "thresholds": [min(float(t), 1.0) for t in thr],
    }


def _dice_summary(
    records: Sequence[CaseRecord], n_bootstrap: int, seed: int, level: float
) -> dict[str, Any] | None:
    values = np.array(
        [
            dice(r.gland_pred, r.gland_true)
            for r in records
            if r.gland_pred is not None and r.gland_true is not None
        ]
    )
    if values.size == 0:
        return None
    i = bootstrap_ci(
        values.size,
        lambda idx: float(values[idx].mean()),
        n_bootstrap=n_bootstrap,
        seed=seed + 2,
        level=level,
    )
    return {
        "gland_mean": i.value,
        "gland_ci": [i.low, i.high],
        "gland_median": float(np.median(values)),
        "n": int(values.size),
    }


def _subgroups(
    records: Sequence[CaseRecord], thresholds: Thresholds | None, level: float
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key in SUBGROUP_KEYS:
        groups: dict[str, list[CaseRecord]] = {}
        for r in records:
            value = r.subgroup(key)
            if value is not None:
                groups.setdefault(value, []).append(r)
        if not groups:
            continue
        out[key] = {}
        for value, rs in sorted(groups.items()):
            y = np.array([int(r.is_cspca) for r in rs])
            s = np.array([r.likelihood for r in rs], dtype=float)
            entry: dict[str, Any] = {
                "n_cases": len(rs),
                "n_cspca": int(y.sum()),
                "auroc": _auroc(y, s),
            }
            if thresholds is not None:
                entry["thresholds"] = {
                    k: p.to_dict() for k, p in threshold_points(thresholds, y, s, level).items()
                }
            out[key][value] = entry
    return out


def json_safe(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the output is strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
