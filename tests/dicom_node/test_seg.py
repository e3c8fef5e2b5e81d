"""SEG from AI masks: geometry on the T2W grid, validity (dciodvfy), round trip."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from core.domain import Prediction
from core.errors import GeometryError
from dicom_node.seg import build_seg
from imaging.seg_frames import frame_slice_indices
from tests.conftest import require_tool
from tests.dicom_node.source_images import DEMO_MODEL, make_prediction, make_study


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines dciodvfy reports for a file (warnings are allowed)."""
    tool = require_tool("dciodvfy")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def roundtrip(ds) -> hd.seg.Segmentation:
    buf = io.BytesIO()
    ds.save_as(buf)
    buf.seek(0)
    return hd.seg.Segmentation.from_dataset(dcmread(buf))


@pytest.fixture(scope="module")
def study():
    return make_study(seed=1)


def test_positive_seg_has_gland_and_lesions_on_t2w_grid(study, tmp_path: Path) -> None:
    prediction = make_prediction(study["t2w"])
    seg = build_seg(study["t2w"], prediction, DEMO_MODEL)
    assert seg is not None
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["Prostate gland", "AI lesion 1", "AI lesion 2"]
    assert seg.FrameOfReferenceUID == study["t2w"][0].FrameOfReferenceUID
    assert "NOT FOR CLINICAL USE" in seg.SeriesDescription

    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert dciodvfy_errors(path) == []

    back = roundtrip(seg)
    t2w_uids = [ds.SOPInstanceUID for ds in study["t2w"]]
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=t2w_uids,
        segment_numbers=[1, 2, 3],
        assert_missing_frames_are_empty=True,
    )  # (slices, rows, cols, segments)
    gland = prediction.gland_mask.array > 0
    labels_arr = prediction.lesion_labels.array
    assert np.array_equal(pixels[..., 0] > 0, gland)
    assert np.array_equal(pixels[..., 1] > 0, labels_arr == 1)
    assert np.array_equal(pixels[..., 2] > 0, labels_arr == 2)


def test_seg_frames_follow_positions_not_list_order(study) -> None:
    prediction = make_prediction(study["t2w"])
    shuffled = list(reversed(study["t2w"]))
    assert frame_slice_indices(shuffled, prediction.gland_mask) == list(range(7, -1, -1))
    a = build_seg(study["t2w"], prediction, DEMO_MODEL)
    b = build_seg(shuffled, prediction, DEMO_MODEL)
    uids = [ds.SOPInstanceUID for ds in study["t2w"]]
    pa = roundtrip(a).get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)
    pb = roundtrip(b).get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)
    assert np.array_equal(pa, pb)


def test_negative_seg_has_only_the_gland(study) -> None:
    seg = build_seg(study["t2w"], make_prediction(study["t2w"], positive=False), DEMO_MODEL)
    assert seg is not None
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Prostate gland"]


def test_no_masks_gives_no_seg(study) -> None:
    assert (
        build_seg(study["t2w"], make_prediction(study["t2w"], with_masks=False), DEMO_MODEL) is None
    )
    assert build_seg(study["t2w"], Prediction(case_likelihood=0.1), DEMO_MODEL) is None


def test_seg_uids_are_deterministic(study) -> None:
    prediction = make_prediction(study["t2w"])
    a = build_seg(study["t2w"], prediction, DEMO_MODEL)
    b = build_seg(study["t2w"], prediction, DEMO_MODEL)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.SegmentSequence[1].TrackingUID == b.SegmentSequence[1].TrackingUID
    other = build_seg(study["t2w"], make_prediction(study["t2w"], positive=False), DEMO_MODEL)
    assert other.SOPInstanceUID != a.SOPInstanceUID


def test_masks_off_the_source_grid_are_refused(study) -> None:
    prediction = make_prediction(study["t2w"])
    with pytest.raises(GeometryError, match="T2W grid"):
        build_seg(study["adc"], prediction, DEMO_MODEL)
