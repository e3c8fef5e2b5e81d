"""Campaign: calibrate, band and gate a copy of a model, then measure it where it was not fitted.

    python -m evaluation.domain_campaign --out benchmarks/results/domain_gate.json

1. copies the model repository (the bundled one by default: it is never modified) to a
   temporary folder and runs `radtriage evaluate --data phantoms:N:SEED --write-thresholds`
   on it (calibration split + held-out check split, see `evaluation.validation_fit`);
2. runs the gated, calibrated pipeline on fresh phantoms (a seed never used), on each shifted
   family of `evaluation.phantom_shift`, and on the real ProstateX exam in ../shared/data when
   it is there: AUROC, three-band PPV/NPV, sensitivity at soon-or-above and the gate's
   low-confidence/outside rate per family.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import OutsideValidatedDomainError
from evaluation.metrics import _auroc, json_safe
from evaluation.operating_points import band_metrics
from evaluation.phantom_shift import SHIFTS, shifted_phantom_cases
from evaluation.runner import LabelledCase, phantom_cases
from models.pipeline import TriagePipeline
from models.repository import default_repository

PROSTATEX = Path(__file__).resolve().parents[2] / "shared" / "data" / "prostatex" / "ProstateX-0001"


Row = tuple[bool, float | None, str, float | None]


def _run(pipeline: TriagePipeline, cases: Iterable[LabelledCase]) -> dict[str, Any]:
    rows: list[Row] = []
    for case in cases:
        try:
            p = pipeline.predict(case.t2w, case.adc, case.hbv)
            domain = getattr(p, "domain", None)
            rows.append(
                (
                    case.is_cspca,
                    p.case_likelihood,
                    domain.verdict if domain is not None else "in_domain",
                    domain.distance if domain is not None else None,
                )
            )
        except OutsideValidatedDomainError:
            rows.append((case.is_cspca, None, "outside", None))
    return _summary(rows, pipeline)


def _summary(rows: list[Row], pipeline: Any) -> Any:
    n = len(rows)
    analysed = [(y, s) for y, s, _, _ in rows if s is not None]
    y = np.array([a[0] for a in analysed], dtype=bool)
    s = np.array([a[1] for a in analysed], dtype=float)
    out: dict[str, Any] = {
        "n": n,
        "n_cspca": int(sum(r[0] for r in rows)),
        "gate_outside": sum(r[2] == "outside" for r in rows) / n,
        "gate_low_confidence": sum(r[2] == "low_confidence" for r in rows) / n,
        "median_distance": float(np.median([r[3] for r in rows if r[3] is not None] or [np.nan])),
        "n_analysed": len(analysed),
    }
    if y.size and y.any() and not y.all():
        out["auroc_analysed"] = _auroc(y.astype(int), s)
        out["bands_analysed"] = band_metrics(s.tolist(), y.tolist(), pipeline.thresholds)
    return json_safe(out)


def _prostatex(pipeline: TriagePipeline) -> dict[str, Any]:
    if not PROSTATEX.is_dir():
        return {"skipped": f"{PROSTATEX} absent"}
    from imaging.series_selection import load_rules
    from imaging.study_reader import scan_study
    from imaging.study_volumes import load_study_volumes

    files = sorted(p for p in PROSTATEX.rglob("*") if p.is_file())
    volumes = load_study_volumes(scan_study(files), load_rules())
    try:
        p = pipeline.predict(volumes.t2w, volumes.adc, volumes.hbv)
    except OutsideValidatedDomainError as exc:
        return {"verdict": "outside", "reason": exc.to_dict()}
    d = getattr(p, "domain", None)
    return {
        "verdict": d.verdict if d is not None else "in_domain",
        "distance": d.distance if d is not None else None,
        "furthest": list(d.furthest) if d is not None else [],
        "case_likelihood": p.case_likelihood,
        "raw_case_likelihood": getattr(p, "raw_case_likelihood", None),
        "truth": "csPCa negative (biopsy ISUP 1)",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", type=Path, default=None)
    ap.add_argument("--fit", default="phantoms:300:800000", help="--data of the fit run")
    ap.add_argument("--calibration", default="platt", choices=("platt", "isotonic", "none"))
    ap.add_argument("--urgent-specificity", type=float, default=0.90)
    ap.add_argument("--fresh", type=int, nargs=2, default=(90, 910000), metavar=("N", "SEED"))
    ap.add_argument("--shifted", type=int, nargs=2, default=(30, 920000), metavar=("N", "SEED"))
    ap.add_argument(
        "--no-fit",
        action="store_true",
        help="measure the repository's own calibration, bands and gate (no refit on a copy)",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/domain_gate.json"))
    args = ap.parse_args(argv)
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="radtriage-domain-"))
    repo = work / "repository"
    shutil.copytree(args.repository or default_repository(), repo)
    if args.no_fit:
        return _write(args, _measure(args, repo, None), started, work)
    fit_json = work / "fit.json"
    cmd = [
        sys.executable,
        "-m",
        "cli.main",
        "evaluate",
        "--data",
        args.fit,
        "--repository",
        str(repo),
        "--write-thresholds",
        "--calibration",
        args.calibration,
        "--urgent-specificity",
        str(args.urgent_specificity),
        "--bootstrap",
        "200",
        "--out",
        str(fit_json),
        "--report",
        str(work / "fit.html"),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return _write(args, _measure(args, repo, json.loads(fit_json.read_text())), started, work)


def _measure(args: argparse.Namespace, repo: Path, fit: dict[str, Any] | None) -> dict[str, Any]:
    # the fit is a new version beside the promoted one (versions are immutable): measure that
    if fit is not None and fit.get("new_version"):
        pipeline = TriagePipeline.from_repository(repository=repo, detector=fit["new_version"])
    else:
        pipeline = TriagePipeline.from_repository(repository=repo)
    md = pipeline.detector_metadata
    thresholds = (
        {"urgent": md.thresholds.urgent, "soon": md.thresholds.soon} if md.thresholds else None
    )
    n, seed = args.fresh
    return {
        "model": f"{md.name}:{md.version}",
        "fit": {
            "data": args.fit,
            "calibration": args.calibration,
            "urgent_specificity": args.urgent_specificity,
            "thresholds": thresholds,
            "validation_fit": fit.get("validation_fit"),
            "check_split_auroc": fit.get("auroc"),
            "check_split_auroc_ci": fit.get("auroc_ci"),
        }
        if fit is not None
        else {
            "refit": False,
            "thresholds": thresholds,
            "source": md.thresholds.source if md.thresholds else None,
        },
        "fresh_phantoms": {"seed": seed, **_run(pipeline, phantom_cases(n, seed))},
        "fresh_randomised_phantoms": {
            "seed": seed + n,
            **_run(pipeline, phantom_cases(n, seed + n, "randomised")),
        },
        "shifted": {
            shift: _run(pipeline, shifted_phantom_cases(args.shifted[0], args.shifted[1], shift))
            for shift in SHIFTS
        },
        "prostatex": _prostatex(pipeline),
    }


def _write(args: argparse.Namespace, doc: dict[str, Any], started: float, work: Path) -> int:
    doc["seconds"] = round(time.time() - started, 1)
    doc["work"] = str(work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(doc), indent=2) + "\n", encoding="utf-8")
    print(json.dumps(json_safe(doc), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
