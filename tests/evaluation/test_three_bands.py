"""Three distinct bands on a calibration split, measured on a held-out check split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from core.priority import Thresholds
from evaluation.metrics import CaseRecord
from evaluation.operating_points import band_metrics, choose_thresholds, stratified_split
from evaluation.validation_fit import (
    CARD_BEGIN,
    fit_on_splits,
    model_card_section,
    write_card_section,
)
from models.ood_gate import FEATURES


def test_urgent_stays_above_the_score_that_decided_soon() -> None:
    # every negative far below every positive: the old rule put urgent == soon (empty soon band)
    rng = np.random.default_rng(0)
    pos, neg = rng.uniform(0.6, 1.0, 80), rng.uniform(0.0, 0.2, 80)
    s = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(80, bool), np.zeros(80, bool)])
    c = choose_thresholds(s, y)
    assert c.meets_target and c.distinct
    assert c.thresholds.urgent > c.thresholds.soon
    soon_band = (s >= c.thresholds.soon) & (s < c.thresholds.urgent)
    assert soon_band.any()
    assert np.mean(s[~y] < c.thresholds.urgent) >= 0.90


def test_band_metrics_count_each_band() -> None:
    s = [0.9, 0.8, 0.5, 0.4, 0.1, 0.05]
    y = [True, False, True, False, False, True]
    b = band_metrics(s, y, Thresholds(urgent=0.7, soon=0.3))
    assert (b["urgent"]["ppv"]["k"], b["urgent"]["ppv"]["n"]) == (1, 2)
    assert (b["soon"]["ppv"]["k"], b["soon"]["ppv"]["n"]) == (1, 2)
    assert (b["routine"]["npv"]["k"], b["routine"]["npv"]["n"]) == (1, 2)
    assert b["soon_or_above"]["sensitivity"]["value"] == pytest.approx(2 / 3)
    lo, hi = b["urgent"]["ppv"]["ci"]
    assert lo < 0.5 < hi and b["distinct"]


def test_split_is_stratified_disjoint_and_seeded() -> None:
    y = [True] * 30 + [False] * 70
    a, b = stratified_split(y, 0.4, seed=3)
    assert set(a).isdisjoint(b) and len(a) + len(b) == 100
    assert sum(y[i] for i in a) == 12
    assert np.array_equal(stratified_split(y, 0.4, seed=3)[0], a)


def _records(n: int, seed: int) -> list[CaseRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pos = bool(rng.random() < 0.45)
        raw = float(np.clip(rng.normal(0.45 if pos else 0.05, 0.08), 0, 1))
        feats = {f: float(rng.normal()) for f in FEATURES}
        out.append(
            CaseRecord(
                f"c{i}", pos, raw, extra={"raw_likelihood": raw, "features": feats, "gate": None}
            )
        )
    return out


def test_fit_on_splits_keeps_the_check_split_unseen(tmp_path: Path) -> None:
    records = _records(300, 1)
    fit = fit_on_splits(records, data="synthetic", method="platt", check_fraction=0.4)
    check_ids = {records[i].case_id for i in fit.check_index}
    assert len(check_ids) == fit.check_bands["n_cases"] == 120
    assert fit.calibration is not None and fit.calibration.n_cases == 180
    assert fit.gate is not None and fit.gate.n_fit + fit.gate.n_threshold == 180
    assert fit.choice.meets_target and fit.choice.distinct
    cal = fit.summary["calibration_check"]
    assert cal["calibrated"]["ece"] < cal["raw"]["ece"]
    card = tmp_path / "model_card.md"
    card.write_text("# model\n")
    section = model_card_section(fit, source="test")
    write_card_section(card, section)
    write_card_section(card, section)  # replaced, not appended twice
    text = card.read_text()
    assert text.count(CARD_BEGIN) == 1 and "PPV" in text and "NPV" in text
    assert text.startswith("# model")


@pytest.mark.slow  # seconds of training/evaluation: `make test`, not test-fast
def test_evaluate_write_thresholds_writes_calibration_bands_and_gate(tmp_path, capsys) -> None:
    from models.repository import ModelRepository, default_repository

    repo = tmp_path / "repo"
    shutil.copytree(default_repository(), repo)
    try:
        version = ModelRepository(repo).resolve("cspca_detector")
    except Exception as exc:
        pytest.skip(f"no promoted bundled detector: {exc}")
    bundled_path = default_repository() / version.path.relative_to(repo) / "metadata.json"
    bundled_before = bundled_path.read_bytes()
    source_before = (version.path / "metadata.json").read_bytes()
    card_before = (version.path / "model_card.md").read_bytes()
    rc = main(
        [
            "evaluate",
            "--data",
            "phantoms:20:930000",
            "--repository",
            str(repo),
            "--write-thresholds",
            "--target-sensitivity",
            "0.5",
            "--confidence",
            "0.5",
            "--bootstrap",
            "10",
            "--json",
        ]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["evaluated_on"] == "held-out check split"
    assert doc["bands"]["n_cases"] == doc["validation_fit"]["check_split"]["n"]
    # a version is immutable: the fit is a new version beside it, derived from it, not promoted
    name, old = version.metadata.name, version.metadata.version
    assert doc["new_version"] == f"{name}:{old}-t1"
    written = Path(doc["thresholds_written_to"])
    assert written == repo / name / f"{old}-t1" / "metadata.json"
    assert (version.path / "metadata.json").read_bytes() == source_before
    assert (version.path / "model_card.md").read_bytes() == card_before
    new = ModelRepository(repo).verify(doc["new_version"])  # sealed, files intact
    md = json.loads(written.read_text())
    assert md["derived_from"] == f"{name}:{old}" and md["version"] == f"{old}-t1"
    assert md["version_digest"] == new.metadata.content_digest() != version.metadata.digest
    assert md["sha256"] == version.metadata.sha256  # same network, other thresholds
    assert md["calibration"]["method"] == "platt"
    assert md["thresholds"]["scale"] == "calibrated"
    assert "ppv" in md["thresholds"]["bands"]["urgent"]
    assert md["ood_gate"]["features"] == list(FEATURES)
    assert CARD_BEGIN in (written.parent / "model_card.md").read_text()
    assert ModelRepository(repo).promoted(name) == old  # serving changes only on promotion
    assert bundled_path.read_bytes() == bundled_before  # the bundled model is untouched


def test_soon_or_above_sensitivity_is_reported_per_vendor_and_lesion_size() -> None:
    from evaluation.operating_points import lesion_size_class, record_strata

    # two small csPCa lesions on GE, one missed; large ones on Siemens all caught
    records = [
        CaseRecord("a", True, 0.9, vendor="siemens", extra={"largest_lesion_ml": 1.2}),
        CaseRecord("b", True, 0.8, vendor="siemens", extra={"largest_lesion_ml": 0.9}),
        CaseRecord("c", True, 0.4, vendor="ge", extra={"largest_lesion_ml": 0.2}),
        CaseRecord("d", True, 0.05, vendor="ge", extra={"largest_lesion_ml": 0.3}),
        CaseRecord("e", False, 0.02, vendor="ge", extra={"largest_lesion_ml": None}),
    ]
    b = band_metrics(
        [r.likelihood for r in records],
        [r.is_cspca for r in records],
        Thresholds(urgent=0.7, soon=0.1),
        strata=record_strata(records),
    )
    by = b["soon_or_above"]["sensitivity_by"]
    assert (by["vendor"]["ge"]["k"], by["vendor"]["ge"]["n"]) == (1, 2)
    assert (by["vendor"]["siemens"]["k"], by["vendor"]["siemens"]["n"]) == (2, 2)
    assert (by["lesion_size"]["< 0.5 ml"]["k"], by["lesion_size"]["< 0.5 ml"]["n"]) == (1, 2)
    assert by["lesion_size"][">= 0.5 ml"]["value"] == 1.0
    assert lesion_size_class(None) is None and lesion_size_class(0.49) == "< 0.5 ml"
    with pytest.raises(ValueError, match="stratum"):
        band_metrics([0.5], [True], Thresholds(0.7, 0.1), strata={"vendor": []})
