from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.domain import ReferralUrgency, TriageResult, Volume
from core.errors import ConfigError, MissingSeriesError, OutOfResourcesError
from core.settings import load_settings


def test_volume_affine_maps_index_to_lps() -> None:
    d = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # x->L? columns permuted, orthonormal
    v = Volume(np.zeros((4, 5, 6), np.float32), (0.5, 0.6, 3.0), (10.0, -20.0, 30.0), d)
    assert v.size == (6, 5, 4)
    p = v.index_to_lps([1, 2, 3])
    step = np.array([1, 2, 3]) * v.spacing
    expected = np.asarray(v.origin) + np.asarray(d).reshape(3, 3) @ step
    np.testing.assert_allclose(p, expected)
    np.testing.assert_allclose(v.affine() @ [1, 2, 3, 1], [*expected, 1])


@given(
    st.lists(st.floats(0.1, 5.0), min_size=3, max_size=3),
    st.lists(st.floats(-200, 200), min_size=3, max_size=3),
)
def test_volume_geometry_roundtrip(spacing: list[float], origin: list[float]) -> None:
    v = Volume(np.zeros((2, 3, 4)), tuple(spacing), tuple(origin))  # type: ignore[arg-type]
    g = v.geometry()
    w = Volume(np.zeros((2, 3, 4)), g["spacing"], g["origin"], g["direction"])  # type: ignore[arg-type]
    np.testing.assert_allclose(w.affine(), v.affine())


def test_volume_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="spacing"):
        Volume(np.zeros((2, 2, 2)), (0, 1, 1), (0, 0, 0))
    with pytest.raises(ValueError, match="orthonormal"):
        Volume(np.zeros((2, 2, 2)), (1, 1, 1), (0, 0, 0), (1, 1, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(TypeError, match="3D"):
        Volume(np.zeros((2, 2)), (1, 1, 1), (0, 0, 0))


def test_errors_carry_wire_codes() -> None:
    e = MissingSeriesError("no ADC", role="adc", study_instance_uid="1.2")
    assert e.reason_code == "missing_adc" and e.http_status == 422
    assert e.to_dict() == {"code": "missing_adc", "message": "no ADC"}
    assert OutOfResourcesError("disk").dimse_status == 0xA700


def test_result_contract_serialises() -> None:
    r = TriageResult(
        study_instance_uid="1.2.3", status="reported", priority="urgent", case_likelihood=0.9
    )
    d = r.to_json_dict()
    assert d["priority"] == "urgent" and d["status"] == "reported" and d["lesions"] == []
    with pytest.raises(ValueError):
        TriageResult(
            study_instance_uid="1.2.3", status="reported", priority="urgent", case_likelihood=1.5
        )


def test_settings_from_toml_and_env(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[dicom]\nae_title = "NODE1"\nport = 11112\n'
        '[[dicom.destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        'port = 4242\n[storage]\nroot = "/tmp/x"\n'
    )
    s = load_settings(
        cfg,
        {"RADTRIAGE_DICOM__PORT": "11999", "RADTRIAGE_DICOM__ALLOWED_CALLING_AETS": '["PACS1"]'},
    )
    assert s.dicom.ae_title == "NODE1" and s.dicom.port == 11999
    assert s.dicom.allowed_calling_aets == ["PACS1"]
    assert s.dicom.destinations[0].port == 4242
    assert str(s.storage.root) == "/tmp/x"


def test_settings_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nportt = 1\n")
    with pytest.raises(ConfigError, match="portt"):
        load_settings(bad, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", {})


def test_referral_from_dicom() -> None:
    assert ReferralUrgency.from_dicom("STAT") is ReferralUrgency.URGENT
    assert ReferralUrgency.from_dicom(None) is ReferralUrgency.ROUTINE


def test_one_cspca_rule_for_every_marksheet_reader(tmp_path: Path) -> None:
    """Issue 21: evaluation's outcome marksheet and training's PI-CAI marksheet read "2.0" the
    same way (they disagreed), through `core.domain.cspca_label`."""
    from core.domain import cspca_label
    from evaluation.outcomes import _cspca
    from training.datasets import read_marksheet

    assert cspca_label("", "2.0") is True and cspca_label(None, "1") is False
    assert cspca_label("yes", "0") is True and cspca_label("", "") is None
    for bad in ("2.5", "6", "two"):
        with pytest.raises(ValueError, match="case_ISUP"):
            cspca_label("", bad)
    with pytest.raises(ValueError, match="case_csPCa"):
        cspca_label("maybe", "")
    sheet = tmp_path / "marksheet.csv"
    sheet.write_text("patient_id,study_id,case_csPCa,case_ISUP\n1,2,,2.0\n3,4,,1\n5,6,,\n")
    assert read_marksheet(sheet) == {"1_2": True, "3_4": False}
    assert _cspca({"case_csPCa": "", "case_ISUP": "2.0"}, 2) is True


def test_waiting_standards_defaults_have_one_home() -> None:
    from core import priority
    from core.settings import TriageSettings
    from evaluation.simulate import SimulationParams

    policy = TriageSettings().waiting_policy()
    assert policy == priority.WaitingPolicy()
    assert (policy.fds_days, policy.escalate_within_days, policy.urgent_within_days) == (
        priority.FDS_DAYS,
        priority.ESCALATE_WITHIN_DAYS,
        priority.URGENT_WITHIN_DAYS,
    )
    assert SimulationParams().fds_days == priority.FDS_DAYS
