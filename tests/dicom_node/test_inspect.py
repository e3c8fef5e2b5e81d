"""`radtriage inspect` on the real ProstateX exam, checked against PI-CAI's own MHA conversion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from core.domain import SeriesRole
from core.errors import MissingSeriesError, NotDicomError
from imaging.study_volumes import inspect_study, load_study_volumes

REPO = Path(__file__).resolve().parents[2]


def _reference(prostatex: Path, role: str):  # type: ignore[no-untyped-def]
    sitk = pytest.importorskip("SimpleITK")
    path = prostatex.parent / "reference_mha" / f"ProstateX-0001_07-08-2011_{role}.mha"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return sitk.ReadImage(str(path))


def test_inspect_json_matches_picai_reference(prostatex: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "inspect", str(prostatex), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["error"] is None
    assert set(report) == {"study_instance_uid", "series", "volumes", "error"}
    roles = {s["series_number"]: s["role"] for s in report["series"] if s["role"] != "other"}
    assert roles.get(8) == "adc" and roles.get(9) == "hbv"
    assert 6 in roles or 10 in roles
    for s in report["series"]:
        assert set(s) == {
            "series_instance_uid",
            "series_number",
            "series_description",
            "role",
            "reason",
            "instances",
        }
        assert s["reason"]
    for role in ("t2w", "adc", "hbv"):
        ref = _reference(prostatex, role)
        geometry = report["volumes"][role]
        assert geometry["size"] == list(ref.GetSize())
        np.testing.assert_allclose(geometry["spacing"], ref.GetSpacing(), atol=1e-3)
        np.testing.assert_allclose(geometry["origin"], ref.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(geometry["direction"], ref.GetDirection(), atol=1e-3)


def test_study_volumes_voxels_equal_reference(prostatex: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    study = load_study_volumes(prostatex)
    assert set(study.series_used) == {"t2w", "adc", "hbv"}
    for role in (SeriesRole.T2W, SeriesRole.ADC, SeriesRole.HBV):
        volume = study.volume(role)
        reference = sitk.GetArrayFromImage(_reference(prostatex, role.value))
        # Stored values, no rescale: must be bit-identical to PI-CAI's conversion.
        np.testing.assert_array_equal(volume.array, reference)
        headers = study.headers[role]
        assert len(headers) == volume.size[2]
        assert {ds.SeriesInstanceUID for ds in headers} == {study.series_used[role.value]}
        assert all("PixelData" not in ds for ds in headers)


def test_missing_adc_exits_2_with_error(prostatex: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    for series_dir in prostatex.glob("*/*"):
        if series_dir.name.split(".")[0] in {"8"}:
            continue  # leave out the ADC series
        link = tmp_path / series_dir.name
        link.symlink_to(series_dir, target_is_directory=True)
    report = inspect_study(tmp_path)
    assert report["error"]["code"] == "missing_adc"
    assert report["volumes"] == {}
    assert main(["inspect", str(tmp_path), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "missing_adc"
    with pytest.raises(MissingSeriesError) as excinfo:
        load_study_volumes(tmp_path)
    assert excinfo.value.role == "adc"


def test_human_readable_table(prostatex: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["inspect", str(prostatex)]) == 0
    out = capsys.readouterr().out
    assert "t2w" in out and "ImageType ADC" in out and "not axial (sagittal)" in out


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    assert inspect_study(tmp_path)["error"]["code"] == "not_dicom"
    with pytest.raises(NotDicomError):
        load_study_volumes(tmp_path)


def test_brain_study_is_wrong_body_part(shared_data: Path) -> None:
    report = inspect_study(shared_data / "dicom" / "dcm_qa_enh_enhanced_mr")
    assert report["error"]["code"] == "wrong_body_part"
