"""Case-likelihood calibration: monotone maps in metadata, applied by the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import ModelError
from evaluation.metrics import calibration
from models.calibration import CalibrationSpec, calibrate, fit_calibration
from models.metadata import read_metadata, write_metadata
from models.pipeline import TriagePipeline
from training.phantoms import synthesize_case


def _overconfident(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose true csPCa rate is score**3 (badly calibrated, well ranked)."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0, 1, n)
    y = rng.uniform(0, 1, n) < s**3
    return s, y


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_fit_is_monotone_and_lowers_ece_on_new_cases(method: str) -> None:
    s, y = _overconfident(0)
    spec = fit_calibration(s, y, method=method, source="test")
    grid = np.linspace(0, 1, 501)
    out = calibrate(grid, spec)
    assert np.all(np.diff(out) >= 0) and out.min() >= 0 and out.max() <= 1
    s2, y2 = _overconfident(1)
    before = calibration(y2.astype(int), s2)["ece"]
    after = calibration(y2.astype(int), np.asarray(calibrate(s2, spec)))["ece"]
    assert after < before / 2


def test_platt_keeps_the_ranking() -> None:
    s, y = _overconfident(2)
    spec = fit_calibration(s, y, method="platt", source="test")
    order = np.argsort(s)
    assert np.all(np.diff(np.asarray(calibrate(s[order], spec))) > 0)
    assert spec.parameters["a"] > 0


def test_absent_is_identity_and_knots_are_validated() -> None:
    assert calibrate(0.37, None) == 0.37
    with pytest.raises(ValueError, match="increasing"):
        CalibrationSpec(
            method="isotonic", x=(0.5, 0.2), y=(0.1, 0.2), n_cases=2, n_cspca=1, source="t"
        )
    with pytest.raises(ValueError, match="monotone"):
        CalibrationSpec(
            method="isotonic", x=(0.2, 0.5), y=(0.3, 0.2), n_cases=2, n_cspca=1, source="t"
        )
    with pytest.raises(ValueError, match="positive and negative"):
        fit_calibration([0.1, 0.2], [True, True], source="t")


def _calibrated(repo: Path) -> Path:
    path = repo / "cspca_detector" / "1.0.0" / "metadata.json"
    md = read_metadata(path)
    spec = CalibrationSpec(
        method="isotonic", x=(0.0, 1.0), y=(0.2, 0.4), n_cases=10, n_cspca=5, source="test"
    )
    thresholds = md.thresholds.model_copy(update={"scale": "calibrated"})  # type: ignore[union-attr]
    write_metadata(path, md.model_copy(update={"calibration": spec, "thresholds": thresholds}))
    return path


def test_metadata_refuses_raw_thresholds_with_a_calibration(tiny_repo: Path) -> None:
    path = _calibrated(tiny_repo)
    doc = json.loads(path.read_text())
    assert read_metadata(path).calibration is not None
    doc["thresholds"]["scale"] = "raw"
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="calibrat"):
        read_metadata(path)


def test_pipeline_reports_the_calibrated_likelihood(tiny_repo: Path) -> None:
    _calibrated(tiny_repo)
    pipe = TriagePipeline.from_repository(
        tiny_repo, detector="cspca_detector:1.0.0", gland="prostate_gland:1.0.0", device="cpu"
    )
    case = synthesize_case(3, cspca=True)
    p = pipe.predict(case.t2w, case.adc, case.hbv)
    raw = p.raw_case_likelihood  # type: ignore[attr-defined]
    assert raw is not None and 0.0 <= raw <= 1.0
    assert p.case_likelihood == pytest.approx(0.2 + 0.2 * raw)
    for lesion in p.lesions:  # lesion likelihoods are on the same (calibrated) scale
        assert 0.2 <= lesion.likelihood <= 0.4
