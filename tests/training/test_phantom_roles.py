"""Series selection (`dicom_node.inspect`) finds the right roles in realistic phantom exams."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.phantoms import VENDORS, synthesize_case, write_study

inspect = pytest.importorskip("dicom_node.inspect")


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
