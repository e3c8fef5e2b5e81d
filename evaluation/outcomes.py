"""The outcome loop: live performance from what radiologists and pathologists said later.

Input is a PI-CAI-style marksheet (CSV; `radtriage feedback export` writes one, or a PI-CAI
`marksheet.csv` with the AI columns added). Columns read (see docs/models.md):

- `patient_id`, `study_id`: the case (`<patient_id>_<study_id>`, as PI-CAI names cases);
- `case_csPCa` (YES/NO) or else `case_ISUP` (>= 2 is csPCa); both empty = outcome pending;
- `pirads`: the radiologist's PI-RADS 1-5 (optional; else the highest of PI-CAI's
  `lesion_PIRADS`, e.g. "4,4");
- `ai_score`: the case likelihood the live model reported (0..1, required);
- `model_name`, `model_version`, `site` (else PI-CAI's `center`), `vendor`, `mri_date`,
  `study_instance_uid` (optional).

Every field is hostile: values are parsed, never used as paths; a bad row is an `InputError`
naming its line.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.domain import cspca_label
from core.errors import InputError
from core.priority import Thresholds
from evaluation.bootstrap import bootstrap_ci, clopper_pearson
from evaluation.metrics import _auroc, case_average_precision, json_safe

REQUIRED = ("patient_id", "study_id", "ai_score")
GROUPS = ("model_version", "site", "vendor")
PIRADS_POSITIVE = 3  # PI-RADS >= 3 is a positive MRI (biopsy usually offered)


@dataclass(frozen=True)
class Outcome:
    """One reported study with what the AI said and what was found later."""

    case_id: str
    ai_score: float
    is_cspca: bool | None  # None: no pathology outcome yet
    pirads: int | None = None
    model_name: str | None = None
    model_version: str | None = None
    site: str | None = None
    vendor: str | None = None
    mri_date: str | None = None
    study_instance_uid: str | None = None

    def group(self, key: str) -> str:
        value = getattr(self, key)
        if key == "model_version" and value is not None and self.model_name:
            return f"{self.model_name}:{value}"
        return str(value) if value else "unknown"


def is_outcome_marksheet(path: Path) -> bool:
    """A CSV (or a folder with marksheet.csv and no images/) whose header has `ai_score`."""
    csv_path = marksheet_path(path)
    if csv_path is None:
        return False
    with csv_path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return "ai_score" in header


def marksheet_path(path: Path) -> Path | None:
    if path.is_file() and path.suffix.lower() == ".csv":
        return path
    if path.is_dir() and (path / "marksheet.csv").is_file() and not (path / "images").is_dir():
        return path / "marksheet.csv"
    return None


def _text(row: dict[str, str | None], key: str) -> str | None:
    value = (row.get(key) or "").strip()
    return value or None


def _cspca(row: dict[str, str | None], line: int) -> bool | None:
    try:
        return cspca_label(row.get("case_csPCa"), row.get("case_ISUP"))
    except ValueError as exc:
        raise InputError(f"marksheet line {line}: {exc}") from exc


def read_outcomes(path: Path) -> list[Outcome]:
    """Every row of the outcome marksheet at `path` (CSV file or folder with marksheet.csv)."""
    csv_path = marksheet_path(path)
    if csv_path is None:
        raise InputError(f"{path}: not an outcome marksheet (a .csv with an ai_score column)")
    out: list[Outcome] = []
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{csv_path}: missing column(s) {missing}; see docs/models.md")
        for line, row in enumerate(reader, start=2):
            out.append(_outcome(row, line))
    seen: set[str] = set()
    for o in out:
        key = f"{o.case_id}|{o.model_version}"
        if key in seen:
            raise InputError(f"{csv_path}: case {o.case_id} appears twice for one model version")
        seen.add(key)
    return out


def _outcome(row: dict[str, str | None], line: int) -> Outcome:
    try:
        score = float(row.get("ai_score") or "nan")
    except ValueError as exc:
        raise InputError(f"marksheet line {line}: ai_score is not a number") from exc
    if not 0.0 <= score <= 1.0:
        raise InputError(f"marksheet line {line}: ai_score must be in 0..1, got {score}")
    pirads_text = _text(row, "pirads") or _highest_lesion_pirads(row)
    pirads = None
    if pirads_text is not None:
        try:
            pirads = int(float(pirads_text))
        except ValueError as exc:
            raise InputError(f"marksheet line {line}: pirads must be 1-5") from exc
        if not 1 <= pirads <= 5:
            raise InputError(f"marksheet line {line}: pirads must be 1-5, got {pirads}")
    patient, study = _text(row, "patient_id"), _text(row, "study_id")
    if patient is None or study is None:
        raise InputError(f"marksheet line {line}: patient_id and study_id are required")
    return Outcome(
        case_id=f"{patient}_{study}",
        ai_score=score,
        is_cspca=_cspca(row, line),
        pirads=pirads,
        model_name=_text(row, "model_name"),
        model_version=_text(row, "model_version"),
        site=_text(row, "site") or _text(row, "center"),
        vendor=_text(row, "vendor"),
        mri_date=_text(row, "mri_date"),
        study_instance_uid=_text(row, "study_instance_uid"),
    )


def _highest_lesion_pirads(row: dict[str, str | None]) -> str | None:
    """PI-CAI's per-lesion `lesion_PIRADS` ("4,4", "N/A") -> the case's highest, or None."""
    values = [v.strip() for v in (_text(row, "lesion_PIRADS") or "").split(",")]
    scores = [int(v) for v in values if v.isdigit()]
    return str(max(scores)) if scores else None


def _kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two binary ratings (NaN when undefined)."""
    if a.size == 0:
        return math.nan
    po = float(np.mean(a == b))
    pe = float(np.mean(a) * np.mean(b) + np.mean(~a) * np.mean(~b))
    return math.nan if pe >= 1.0 else (po - pe) / (1.0 - pe)


def performance(
    outcomes: Sequence[Outcome],
    thresholds: Thresholds,
    *,
    n_bootstrap: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Case-level performance of `outcomes` (AI score vs biopsy) and agreement with PI-RADS."""
    known = [o for o in outcomes if o.is_cspca is not None]
    y = np.array([o.is_cspca for o in known], dtype=int)
    s = np.array([o.ai_score for o in known], dtype=float)
    doc: dict[str, Any] = {
        "n_studies": len(outcomes),
        "n_with_outcome": len(known),
        "n_pending": len(outcomes) - len(known),
        "n_cspca": int(y.sum()),
    }
    if known:
        ci = bootstrap_ci(
            len(known), lambda i: _auroc(y[i], s[i]), n_bootstrap=n_bootstrap, seed=seed
        )
        doc["auroc"], doc["auroc_ci"] = ci.value, [ci.low, ci.high]
        doc["ap"] = case_average_precision(y, s)
    else:
        doc["auroc"], doc["auroc_ci"], doc["ap"] = math.nan, [math.nan, math.nan], math.nan
    for name, cut in (("soon", thresholds.soon), ("urgent", thresholds.urgent)):
        flagged = s >= cut
        tp, pos = int(np.sum(flagged & (y == 1))), int(np.sum(y == 1))
        tn, neg = int(np.sum(~flagged & (y == 0))), int(np.sum(y == 0))
        doc[f"at_{name}"] = {
            "threshold": cut,
            "sensitivity": tp / pos if pos else math.nan,
            "sensitivity_ci": list(clopper_pearson(tp, pos)) if pos else [math.nan, math.nan],
            "specificity": tn / neg if neg else math.nan,
        }
    rated = [o for o in outcomes if o.pirads is not None]
    ai_pos = np.array([o.ai_score >= thresholds.soon for o in rated], dtype=bool)
    mri_pos = np.array([(o.pirads or 0) >= PIRADS_POSITIVE for o in rated], dtype=bool)
    doc["pirads_agreement"] = {
        "n": len(rated),
        "rule": f"AI >= soon ({thresholds.soon:g}) vs PI-RADS >= {PIRADS_POSITIVE}",
        "agreement": float(np.mean(ai_pos == mri_pos)) if rated else math.nan,
        "kappa": _kappa(ai_pos, mri_pos),
    }
    flagged_known = s >= thresholds.soon
    doc["biopsy_agreement"] = {
        "n": len(known),
        "rule": f"AI >= soon ({thresholds.soon:g}) vs csPCa (ISUP >= 2)",
        "agreement": float(np.mean(flagged_known == (y == 1))) if known else math.nan,
        "kappa": _kappa(flagged_known, y == 1),
    }
    return doc


def live_performance(
    outcomes: Sequence[Outcome],
    thresholds_for: Any,
    *,
    n_bootstrap: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """`radtriage evaluate --data MARKSHEET`: performance per model version, and within each
    version per site and per vendor. `thresholds_for(model_ref)` gives each version's
    operating thresholds (its metadata's, or provisional ones)."""
    if not outcomes:
        raise InputError("the outcome marksheet held no studies")
    by_version: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_version.setdefault(o.group("model_version"), []).append(o)
    versions: dict[str, Any] = {}
    for ref, rows in sorted(by_version.items()):
        thresholds = thresholds_for(ref)
        entry = performance(rows, thresholds, n_bootstrap=n_bootstrap, seed=seed)
        entry["thresholds"] = {"urgent": thresholds.urgent, "soon": thresholds.soon}
        for key in ("site", "vendor"):
            entry[f"by_{key}"] = {
                group: performance(members, thresholds, n_bootstrap=n_bootstrap, seed=seed)
                for group, members in sorted(_grouped(rows, key).items())
            }
        versions[ref] = entry
    return json_safe(
        {"kind": "live_performance", "n_studies": len(outcomes), "by_model_version": versions}
    )


def _grouped(rows: Iterable[Outcome], key: str) -> dict[str, list[Outcome]]:
    out: dict[str, list[Outcome]] = {}
    for o in rows:
        out.setdefault(o.group(key), []).append(o)
    return out
