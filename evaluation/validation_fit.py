"""Fit what `radtriage evaluate --write-thresholds` writes into a model's metadata, on splits.

The labelled validation cases are split (seeded, stratified by label) into a *calibration*
split and a held-out *check* split:

1. calibration split: the case-likelihood calibrator (`models.calibration`) on raw scores, then
   the three-band thresholds (`evaluation.operating_points.choose_thresholds`) on calibrated
   scores; the out-of-distribution gate (`models.ood_gate`) is fitted on one half of this split
   and its conformal distance set on the other half;
2. check split (never used to fit anything): each band's PPV/NPV with CIs, sensitivity at
   soon-or-above, the gate's low-confidence/outside rate, ECE before and after calibration.

`GatedRecorder` wraps the pipeline under evaluation so that each case's raw score, gate
features and verdict are kept: evaluation sees every case (the gate is reported, not enforced).
The gate is fitted on the features every calibration case has (a declared detector without an
ADC input has no ADC quantiles) and records the gland model (NAME:VERSION) the cases ran with:
it applies only with that gland model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.domain import Prediction, Volume
from core.errors import InputError
from core.priority import Thresholds
from evaluation.metrics import CaseRecord, calibration, json_safe
from evaluation.operating_points import (
    ThresholdChoice,
    band_metrics,
    choose_thresholds,
    record_strata,
    stratified_split,
)
from models.calibration import CalibrationSpec, calibrate, fit_calibration
from models.ood_gate import FEATURES, DomainCheck, OodGateSpec, fit_ood_gate, not_applicable

CARD_BEGIN = "<!-- radtriage evaluate: bands -->"
CARD_END = "<!-- /radtriage evaluate: bands -->"


class GatedRecorder:
    """A `Predictor` that runs the pipeline without enforcing its gate and keeps, per call,
    the raw case score, the gate features and the verdict the model's own gate would give."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        md = getattr(pipeline, "detector_metadata", None)
        self.gate: OodGateSpec | None = md.ood_gate if md is not None else None
        if md is not None and md.ood_gate is not None:
            pipeline.detector_metadata = md.model_copy(update={"ood_gate": None})
        gland = getattr(pipeline, "gland_metadata", None)
        self.gland_model = f"{gland.name}:{gland.version}" if gland is not None else None
        self.declared = not getattr(pipeline, "shared_grid", True)
        self.calls: list[dict[str, Any]] = []

    def predict(self, t2w: Volume, adc: Volume, hbv: Volume) -> Prediction:
        p = self.pipeline.predict(t2w, adc, hbv)
        raw = getattr(p, "raw_case_likelihood", None)
        domain: DomainCheck | None = getattr(p, "domain", None)
        features = dict(domain.features) if domain is not None else {}
        applies = (
            self.gate is not None
            and bool(features)
            and not_applicable(self.gate, features, self.gland_model, declared=self.declared)
            is None
        )
        check = self.gate.check(features) if applies and self.gate is not None else None
        self.calls.append(
            {
                "raw_likelihood": p.case_likelihood if raw is None else raw,
                "features": features,
                "gland_model": self.gland_model,
                "gate": check.verdict if check is not None else None,
                "gate_distance": check.distance if check is not None else None,
            }
        )
        return p

    def attach(self, records: Sequence[CaseRecord]) -> list[CaseRecord]:
        """`records` (one per call, in order) with the kept values in `extra`."""
        if len(records) != len(self.calls):
            raise ValueError("one record per predicted case expected")
        return [
            dataclasses.replace(r, extra={**r.extra, **c})
            for r, c in zip(records, self.calls, strict=True)
        ]


@dataclass(frozen=True)
class ValidationFit:
    calibration: CalibrationSpec | None
    choice: ThresholdChoice
    gate: OodGateSpec | None
    check_bands: dict[str, Any]
    summary: dict[str, Any]
    check_index: tuple[int, ...]  # records of the held-out check split


def _raw(r: CaseRecord) -> float:
    return float(r.extra.get("raw_likelihood", r.likelihood))


def gate_rates(verdicts: Iterable[str | None]) -> dict[str, Any]:
    v = [x for x in verdicts if x is not None]
    n = len(v)
    return {
        "n": n,
        "low_confidence": sum(x == "low_confidence" for x in v) / n if n else None,
        "outside": sum(x == "outside" for x in v) / n if n else None,
    }


def calibration_before_after(
    records: Sequence[CaseRecord], spec: CalibrationSpec | None
) -> dict[str, Any]:
    """Reliability bins and ECE of raw and of calibrated case likelihoods on `records`."""
    y = np.array([int(r.is_cspca) for r in records])
    raw = np.array([_raw(r) for r in records])
    return json_safe(
        {
            "method": spec.method if spec is not None else None,
            "n_cases": len(records),
            "raw": calibration(y, raw),
            "calibrated": calibration(y, np.asarray(calibrate(raw, spec), dtype=float)),
        }
    )


def fit_on_splits(
    records: Sequence[CaseRecord],
    *,
    data: str,
    method: Literal["isotonic", "platt", "none"] = "platt",
    check_fraction: float = 0.4,
    split_seed: int = 0,
    target_sensitivity: float = 0.95,
    confidence: float = 0.95,
    urgent_specificity: float = 0.90,
    gate_alpha: float = 0.02,
    gate_outside_factor: float = 2.0,
) -> ValidationFit:
    """Calibrator, thresholds and gate on the calibration split; bands on the check split."""
    y = [r.is_cspca for r in records]
    check_idx, cal_idx = stratified_split(y, check_fraction, split_seed)
    cal = [records[i] for i in cal_idx]
    check = [records[i] for i in check_idx]
    where = f"{data}, calibration split n={len(cal)} (seed {split_seed})"
    spec = None
    if method != "none":
        try:
            spec = fit_calibration(
                [_raw(r) for r in cal], [r.is_cspca for r in cal], method=method, source=where
            )
        except ValueError as exc:
            raise InputError(f"calibration could not be fitted on {where}: {exc}") from exc
    cal_scores = np.asarray(calibrate(np.array([_raw(r) for r in cal]), spec), dtype=float)
    choice = choose_thresholds(
        cal_scores.tolist(),
        [r.is_cspca for r in cal],
        target_sensitivity=target_sensitivity,
        confidence=confidence,
        urgent_specificity=urgent_specificity,
    )
    gate = None
    feats = [r.extra.get("features") or {} for r in cal]
    names = [f for f in FEATURES if all(f in x for x in feats)]
    glands = {r.extra.get("gland_model") for r in cal}
    if all(feats) and len(feats) >= 10 and names:
        half = len(feats) // 2
        gate = fit_ood_gate(
            feats[:half],
            feats[half:],
            alpha=gate_alpha,
            outside_factor=gate_outside_factor,
            source=f"{where}: fitted on {half} cases, conformal distance on {len(feats) - half}",
            features=names,
            gland_model=glands.pop() if len(glands) == 1 else None,
        )
    check_scores = np.asarray(calibrate(np.array([_raw(r) for r in check]), spec), dtype=float)
    bands = json_safe(
        band_metrics(
            check_scores.tolist(),
            [r.is_cspca for r in check],
            choice.thresholds,
            level=confidence,
            strata=record_strata(check),
        )
    )
    bands["split"] = f"{data}, held-out check split n={len(check)} (seed {split_seed})"
    verdicts = (
        [gate.check(r.extra["features"]).verdict for r in check if r.extra.get("features")]
        if gate is not None
        else []
    )
    summary = {
        "calibration_split": {"n": len(cal), "n_cspca": int(sum(r.is_cspca for r in cal))},
        "check_split": {"n": len(check), "n_cspca": int(sum(r.is_cspca for r in check))},
        "split_seed": split_seed,
        "calibration_method": method,
        "calibration_check": calibration_before_after(check, spec),
        "bands_check": bands,
        "ood_gate_check": gate_rates(verdicts) if gate is not None else None,
    }
    return ValidationFit(
        spec, choice, gate, bands, json_safe(summary), tuple(int(i) for i in check_idx)
    )


def _p(entry: dict[str, Any]) -> str:
    v, (lo, hi) = entry["value"], entry["ci"]
    if v is None:
        return "n/a (0 cases)"
    return f"{v:.3f} ({lo:.3f}-{hi:.3f}; {entry['k']}/{entry['n']})"


def model_card_section(fit: ValidationFit, *, source: str) -> str:
    """Markdown for the model card: bands with measured PPV/NPV, calibration, gate."""
    b, t = fit.check_bands, fit.choice.thresholds
    cal = fit.summary["calibration_check"]
    gate = fit.summary.get("ood_gate_check")
    lines = [
        CARD_BEGIN,
        "## Priority bands (measured on a held-out check split)",
        "",
        f"Chosen by: {source}",
        f"Measured on: {b['split']} ({b['n_cspca']} csPCa); intervals {b['ci_method']}.",
        "",
        "| band | likelihood | measured |",
        "|---|---|---|",
        f"| urgent | >= {t.urgent:.4f} | PPV {_p(b['urgent']['ppv'])} |",
        f"| soon | {t.soon:.4f} to {t.urgent:.4f} | PPV {_p(b['soon']['ppv'])} |",
        f"| routine | < {t.soon:.4f} | NPV {_p(b['routine']['npv'])} |",
        f"| soon or above | >= {t.soon:.4f} | sensitivity "
        f"{_p(b['soon_or_above']['sensitivity'])}, PPV {_p(b['soon_or_above']['ppv'])} |",
        *(
            f"| soon or above, {key} {name} | >= {t.soon:.4f} | sensitivity {_p(entry)} |"
            for key, groups in (b["soon_or_above"].get("sensitivity_by") or {}).items()
            for name, entry in groups.items()
        ),
        "",
        f"Urgent specificity: {_p(b['urgent_specificity'])}. Bands distinct on the check split: "
        f"{'yes' if b['distinct'] else 'NO'}.",
        "",
        f"Calibration ({cal['method'] or 'none'}): ECE {cal['raw']['ece']:.3f} raw -> "
        f"{cal['calibrated']['ece']:.3f} calibrated on the check split.",
    ]
    if gate:
        lines.append(
            f"Out-of-distribution gate: low confidence on {gate['low_confidence']:.1%}, outside "
            f"on {gate['outside']:.1%} of the {gate['n']} in-distribution check cases."
        )
    lines += [CARD_END, ""]
    return "\n".join(lines)


def write_card_section(card: Path, section: str, thresholds: Thresholds | None = None) -> None:
    """Replace (or append) the evaluate section of a model card; with `thresholds`, also the
    card's operating-thresholds line, so no provisional value is left beside the bands."""
    text = card.read_text(encoding="utf-8") if card.exists() else ""
    pattern = re.compile(re.escape(CARD_BEGIN) + r".*?" + re.escape(CARD_END) + r"\n?", re.S)
    text = pattern.sub("", text).rstrip("\n") + "\n\n" + section
    if thresholds is not None:
        line = (
            f"- urgent >= {thresholds.urgent:.4f}, soon >= {thresholds.soon:.4f} on the "
            "calibrated scale (chosen by radtriage evaluate --write-thresholds: see Priority "
            "bands below)"
        )
        text = re.sub(r"(## Operating thresholds\n)- [^\n]*", lambda m: m.group(1) + line, text)
    card.write_text(text, encoding="utf-8")


def with_calibrated(
    records: Sequence[CaseRecord], spec: CalibrationSpec | None
) -> list[CaseRecord]:
    """`records` whose case likelihood is `spec` applied to their raw score."""
    return [
        dataclasses.replace(r, likelihood=float(np.clip(calibrate(_raw(r), spec), 0.0, 1.0)))
        for r in records
    ]
