"""Series selection (`imaging.study_volumes`) finds the right roles in realistic phantoms."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from training.phantoms import VENDORS, synthesize_case, write_study

inspect = pytest.importorskip("imaging.study_volumes")


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
@pytest.mark.parametrize("vendor", VENDORS)
def test_roles_match_ground_truth(tmp_path: Path, vendor: str, enhanced: bool) -> None:
    case = synthesize_case(21, vendor=vendor)
    study = write_study(case, tmp_path, enhanced=enhanced)
    truth = json.loads((study / "ground_truth.json").read_text())
    report = inspect.inspect_study(study)
    assert report["error"] is None
    assert report["study_instance_uid"] == case.study_instance_uid
    chosen = {s["role"]: s["series_instance_uid"] for s in report["series"] if s["role"] != "other"}
    for role in ("t2w", "adc", "hbv"):
        accepted = [truth["series"][role], *truth["series_alternatives"].get(role, [])]
        assert chosen.get(role) in accepted, (role, report["series"])
    # The selected volumes have the phantom's geometry.
    for role, vol in (("t2w", case.t2w), ("adc", case.adc), ("hbv", case.hbv)):
        geo = report["volumes"][role]
        assert geo["size"] == list(vol.size)
        assert np.allclose(geo["spacing"], vol.spacing, atol=1e-4)
        assert np.allclose(geo["origin"], vol.origin, atol=1e-3)
        assert np.allclose(geo["direction"], vol.direction, atol=1e-4)


@pytest.mark.slow  # seconds of phantoms/training: `make test`, not test-fast
@pytest.mark.parametrize("vendor", VENDORS)
def test_a_dce_series_is_never_a_model_input(tmp_path: Path, vendor: str) -> None:
    """A dynamic contrast-enhanced T1 series (and one phase of it exported as its own series
    under a T2-like name) is passed over by content: dynamics, contrast, TE/TR."""
    import pydicom
    from pydicom.uid import generate_uid

    from tests.conftest import require_tool
    from tests.training.test_phantoms import _dciodvfy_errors

    case = synthesize_case(23, vendor=vendor)
    study = write_study(case, tmp_path, dce=True)
    truth = json.loads((study / "ground_truth.json").read_text())
    (dce,) = study.glob("*_dce")
    files = sorted(dce.glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert len(files) == 6 * 16
    assert {int(h.TemporalPositionIdentifier) for h in headers} == set(range(1, 7))
    assert {int(h.NumberOfTemporalPositions) for h in headers} == {6}
    assert all(h.ContrastBolusAgent and float(h.EchoTime) < 5 for h in headers)
    require_tool("dciodvfy")
    assert _dciodvfy_errors(files[0]) == [] and _dciodvfy_errors(files[-1]) == []

    # One phase re-exported as its own series, named like a T2W.
    phase = study / "999_dce_phase4"
    phase.mkdir()
    uid = generate_uid()
    for f, h in zip(files, headers, strict=True):
        if int(h.TemporalPositionIdentifier) == 4:
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID, ds.SeriesNumber = uid, 999
            ds.SeriesDescription = "t2_tse_tra"
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(phase / f.name)

    report = inspect.inspect_study(study)
    assert report["error"] is None
    by_number = {s["series_number"]: s for s in report["series"]}
    whole = by_number[int(headers[0].SeriesNumber)]
    assert whole["role"] == "other" and "dynamic" in whole["reason"], whole
    split = by_number[999]
    assert split["role"] == "other", split
    assert re.search(r"dynamic|contrast|echo time|repetition time", split["reason"]), split
    chosen = {s["role"]: s["series_instance_uid"] for s in report["series"] if s["role"] != "other"}
    for role in ("t2w", "adc", "hbv"):
        assert chosen[role] in [truth["series"][role], *truth["series_alternatives"].get(role, [])]
