"""The ML engineers' loop end to end: radiologist/pathology feedback (an outcome marksheet) ->
`evaluate --data` live performance -> a candidate in shadow (stored, not sent) -> the promotion
gate refuses the worse candidate, then allows it forced with a recorded reason; every promotion
path (CLI, repository API, training, rollback, what the server rolls out) meets the same gate.
Monitoring: the report with an alert from the config, and the new /metrics series."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from core.domain import ModelInfo, ModelRef, Priority, StudyStatus, TriageResult
from evaluation.outcomes import read_outcomes
from evaluation.promotion import gate
from models.repository import ModelRepository, PromotionRefusedError
from models.shadow_log import ShadowLog
from tests.models.conftest import export_tiny
from workspace.metrics import Metrics

N_STUDIES = 40
COLUMNS = [
    "patient_id",
    "study_id",
    "study_instance_uid",
    "mri_date",
    "pirads",
    "case_ISUP",
    "case_csPCa",
    "ai_score",
    "model_name",
    "model_version",
    "site",
    "vendor",
]


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    root = tmp_path / "repo"
    export_tiny(root, "cspca_detector", "1.0.0", seed=1)
    export_tiny(root, "cspca_detector", "1.1.0", seed=2)
    repository = ModelRepository(root)
    repository.promote("cspca_detector:1.0.0", reason="baseline")  # first: nothing to compare
    return repository


def _studies() -> list[dict[str, object]]:
    """Live studies scored by 1.0.0 (good), shadowed by 1.1.0 (no skill), with outcomes."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_STUDIES):
        cspca = i % 2 == 0
        pending = i >= N_STUDIES - 4  # biopsy not back yet
        live = float(np.clip(rng.normal(0.65 if cspca else 0.25, 0.2), 0.01, 0.99))
        rows.append(
            {
                "patient_id": f"1{i:04d}",
                "study_id": f"2{i:04d}",
                "study_instance_uid": f"1.2.826.0.1.3680043.10.1.{i}",
                "mri_date": f"2026-11-{1 + i % 28:02d}",
                "pirads": 4 if cspca else (2 if i % 3 else 3),
                "case_ISUP": "" if pending else (2 + i % 3 if cspca else 0),
                "case_csPCa": "" if pending else ("YES" if cspca else "NO"),
                "ai_score": round(live, 4),
                "model_name": "cspca_detector",
                "model_version": "1.0.0",
                "site": "site-a" if i % 4 < 2 else "site-b",
                "vendor": "siemens" if i % 3 else "ge",
                "shadow_score": float(rng.uniform(0.01, 0.99)),
            }
        )
    return rows


def _write_marksheet(path: Path, studies: list[dict[str, object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(studies)
    return path


def _shadow(folder: Path, studies: list[dict[str, object]]) -> Path:
    log = ShadowLog(folder)
    live = ModelRef("cspca_detector", "1.0.0", "0" * 64)
    candidate = ModelRef("cspca_detector", "1.1.0", "1" * 64)
    for s in studies:
        log.append_comparison(
            str(s["study_instance_uid"]),
            live,
            float(s["ai_score"]),  # type: ignore[arg-type]
            candidate,
            float(s["shadow_score"]),  # type: ignore[arg-type]
            shadow_lesions=1,
        )
    log.append_comparison("1.2.3.999", live, 0.5, candidate, None, error="InferenceError: x")
    return folder


def test_feedback_evaluate_shadow_gate_end_to_end(
    repo: ModelRepository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    studies = _studies()
    marksheet = _write_marksheet(tmp_path / "marksheet.csv", studies)
    shadow = _shadow(tmp_path / "shadow", studies)
    base = ["models", "--repository", str(repo.root)]

    # evaluate --data MARKSHEET: live performance per model version, site and vendor
    args = ["evaluate", "--data", str(marksheet), "--repository", str(repo.root)]
    assert main([*args, "--bootstrap", "200", "--json"]) == 0
    live = json.loads(capsys.readouterr().out)["by_model_version"]["cspca_detector:1.0.0"]
    assert live["n_studies"] == N_STUDIES and live["n_pending"] == 4
    assert live["n_with_outcome"] == N_STUDIES - 4 and live["n_cspca"] == (N_STUDIES - 4) // 2
    assert 0.8 < live["auroc"] < 1.0 and live["auroc_ci"][0] < live["auroc"]
    assert live["thresholds"] == {"urgent": 0.6, "soon": 0.3}  # the version's own metadata
    assert set(live["by_site"]) == {"site-a", "site-b"}
    assert set(live["by_vendor"]) == {"siemens", "ge"}
    assert live["pirads_agreement"]["n"] == N_STUDIES and live["pirads_agreement"]["kappa"] > 0
    assert main([*args, "--bootstrap", "50"]) == 0
    assert "site site-a" in capsys.readouterr().out
    assert main([*args, "--write-thresholds"]) == 2  # needs images, not reported scores
    assert "need images" in capsys.readouterr().err

    # the shadow comparison report (results stored by the server, never sent)
    shadow_args = [*base, "shadow-report", "--shadow", str(shadow), "--outcomes", str(marksheet)]
    assert main([*shadow_args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_studies"] == N_STUDIES + 1 and report["n_shadow_errors"] == 1
    assert report["n_with_outcome"] == N_STUDIES - 4
    assert report["auroc"]["b"] < report["auroc"]["a"]
    assert report["auroc"]["difference"]["ci"][1] < 0
    assert main(shadow_args) == 0
    assert "shadow cspca_detector:1.1.0" in capsys.readouterr().out

    # the gate refuses the worse candidate; nothing changes
    promote = [*base, "promote", "cspca_detector:1.1.0", "--shadow", str(shadow)]
    promote += ["--outcomes", str(marksheet), "--bootstrap", "200", "--json"]
    assert main(promote) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == "promotion_refused" and "live AUROC" in error["message"]
    assert repo.promoted("cspca_detector") == "1.0.0"
    assert len(repo.promotion_log("cspca_detector")) == 1

    # ... and allows it forced, with the reason and the evidence in the append-only log
    assert main([*promote, "--force", "--reason", "site B recalibration, see ticket 42"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["gate"]["outcome"] == "forced"
    assert entry["gate"]["force_reason"] == "site B recalibration, see ticket 42"
    assert entry["gate"]["evidence"]["live"]["auroc"]["difference"]["ci"][1] < 0
    assert repo.promoted("cspca_detector") == "1.1.0"
    log = repo.promotion_log("cspca_detector")
    assert [e["gate"]["outcome"] for e in log] == ["first", "forced"]
    assert log[-1]["previous"] == "1.0.0" and log[-1]["user"]


def test_every_promotion_path_meets_the_same_gate(repo: ModelRepository, tmp_path: Path) -> None:
    studies = _studies()
    outcomes = read_outcomes(_write_marksheet(tmp_path / "m.csv", studies))
    records = list(ShadowLog(_shadow(tmp_path / "shadow", studies)).records())

    # repository API: no decision, a refused decision, or one made against another version
    with pytest.raises(PromotionRefusedError, match="needs a gate decision"):
        repo.promote("cspca_detector:1.1.0")
    refused = gate(repo, "cspca_detector", "1.1.0", shadow=records, outcomes=outcomes)
    assert refused.outcome == "refused" and not refused.allowed
    with pytest.raises(PromotionRefusedError, match="refused"):
        repo.promote("cspca_detector:1.1.0", refused)
    no_evidence = gate(repo, "cspca_detector", "1.1.0")
    assert no_evidence.outcome == "refused" and "no evidence" in no_evidence.reason
    too_little = gate(repo, "cspca_detector", "1.1.0", shadow=records, outcomes=outcomes[-4:])
    assert too_little.outcome == "refused" and "too little live evidence" in too_little.reason

    # the same shadow data, candidate better: passes on its evidence
    flipped = [{**s, "ai_score": s["shadow_score"], "shadow_score": s["ai_score"]} for s in studies]
    better = list(ShadowLog(_shadow(tmp_path / "better", flipped)).records())
    passed = gate(repo, "cspca_detector", "1.1.0", shadow=better, outcomes=outcomes)
    assert passed.outcome == "passed" and passed.evidence["live"]["auroc"]["b"] > 0.8

    # training's auto-promotion only ever makes a first promotion
    from training.train import _promote_first

    assert _promote_first(repo.root, "cspca_detector", "1.1.0") is False
    assert repo.promoted("cspca_detector") == "1.0.0"

    # the server rolls out `promoted(NAME)`: a production.json written around the gate is
    # not a promotion (RadtriageApp.check_promotions reads exactly this)
    production = repo.root / "cspca_detector" / "production.json"
    production.write_text(production.read_text().replace('"1.0.0"', '"1.1.0"'))
    assert repo.promoted("cspca_detector") is None
    production.write_text(production.read_text().replace('"1.1.0"', '"1.0.0"'))
    assert repo.promoted("cspca_detector") == "1.0.0"

    repo.promote("cspca_detector:1.1.0", passed)
    assert repo.promoted("cspca_detector") == "1.1.0"
    stale = gate(repo, "cspca_detector", "1.1.0")  # same version: nothing to decide
    assert stale.outcome == "same"
    with pytest.raises(PromotionRefusedError, match="run the gate again"):
        repo.promote(
            "cspca_detector:1.0.0",
            refused.__class__(
                "forced", "cspca_detector", "1.0.0", "1.0.0", "old", force_reason="x"
            ),
        )


def test_training_reads_the_feedback_marksheet_without_pending_cases(tmp_path: Path) -> None:
    """The same marksheet feeds training (PI-CAI layout): a pending biopsy is no negative."""
    from training.datasets import read_marksheet

    studies = _studies()
    labels = read_marksheet(_write_marksheet(tmp_path / "m.csv", studies))
    assert len(labels) == N_STUDIES - 4
    assert labels["10000_20000"] is True and labels["10001_20001"] is False
    assert "1" + f"{N_STUDIES - 1:04d}_2{N_STUDIES - 1:04d}" not in labels
    studies[0]["case_csPCa"] = ""  # ISUP alone decides
    assert read_marksheet(_write_marksheet(tmp_path / "m.csv", studies))["10000_20000"] is True


def test_real_picai_marksheet_row_is_read(shared_data: Path, tmp_path: Path) -> None:
    """A real PI-CAI marksheet row (ProstateX-0001: ISUP 1, two PI-RADS 4 lesions, RUMC) with
    the AI columns a feedback export adds."""
    source = shared_data / "prostatex" / "labels" / "marksheet_ProstateX-0001.csv"
    if not source.is_file():
        pytest.skip(f"{source} absent (../shared/data is not in a fresh clone)")
    with source.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    target = tmp_path / "marksheet.csv"
    with target.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "ai_score", "model_version"])
        writer.writeheader()
        writer.writerows({**r, "ai_score": "0.41", "model_version": "0.1.0"} for r in rows)
    (outcome,) = read_outcomes(target)
    assert outcome.case_id == "10795_1000811" and outcome.is_cspca is False
    assert outcome.pirads == 4 and outcome.site == "RUMC" and outcome.mri_date == "2011-12-07"


def _result(uid: str, priority: Priority, likelihood: float | None, code: str | None = None):
    return TriageResult(
        study_instance_uid=uid,
        status=StudyStatus.REPORTED,
        priority=priority,
        case_likelihood=likelihood,
        model=ModelInfo(name="cspca_detector", version="1.0.0", sha256="0" * 64),
        reason={"code": code, "message": "x"} if code else None,
    )


def test_monitoring_report_alerts_from_config_and_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    studies = _studies()
    marksheet = _write_marksheet(tmp_path / "m.csv", studies)
    results = tmp_path / "results"
    metrics = Metrics()
    for i, s in enumerate(studies):
        score = float(s["ai_score"])  # type: ignore[arg-type]
        if i % 8 == 6:
            r = _result(str(s["study_instance_uid"]), Priority.NOT_ANALYSED, None, "series_missing")
        else:
            prio = Priority.URGENT if score >= 0.6 else Priority.ROUTINE
            r = _result(str(s["study_instance_uid"]), prio, score)
        folder = results / str(i)
        folder.mkdir(parents=True)
        doc = {**r.to_json_dict(), "analysed_at": f"2026-11-{2 + 7 * (i % 2):02d}T10:00:00+00:00"}
        (folder / "result.json").write_text(json.dumps(doc))
        metrics.observe_result(r)
    metrics.observe_shadow("cspca_detector:1.1.0", 0.2)
    config = tmp_path / "radtriage.toml"
    config.write_text("[monitoring]\nmin_studies = 5\nnot_analysed_share_max = 0.05\n")
    args = ["models", "monitor", "--results", str(results), "--outcomes", str(marksheet)]
    assert main([*args, "--config", str(config), "--json"]) == 3  # alerts raised
    doc = json.loads(capsys.readouterr().out)
    periods = doc["by_model_version"]["cspca_detector:1.0.0"]
    assert list(periods) == ["2026-W45", "2026-W46"]
    first = periods["2026-W45"]
    assert first["n_studies"] == 20 and first["not_analysed_by_reason"] == {"series_missing": 0.25}
    assert sum(first["likelihood"]["histogram"]["counts"]) == 15
    assert first["outcomes"]["n"] == 15 and first["outcomes"]["pirads_agreement"] is not None
    assert {a["metric"] for a in doc["alerts"]} >= {"not_analysed_share"}
    config.write_text("[monitoring]\nnot_analysed_sharemax = 0.05\n")
    assert main([*args, "--config", str(config)]) == 1  # a misspelt key is a config error
    assert "monitoring" in capsys.readouterr().err  # names the section of the bad key

    text = metrics.exposition().decode()
    assert 'radtriage_case_likelihood_count{model="cspca_detector:1.0.0"} 35.0' in text
    assert 'radtriage_not_analysed_total{reason="series_missing"} 5.0' in text
    assert 'radtriage_model_priority_total{model="cspca_detector:1.0.0",priority="urgent"}' in text
    assert (
        'radtriage_shadow_studies_total{outcome="ok",shadow_model="cspca_detector:1.1.0"}' in text
    )
