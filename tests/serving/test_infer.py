"""`radtriage infer` end to end on phantoms and the real ProstateX exam (real DICOM, real ONNX)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from cli.main import main
from core.domain import TriageResult


def _infer(study: Path, out: Path, repo: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    code = main(["infer", str(study), "--out", str(out), "--repository", str(repo), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "result.json").read_text())
    assert printed == written
    TriageResult.model_validate(written)  # the result.json schema
    return written


def test_positive_phantom_is_urgent(
    phantoms: dict[str, Path], model_repository: Path, tmp_path: Path, capsys
) -> None:
    result = _infer(phantoms["positive"], tmp_path, model_repository, capsys)
    assert result["priority"] == "urgent"
    assert result["status"] == "reported"
    assert result["case_likelihood"] >= 0.5
    assert result["lesions"] and result["lesions"][0]["volume_ml"] > 0
    assert set(result["series_used"]) == {"t2w", "adc", "hbv"}
    assert result["model"]["name"] == "cspca_detector" and result["model"]["version"] == "1"
    assert {"load", "inference", "report", "total"} <= set(result["timings_ms"])
    assert "NOT FOR CLINICAL USE" in result["disclaimer"]
    sr = pydicom.dcmread(tmp_path / "sr.dcm")
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == result["study_instance_uid"]
    assert sr.Modality == "SR" and seg.Modality == "SEG"


def test_negative_phantom_is_routine(
    phantoms: dict[str, Path], model_repository: Path, tmp_path: Path, capsys
) -> None:
    result = _infer(phantoms["negative"], tmp_path, model_repository, capsys)
    assert result["priority"] == "routine"
    assert result["case_likelihood"] < 0.3
    assert (tmp_path / "sr.dcm").is_file()


def test_study_without_t2w_is_not_analysed_with_reason(
    phantoms: dict[str, Path], model_repository: Path, tmp_path: Path, capsys
) -> None:
    result = _infer(phantoms["no_t2w"], tmp_path, model_repository, capsys)
    assert result["priority"] == "not_analysed"
    assert result["reason"]["code"] == "missing_t2w"
    assert result["case_likelihood"] is None
    sr = pydicom.dcmread(tmp_path / "sr.dcm")  # never silent: PACS gets a "not analysed" SR
    assert sr.StudyInstanceUID == result["study_instance_uid"]
    assert not (tmp_path / "seg.dcm").exists()


def test_prostatex_completes_with_a_valid_result(
    prostatex: Path, model_repository: Path, tmp_path: Path, capsys
) -> None:
    result = _infer(prostatex, tmp_path, model_repository, capsys)
    assert result["status"] == "reported"
    assert result["priority"] in {"urgent", "soon", "routine"}
    assert 0.0 <= result["case_likelihood"] <= 1.0
    assert result["series_used"]["t2w"] and result["series_used"]["adc"]
    assert (tmp_path / "sr.dcm").is_file()


def test_unusable_arguments_exit_2(model_repository: Path, tmp_path: Path, capsys) -> None:
    assert main(["infer", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    args = ["infer", str(tmp_path), "--out", str(tmp_path / "o"), "--json"]
    code = main([*args, "--repository", str(model_repository), "--model", "cspca_detector:9"])
    assert code == 2
    assert (
        "cspca_detector:9"
        in json.loads(capsys.readouterr().out.splitlines()[-1])["error"]["message"]
    )


@pytest.mark.parametrize(("days", "expected"), [(10, "routine"), (22, "soon"), (26, "urgent")])
def test_waiting_time_from_the_request_date_escalates_before_the_28_day_standard(
    phantoms: dict[str, Path], model_repository: Path, tmp_path: Path, capsys, days, expected
) -> None:
    """Issue Date of Imaging Service Request (0040,2004) starts the clock: a negative study is
    raised to soon 7 days and to urgent 3 days before the Faster Diagnosis Standard breach."""
    import datetime as dt
    import shutil

    study = tmp_path / "study"
    shutil.copytree(phantoms["negative"], study)
    issued = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days)).strftime("%Y%m%d")
    for path in study.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.IssueDateOfImagingServiceRequest = issued
        ds.save_as(path)
    result = _infer(study, tmp_path / "out", model_repository, capsys)
    assert result["case_likelihood"] < 0.3  # the AI alone says routine
    assert result["priority"] == expected
    assert result["days_waited"] == days and result["referral_urgency"] == "routine"
    assert result["priority_reasons"][0].startswith("AI csPCa likelihood")
    waited = [r for r in result["priority_reasons"] if r.startswith(f"waited {days} days")]
    assert bool(waited) == (expected != "routine"), result["priority_reasons"]
    from dicom_node.sr_reader import read_triage_sr

    sr = read_triage_sr(pydicom.dcmread(tmp_path / "out" / "sr.dcm"))  # what the PACS gets
    assert (sr.priority, sr.days_waited, sr.referral_urgency) == (expected, days, "routine")


def test_days_since_referral_ignores_missing_malformed_and_future_dates() -> None:
    import datetime as dt

    from pydicom.dataset import Dataset

    from imaging.request_attributes import days_since_referral

    def ds(value: str | None) -> Dataset:
        d = Dataset()
        if value is not None:
            d.IssueDateOfImagingServiceRequest = value
        return d

    today = dt.date(2026, 11, 22)
    assert days_since_referral([ds(None)], today) is None
    assert days_since_referral([ds("2026-11-01"), ds("garbage"), ds("20271201")], today) is None
    assert days_since_referral([ds("20261110"), ds("20261101"), ds(None)], today) == 21
    assert days_since_referral([ds("20251122")], today) == 365
    assert days_since_referral([ds("20251121")], today) is None  # an archive study re-sent
