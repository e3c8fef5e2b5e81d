"""dcmqi (QIICR, the reference TID 1500/SEG converter) reads our SR and SEG: `tid1500reader`
gives the measurement groups, `segimage2itkimage` the segments as images; both must say what
result.json says."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_node import dicom_codes as dc
from tests.interop.conftest import SAMPLE_NAMES, Sample

pytestmark = pytest.mark.integration

_ANALYSED = [n for n in SAMPLE_NAMES if n != "not_analysed"]


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} not installed (pip: dcmqi, pyproject [dev])")
    return path


def _run(*argv: str) -> None:
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


def _tid1500(sample: Sample, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "sr.json"
    _run(_tool("tid1500reader"), "--inputDICOM", str(sample.sr), "--outputMetadata", str(out))
    return json.loads(out.read_text())


def _code(item: dict[str, str]) -> tuple[str, str]:
    return item["CodeValue"], item["CodingSchemeDesignator"]


def _value(group: dict[str, Any], concept: Any) -> float | None:
    for m in group.get("measurementItems", []):
        if _code(m["quantity"]) == (concept.value, concept.scheme_designator):
            return float(m["value"])
    return None


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_tid1500reader_reads_groups_matching_result(
    samples: dict[str, Sample], name: str, tmp_path: Path
) -> None:
    sample = samples[name]
    result = sample.result
    groups = _tid1500(sample, tmp_path)["Measurements"]
    case = groups[0]
    assert case["TrackingIdentifier"] == "AI case assessment"
    assert _code(case["Finding"]) == ("130554", "DCM")
    evaluations = {
        _code(e["conceptCode"]): e["conceptValue"] for e in case["qualitativeEvaluations"]
    }
    priority = evaluations[("RT001", "99RADTRIAGE")]
    assert _code(priority) == (dc.priority_concept(result["priority"]).value, "99RADTRIAGE")
    if result["case_likelihood"] is None:
        assert _value(case, dc.CASE_LIKELIHOOD) is None
        assert ("RT005", "99RADTRIAGE") in evaluations  # reason not analysed
        return
    assert _value(case, dc.CASE_LIKELIHOOD) == pytest.approx(result["case_likelihood"], abs=1e-6)
    assert case["measurementAlgorithmIdentification"]["AlgorithmName"] == result["model"]["name"]
    lesion_groups = [g for g in groups if _code(g["Finding"]) == ("130555", "DCM")]
    assert len(lesion_groups) == len(result["lesions"])
    for group, lesion in zip(lesion_groups, result["lesions"], strict=True):
        assert _value(group, dc.LESION_LIKELIHOOD) == pytest.approx(lesion["likelihood"], abs=1e-6)
        assert _value(group, dc.VOLUME) == pytest.approx(lesion["volume_ml"], abs=1e-6)
        site = dc.sector_concept(lesion["sector"]) or dc.PROSTATE
        assert _code(group["FindingSite"]) == (site.value, site.scheme_designator)
        assert group["segmentationSOPInstanceUID"] == result_seg_uid(sample)
        assert isinstance(group["ReferencedSegment"], int)
    gland = [g for g in groups if _code(g["Finding"]) == ("41216001", "SCT")]
    if result["gland_volume_ml"] is not None and sample.seg is not None:
        assert _value(gland[0], dc.VOLUME) == pytest.approx(result["gland_volume_ml"], abs=1e-6)


def result_seg_uid(sample: Sample) -> str:
    import pydicom

    assert sample.seg is not None
    return str(pydicom.dcmread(sample.seg, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.parametrize("name", _ANALYSED)
def test_segimage2itkimage_segments_match_result_and_sr(
    samples: dict[str, Sample], name: str, tmp_path: Path
) -> None:
    import SimpleITK as sitk

    sample = samples[name]
    assert sample.seg is not None
    result = sample.result
    out = tmp_path / "seg"
    out.mkdir()
    _run(
        _tool("segimage2itkimage"),
        "--inputDICOM",
        str(sample.seg),
        "--outputDirectory",
        str(out),
        "--outputType",
        "nrrd",
    )
    meta = json.loads((out / "meta.json").read_text())
    segments = [s[0] for s in meta["segmentAttributes"]]
    volumes = {}
    for s in segments:
        image = sitk.ReadImage(str(out / f"{s['labelID']}.nrrd"))
        voxels = int((sitk.GetArrayFromImage(image) > 0).sum())
        volumes[s["SegmentLabel"]] = voxels * float(np.prod(image.GetSpacing())) / 1000.0
        assert "recommendedDisplayRGBValue" in s
    expected = {
        f"AI lesion {i + 1}": lesion["volume_ml"] for i, lesion in enumerate(result["lesions"])
    }
    expected["Prostate gland"] = result["gland_volume_ml"]
    assert volumes == pytest.approx(expected, rel=1e-6)
    # the SR's groups point at these segments by number and tracking UID
    groups = _tid1500(sample, tmp_path)["Measurements"]
    by_uid = {s["TrackingUniqueIdentifier"]: s["labelID"] for s in segments}
    for g in groups[1:]:
        assert by_uid[g["TrackingUniqueIdentifier"]] == g["ReferencedSegment"]
