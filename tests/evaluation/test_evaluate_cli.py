"""`radtriage evaluate` end to end with the bundled models (skips until they are bundled)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cli.main import main


@pytest.fixture(scope="module")
def bundled() -> None:
    repo = pytest.importorskip("models.repository").ModelRepository()
    if "cspca_detector" not in repo.names() or "prostate_gland" not in repo.names():
        pytest.skip("bundled models not in models/repository yet")
    try:
        repo.resolve("cspca_detector")
    except Exception as exc:
        pytest.skip(f"no promoted bundled detector: {exc}")


@pytest.mark.slow  # seconds of training/evaluation: `make test`, not test-fast
def test_evaluate_json_and_report(bundled, tmp_path, capsys) -> None:
    report = tmp_path / "r.html"
    rc = main(
        [
            "evaluate",
            "--data",
            "phantoms:4:100000",
            "--json",
            "--bootstrap",
            "50",
            "--report",
            str(report),
        ]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    for key in (
        "auroc",
        "ap",
        "picai_score",
        "froc",
        "thresholds",
        "calibration",
        "dice",
        "n_cases",
        "operating_points",
    ):
        assert key in doc
    assert doc["n_cases"] == 4
    assert set(doc["thresholds"]) == {"urgent", "soon"}
    assert "sensitivity_ci" in doc["thresholds"]["soon"]
    page = report.read_text()
    assert "data:image/png;base64," in page
    assert not re.search(r"(src|href)=[\"'](?!data:)", page)


@pytest.mark.slow  # seconds of training/evaluation: `make test`, not test-fast
def test_write_thresholds_refused_without_enough_cspca(bundled, capsys) -> None:
    rc = main(
        [
            "evaluate",
            "--data",
            "phantoms:3:100000",
            "--json",
            "--bootstrap",
            "10",
            "--write-thresholds",
        ]
    )
    assert rc == 2
    assert "csPCa" in json.loads(capsys.readouterr().out)["error"]["message"]


@pytest.mark.slow  # seconds of training/evaluation: `make test`, not test-fast
def test_evaluate_reads_the_picai_layout(bundled, tmp_path, capsys) -> None:
    """`--data` on a PI-CAI folder (marksheet.csv, images/<patient>/<case>_<t2w|adc|hbv>.mha,
    labels/...): the layout `radtriage train` reads, here filled with phantoms."""
    import SimpleITK as sitk

    from training.phantoms import synthesize_case
    from training.phantoms.dicom_writer import to_sitk

    lesions = tmp_path / "labels/csPCa_lesion_delineations/human_expert/resampled"
    glands = tmp_path / "labels/anatomical_delineations/whole_gland/AI/Bosma22b"
    for folder in (lesions, glands):
        folder.mkdir(parents=True)
    rows = ["patient_id,study_id,case_csPCa,center"]
    for i, cspca in enumerate((True, False, True, False)):
        case = synthesize_case(910_000 + i, vendor="siemens", cspca=cspca)
        patient, study = 20_001 + i, 2_000_001 + i
        case_id = f"{patient}_{study}"
        images = tmp_path / "images" / str(patient)
        images.mkdir(parents=True)
        for name, vol in (("t2w", case.t2w), ("adc", case.adc), ("hbv", case.hbv)):
            sitk.WriteImage(to_sitk(vol), str(images / f"{case_id}_{name}.mha"))
        keep = [lesion.label for lesion in case.lesions if lesion.is_cspca]
        mask = case.lesion_mask.with_array(np.isin(case.lesion_mask.array, keep).astype(np.uint8))
        sitk.WriteImage(to_sitk(mask), str(lesions / f"{case_id}.nii.gz"))
        sitk.WriteImage(to_sitk(case.gland_mask), str(glands / f"{case_id}.nii.gz"))
        rows.append(f"{patient},{study},{'YES' if cspca else 'NO'},SYNTH")
    (tmp_path / "marksheet.csv").write_text("\n".join(rows) + "\n")

    rc = main(["evaluate", "--data", str(tmp_path), "--json", "--bootstrap", "20"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_cases"] == 4 and doc["n_cspca"] == 2
    assert {c["case_id"] for c in doc["cases"]} == {
        f"{20_001 + i}_{2_000_001 + i}" for i in range(4)
    }
    assert doc["auroc"] > 0.5  # the bundled detector ranks these phantoms
    assert doc["dice"]["n"] == 4 and doc["dice"]["gland_mean"] > 0.8  # masks read and aligned


def test_evaluate_refuses_a_folder_without_labels(bundled, tmp_path, capsys) -> None:
    (tmp_path / "study").mkdir()
    rc = main(["evaluate", "--data", str(tmp_path), "--json"])
    assert rc != 0
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == "invalid_input"
    assert "masks/" in error["message"] and "marksheet.csv" in error["message"]
