"""Synthetic bpMRI phantoms: determinism, contrast, ground truth, DICOM validity."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from cli.main import main
from core.domain import Volume
from tests.conftest import require_tool
from training.phantoms import (
    ACQUIRED_B_VALUES,
    VENDORS,
    synthesize_case,
    write_study,
)


def _resample_to(moving: Volume, grid: Volume) -> np.ndarray:
    """Nearest-neighbour values of `moving` at the voxel centres of `grid`."""
    z, y, x = np.indices(grid.array.shape).reshape(3, -1)
    pts = grid.index_to_lps(np.stack([x, y, z], axis=1))
    m = moving.direction_matrix @ np.diag(moving.spacing)
    idx = np.rint(np.linalg.solve(m, (pts - np.asarray(moving.origin)).T).T).astype(int)
    size = np.asarray(moving.size)
    ok = np.all((idx >= 0) & (idx < size), axis=1)
    out = np.full(len(pts), np.nan, np.float32)
    out[ok] = moving.array[idx[ok, 2], idx[ok, 1], idx[ok, 0]]
    return out.reshape(grid.array.shape)


def test_deterministic_by_seed_and_varies_between_seeds() -> None:
    a, b = synthesize_case(7), synthesize_case(7)
    assert a.study_instance_uid == b.study_instance_uid
    assert np.array_equal(a.t2w.array, b.t2w.array)
    assert np.array_equal(a.adc.array, b.adc.array)
    assert np.array_equal(a.lesion_mask.array, b.lesion_mask.array)
    assert a.lesions == b.lesions
    c = synthesize_case(8)
    assert c.study_instance_uid != a.study_instance_uid
    assert c.t2w.array.shape != a.t2w.array.shape or not np.array_equal(c.t2w.array, a.t2w.array)


def test_shapes_like_a_real_exam() -> None:
    case = synthesize_case(3, vendor="ge")
    assert case.t2w.array.dtype == np.float32
    assert 0.45 <= case.t2w.spacing[0] <= 0.7 and case.t2w.spacing[2] == 3.0
    assert 16 <= case.t2w.size[2] <= 26
    assert case.adc.spacing[0] > 1.5 and case.adc.size == case.hbv.size
    assert sorted(case.dwi) == list(ACQUIRED_B_VALUES)
    # One Frame of Reference and the same slight obliquity for every series.
    assert case.t2w.direction == case.adc.direction
    assert not np.allclose(case.t2w.direction_matrix, np.eye(3))
    assert case.t2w.frame_of_reference_uid == case.adc.frame_of_reference_uid != ""
    gland = case.gland_mask.array > 0
    # ADC in 1e-6 mm^2/s: healthy PZ/TZ ~1200-1900.
    adc_gland = _resample_to(case.adc, case.gland_mask)[gland]
    assert 1000 < np.nanmedian(adc_gland) < 2000
    assert 20 <= case.gland_volume_ml <= 85
    assert set(np.unique(case.zone_mask.array)) == {0, 1, 2}
    assert np.array_equal(case.zone_mask.array > 0, gland)


@pytest.mark.parametrize("cspca", [True, False])
def test_label_is_honoured(cspca: bool) -> None:
    for seed in range(4):
        case = synthesize_case(seed, cspca=cspca)
        assert case.is_cspca is cspca
        assert all(1 <= les.isup <= 5 for les in case.lesions)
        if not cspca:
            assert all(les.isup == 1 for les in case.lesions)


def test_prevalence_roughly_forty_percent() -> None:
    from training.phantoms.anatomy import _rng

    labels = [bool(_rng("label", s).random() < 0.4) for s in range(400)]
    assert 0.3 < np.mean(labels) < 0.5


@pytest.mark.slow  # seconds of training/evaluation: `make test`, not test-fast
def test_lesions_dark_on_t2w_and_adc_bright_on_hbv() -> None:
    checked = 0
    for seed in range(6):
        case = synthesize_case(seed, cspca=True)
        adc = _resample_to(case.adc, case.lesion_mask)
        hbv = _resample_to(case.hbv, case.lesion_mask)
        zones = case.zone_mask.array
        for les in case.lesions:
            if les.isup < 2:
                continue
            inside = case.lesion_mask.array == les.label
            zone = 1 if les.zone == "pz" else 2
            ring = (zones == zone) & (case.lesion_mask.array == 0)
            assert np.median(case.t2w.array[inside]) < np.median(case.t2w.array[ring])
            assert np.nanmedian(adc[inside]) < np.nanmedian(adc[ring]) - 150
            assert np.nanmedian(hbv[inside]) > np.nanmedian(hbv[ring])
            checked += 1
    assert checked >= 4


def test_ground_truth_agrees_with_masks(tmp_path: Path) -> None:
    case = synthesize_case(11, cspca=True)
    study = write_study(case, tmp_path, distractors=False)
    truth = json.loads((study / "ground_truth.json").read_text())
    assert truth["study_instance_uid"] == case.study_instance_uid
    assert truth["label"] == 1 and truth["seed"] == 11 and truth["vendor"] == "siemens"
    lesions = sitk.ReadImage(str(study / "masks" / "lesions.mha"))
    gland = sitk.ReadImage(str(study / "masks" / "gland.mha"))
    arr = sitk.GetArrayFromImage(lesions)
    voxel_ml = float(np.prod(lesions.GetSpacing())) / 1000
    assert truth["gland_volume_ml"] == pytest.approx(
        np.count_nonzero(sitk.GetArrayFromImage(gland)) * voxel_ml
    )
    assert len(truth["lesions"]) == len(case.lesions) >= 1
    for les in truth["lesions"]:
        idx = np.argwhere(arr == les["label"])
        assert les["volume_ml"] == pytest.approx(len(idx) * voxel_ml)
        centroid = lesions.TransformContinuousIndexToPhysicalPoint(idx[:, ::-1].mean(0).tolist())
        assert np.allclose(centroid, les["centroid_mm"], atol=1e-3)
        assert les["cspca"] == (les["isup"] >= 2)
    # Masks sit exactly on the T2W series geometry.
    t2_files = sorted((study / "004_t2w").glob("*.dcm"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in t2_files])
    t2 = reader.Execute()
    assert t2.GetSize() == lesions.GetSize()
    assert np.allclose(t2.GetOrigin(), lesions.GetOrigin(), atol=1e-3)
    assert np.allclose(t2.GetSpacing(), lesions.GetSpacing(), atol=1e-4)
    assert np.allclose(t2.GetDirection(), lesions.GetDirection(), atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(t2), case.t2w.array.astype(np.uint16))
    assert truth["series"]["t2w"] == pydicom.dcmread(t2_files[0]).SeriesInstanceUID


def _b_value(ds: pydicom.Dataset) -> float | None:
    if "DiffusionBValue" in ds:
        return float(ds.DiffusionBValue)
    for group, creator, elem in (
        (0x0019, "SIEMENS MR HEADER", 0x0C),
        (0x0043, "GEMS_PARM_01", 0x39),
        (0x2001, "Philips Imaging DD 001", 0x03),
    ):
        try:
            value = ds.private_block(group, creator)[elem].value
        except KeyError:
            continue
        return float(value[0] if isinstance(value, list | pydicom.multival.MultiValue) else value)
    return None


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
@pytest.mark.parametrize("vendor", VENDORS)
def test_every_series_passes_dciodvfy(tmp_path: Path, vendor: str, enhanced: bool) -> None:
    require_tool("dciodvfy")
    case = synthesize_case(5, vendor=vendor)
    study = write_study(case, tmp_path, enhanced=enhanced)
    folders = sorted(p for p in study.iterdir() if p.is_dir() and p.name != "masks")
    assert len(folders) == 8  # localizer, sag, cor, t2w, dwi, adc, hbv, repeated t2w
    b_values: set[float] = set()
    for folder in folders:
        files = sorted(folder.glob("*.dcm"))
        assert _dciodvfy_errors(files[0]) == [], folder.name
        ds = pydicom.dcmread(files[0])
        assert ds.StudyInstanceUID == case.study_instance_uid
        assert ds.BodyPartExamined == "PROSTATE" and ds.Modality == "MR"
        assert ds.Manufacturer.lower().startswith(vendor.replace("ge", "ge medical"))
        if folder.name.endswith("_dwi"):
            if enhanced:
                assert int(ds.NumberOfFrames) == 3 * case.t2w.size[2]
                b_values = {
                    float(f.MRDiffusionSequence[0].DiffusionBValue)
                    for f in ds.PerFrameFunctionalGroupsSequence
                }
            else:
                assert len(files) == 3 * case.t2w.size[2]
                b_values = {_b_value(pydicom.dcmread(f, stop_before_pixels=True)) for f in files}
    # Several b-values in ONE DWI series, tagged where this vendor tags them.
    assert b_values == {float(b) for b in ACQUIRED_B_VALUES}


def test_cli_writes_studies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "phantom",
            "--out",
            str(tmp_path),
            "--studies",
            "1",
            "--seed",
            "4",
            "--vendor",
            "philips",
            "--negative",
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    (study,) = summary["studies"]
    assert study["label"] == 0
    assert (Path(study["path"]) / "ground_truth.json").is_file()
    assert main(["phantom", "--out", str(tmp_path), "--studies", "0"]) == 2


def test_cli_writes_the_imaging_request(tmp_path: Path) -> None:
    """--request-days-ago/--referral put the order's issue date and priority in every image."""
    import datetime as dt

    request = ["--request-days-ago", "26", "--referral", "stat"]
    rc = main(["phantom", "--out", str(tmp_path), "--seed", "4", "--negative", *request])
    assert rc == 0
    files = sorted(tmp_path.rglob("*.dcm"))
    issued = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=26)).strftime("%Y%m%d")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {h.IssueDateOfImagingServiceRequest for h in headers} == {issued}
    assert {h.RequestedProcedurePriority for h in headers} == {"STAT"}
    require_tool("dciodvfy")
    assert _dciodvfy_errors(files[0]) == []
    assert main(["phantom", "--out", str(tmp_path), "--request-days-ago", "-1"]) == 2
