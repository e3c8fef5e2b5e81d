"""read_triage_sr: what a worklist or PACS integrator gets back; code tables; refusals."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom import dcmread

from core import codes
from core.domain import LesionResult, ModelInfo, Priority, ReferralUrgency, TriageResult
from core.errors import MalformedDicomError
from dicom_node import dicom_codes as dc
from dicom_node.sr import build_triage_sr
from dicom_node.sr_reader import read_triage_sr
from tests.dicom_node.source_images import DEMO_MODEL, make_study

STUDY = make_study(seed=4)
STUDY_UID = STUDY["t2w"][0].StudyInstanceUID


def _bytes_roundtrip(ds):
    buf = io.BytesIO()
    ds.save_as(buf)
    buf.seek(0)
    return dcmread(buf)


def test_every_pirads_sector_round_trips() -> None:
    assert len(dc.PIRADS_SECTORS) == 41  # PI-RADS v2.1: 38 prostate + 2 SV + urethral sphincter
    for key, concept in dc.PIRADS_SECTORS.items():
        assert dc.normalise_sector(key) == key
        assert dc.sector_for(concept.value, concept.scheme_designator) == key


@pytest.mark.parametrize(
    ("label", "key"),
    [
        ("right mid PZpl", "PZpl-R-mid"),
        ("pzpl_right_middle", "PZpl-R-mid"),
        ("TZa L apical", "TZa-L-apex"),
        ("CZ-left", "CZ-L-base"),
        ("sv r", "SV-R"),
        ("US", "US"),
        ("PZ", None),
        ("left", None),
        ("PZpl-R-mid-extra", None),
    ],
)
def test_sector_labels_normalise(label: str, key: str | None) -> None:
    assert dc.normalise_sector(label) == key


def test_every_core_code_has_a_reverse_mapping() -> None:
    for priority, code in codes.PRIORITY_CODES.items():
        assert dc.priority_for(code.value, code.scheme) == priority
        Priority(priority)
    for reason, code in codes.NOT_ANALYSED_REASONS.items():
        assert dc.reason_for(code.value, code.scheme) == reason
    for category, code in codes.LESION_CATEGORY_CODES.items():
        assert dc.category_for(code.value, code.scheme) == category
    for urgency, code in codes.REFERRAL_CODES.items():
        assert dc.referral_for(code.value, code.scheme) == urgency
        ReferralUrgency(urgency)


def test_non_sr_is_refused() -> None:
    ds = STUDY["t2w"][0]
    with pytest.raises(MalformedDicomError, match="not a DICOM SR"):
        read_triage_sr(ds)


def test_foreign_tid1500_sr_is_refused(shared_data: Path) -> None:
    """A real TID 1500 SR from another tool (dcmqi) has no priority flag: not ours."""
    ds = dcmread(shared_data / "reference/tid1500_sr_example/sr.dcm")
    with pytest.raises(MalformedDicomError, match="Waiting-list priority"):
        read_triage_sr(ds)


likelihood = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
lesion = st.builds(
    LesionResult,
    likelihood=likelihood,
    volume_ml=st.floats(min_value=0.0, max_value=80.0, allow_nan=False),
    centroid_mm=st.tuples(*[st.floats(-200, 200, allow_nan=False)] * 3),
    sector=st.sampled_from([None, *dc.PIRADS_SECTORS]),
    category=st.sampled_from(list(codes.LESION_CATEGORY_CODES)),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    priority=st.sampled_from(["urgent", "soon", "routine"]),
    case=likelihood,
    lesions=st.lists(lesion, max_size=3),
    gland=st.one_of(st.none(), st.floats(5.0, 250.0)),
    psad=st.one_of(st.none(), st.floats(0.0, 2.0)),
)
def test_analysed_sr_survives_write_and_read(priority, case, lesions, gland, psad) -> None:
    result = TriageResult(
        study_instance_uid=STUDY_UID,
        status="reported",
        priority=priority,
        case_likelihood=case,
        lesions=tuple(lesions),
        gland_volume_ml=gland,
        psa_density=psad,
        model=ModelInfo(name=DEMO_MODEL.name, version=DEMO_MODEL.version, sha256=DEMO_MODEL.sha256),
    )
    got = read_triage_sr(
        _bytes_roundtrip(build_triage_sr(result, evidence=STUDY, model=DEMO_MODEL))
    )
    assert got.priority == priority
    assert got.case_likelihood == pytest.approx(case, abs=1e-6)
    assert got.gland_volume_ml == (None if gland is None else pytest.approx(gland, abs=1e-6))
    assert got.psa_density == (None if psad is None else pytest.approx(psad, abs=1e-6))
    assert len(got.lesions) == len(lesions)
    for mine, theirs in zip(lesions, got.lesions, strict=True):
        assert theirs.likelihood == pytest.approx(mine.likelihood, abs=1e-6)
        assert theirs.volume_ml == pytest.approx(mine.volume_ml, abs=1e-6)
        assert theirs.sector == mine.sector
        assert theirs.category == mine.category
        # SCOORD3D is FL (float32): about 7 significant digits
        assert theirs.centroid_mm == pytest.approx(mine.centroid_mm, abs=1e-3)


@settings(max_examples=10, deadline=None)
@given(reason=st.sampled_from(list(codes.NOT_ANALYSED_REASONS)), message=st.text(max_size=80))
@example(reason="missing_t2w", message="\x1b")  # ESC: hypothesis found pydicom refusing it
def test_not_analysed_sr_survives_write_and_read(reason: str, message: str) -> None:
    result = TriageResult(
        study_instance_uid=STUDY_UID,
        status="reported",
        priority="not_analysed",
        reason={"code": reason, "message": message},
    )
    got = read_triage_sr(
        _bytes_roundtrip(build_triage_sr(result, evidence={"study": STUDY["t2w"]}, model=None))
    )
    assert got.priority == Priority.NOT_ANALYSED
    assert got.reason is not None and got.reason["code"] == reason
