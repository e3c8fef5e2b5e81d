"""OHIF's parsers read our SR and SEG: a Node script (tests/interop/js) loads them with dcmjs
and @cornerstonejs/adapters (MeasurementReport.generateToolState walks the TID 1500 groups;
Segmentation.generateToolState builds labelmaps over the T2W images) and the values it reports
must be those in result.json."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node import dicom_codes as dc
from tests.interop.conftest import SAMPLE_NAMES, Sample

pytestmark = pytest.mark.integration

JS = Path(__file__).with_name("js")


@pytest.fixture(scope="module")
def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.skip("node not installed: the viewer-parser test needs Node.js (apt: nodejs)")
    if not (JS / "node_modules" / "@cornerstonejs" / "adapters").is_dir():
        pytest.skip(f"npm packages missing: run `npm ci` in {JS} (.ci/run does)")
    return path


def _t2w_paths(sample: Sample) -> list[str]:
    t2w = (sample.result.get("series_used") or {}).get("t2w")
    return [
        str(p)
        for p in sample.source_images()
        if str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) == t2w
    ]


def _read(node: str, sample: Sample, tmp_path: Path) -> dict[str, Any]:
    spec = tmp_path / "input.json"
    spec.write_text(
        json.dumps(
            {
                "sr": str(sample.sr),
                "seg": str(sample.seg) if sample.seg else None,
                "t2w": _t2w_paths(sample) if sample.seg else [],
            }
        )
    )
    run = subprocess.run(
        [node, "read_results.mjs", str(spec)],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def _key(concept: Any) -> tuple[str, str]:
    return concept.value, concept.scheme_designator


def _num(group: dict[str, Any], concept: Any) -> tuple[float, tuple[str, str]] | None:
    for m in group["measurements"]:
        if (m["name"]["value"], m["name"]["scheme"]) == _key(concept):
            return m["value"], (m["unit"]["value"], m["unit"]["scheme"])
    return None


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_ohif_parsers_read_sr_groups_and_seg_segments(
    node: str, samples: dict[str, Sample], name: str, tmp_path: Path
) -> None:
    sample = samples[name]
    result = sample.result
    read = _read(node, sample, tmp_path)
    sr = read["sr"]
    assert sr["templateId"] == "1500"
    groups = sr["groups"]
    assert sr["toolStateGroups"] == len(groups) >= 1  # the adapters reached every group
    case = groups[0]
    assert case["trackingIdentifier"] == "AI case assessment"
    priority = next(e for e in case["evaluations"] if e["name"]["value"] == "RT001")
    assert priority["value"]["value"] == dc.priority_concept(result["priority"]).value
    if result["case_likelihood"] is None:
        assert _num(case, dc.CASE_LIKELIHOOD) is None
        assert read["seg"] is None
        return
    value, unit = _num(case, dc.CASE_LIKELIHOOD) or (None, None)
    assert value == pytest.approx(result["case_likelihood"], abs=1e-6) and unit == ("1", "UCUM")

    lesions = [g for g in groups if g.get("finding", {}).get("value") == "130555"]
    assert len(lesions) == len(result["lesions"])
    seg_uid = str(pydicom.dcmread(sample.seg, stop_before_pixels=True).SOPInstanceUID)
    segments = {s["trackingUid"]: s for s in read["seg"]["segments"]}
    for group, lesion in zip(lesions, result["lesions"], strict=True):
        assert _num(group, dc.LESION_LIKELIHOOD)[0] == pytest.approx(lesion["likelihood"], abs=1e-6)
        volume, unit = _num(group, dc.VOLUME) or (None, None)
        assert volume == pytest.approx(lesion["volume_ml"], abs=1e-6) and unit == ("ml", "UCUM")
        site = dc.sector_concept(lesion["sector"]) or dc.PROSTATE
        assert [(s["value"], s["scheme"]) for s in group["findingSites"]] == [_key(site)]
        ref = group["referencedSegment"]
        assert ref["sopInstanceUid"] == seg_uid
        assert segments[group["trackingUid"]]["number"] == ref["segmentNumber"]

    # the SEG as the viewer builds it: voxels per segment over the T2W images
    seg = pydicom.dcmread(sample.seg, stop_before_pixels=True)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    thickness = float(measures.get("SpacingBetweenSlices") or measures.SliceThickness)
    voxel_ml = float(measures.PixelSpacing[0]) * float(measures.PixelSpacing[1]) * thickness / 1e3
    by_label = {s["label"]: s for s in read["seg"]["segments"]}
    voxels = {int(k): v for k, v in read["seg"]["voxels"].items()}
    expected = {f"AI lesion {i + 1}": x["volume_ml"] for i, x in enumerate(result["lesions"])}
    if result["gland_volume_ml"] is not None:
        expected["Prostate gland"] = result["gland_volume_ml"]
    assert set(by_label) == set(expected)
    for label, volume_ml in expected.items():
        segment = by_label[label]
        assert segment["cielab"] is not None and len(segment["cielab"]) == 3
        assert voxels.get(segment["number"], 0) * voxel_ml == pytest.approx(volume_ml, rel=1e-3)
