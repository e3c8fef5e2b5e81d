"""Triage SR (TID 1500): validity (dciodvfy, dsrdump), round trip, content, idempotent UIDs."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from core.domain import LesionResult, ModelInfo, Prediction, Priority, StudyStatus, TriageResult
from core.errors import InputError
from dicom_node.seg import build_seg
from dicom_node.sr import build_triage_sr
from dicom_node.sr_reader import TriageSrSummary, read_triage_sr
from tests.conftest import require_tool
from tests.dicom_node.source_images import (
    CLINICAL_MODEL,
    DEMO_MODEL,
    make_prediction,
    make_study,
)
from tests.dicom_node.test_seg import dciodvfy_errors


def result_for(study, prediction: Prediction, model=DEMO_MODEL, **kw) -> TriageResult:
    fields = dict(
        study_instance_uid=study["t2w"][0].StudyInstanceUID,
        status="reported",
        priority="urgent" if prediction.case_likelihood > 0.5 else "routine",
        case_likelihood=prediction.case_likelihood,
        lesions=tuple(LesionResult.from_lesion(x) for x in prediction.lesions),
        gland_volume_ml=prediction.gland_volume_ml,
        model=ModelInfo(name=model.name, version=model.version, sha256=model.sha256),
        series_used={role: s[0].SeriesInstanceUID for role, s in study.items()},
        disclaimer=model.disclaimer,
    )
    fields.update(kw)
    return TriageResult(**fields)


def not_analysed(study, code="missing_adc", message="No ADC series in 2 series received"):
    return TriageResult(
        study_instance_uid=study["t2w"][0].StudyInstanceUID,
        status="reported",
        priority="not_analysed",
        reason={"code": code, "message": message},
    )


def validate(sr: Dataset, tmp_path: Path, name: str = "sr.dcm") -> TriageSrSummary:
    """Everything issue 7 asks of an SR we write; returns what the reader gets back."""
    path = tmp_path / name
    sr.save_as(path)
    assert dciodvfy_errors(path) == []
    dump = subprocess.run(
        [require_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60
    )
    assert dump.returncode == 0, dump.stderr
    assert "Waiting-list priority" in dump.stdout
    buf = io.BytesIO()
    sr.save_as(buf)
    buf.seek(0)
    ds = dcmread(buf)
    back = hd.sr.srread(path)
    assert isinstance(back, hd.sr.Comprehensive3DSR)
    assert back.SOPInstanceUID == sr.SOPInstanceUID
    hd.sr.MeasurementReport.from_sequence([ds])  # still a TID 1500 tree
    return read_triage_sr(ds)


@pytest.fixture(scope="module")
def study():
    return make_study(seed=2)


def test_positive_sr_with_seg(study, tmp_path: Path) -> None:
    prediction = make_prediction(study["t2w"])
    seg = build_seg(study["t2w"], prediction, DEMO_MODEL)
    result = result_for(study, prediction)
    sr = build_triage_sr(
        result, evidence=study, model=DEMO_MODEL, prediction=prediction, seg=seg, psa_density=0.18
    )
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    got = validate(sr, tmp_path)

    assert got.priority == "urgent"
    assert got.case_likelihood == pytest.approx(0.91)
    assert got.psa_density == pytest.approx(0.18)
    assert got.gland_volume_ml == pytest.approx(prediction.gland_volume_ml, rel=1e-5)
    assert got.model == result.model
    assert got.not_for_clinical_use
    assert got.segmentation_sop_instance_uid == seg.SOPInstanceUID
    assert set(got.referenced_series) == set(result.series_used.values())
    assert len(got.lesions) == 2
    for mine, theirs in zip(prediction.lesions, got.lesions, strict=True):
        assert theirs.likelihood == pytest.approx(mine.likelihood)
        assert theirs.volume_ml == pytest.approx(mine.volume_ml, rel=1e-5)
        assert theirs.sector == mine.sector
        assert theirs.category == mine.category
        assert theirs.centroid_mm == pytest.approx(mine.centroid_mm, abs=1e-3)
    # each lesion group points at the SEG segment with the same tracking UID
    by_number = {s.SegmentNumber: s.TrackingUID for s in seg.SegmentSequence}
    for lesion in got.lesions:
        assert by_number[lesion.segment_number] == lesion.tracking_uid
    assert got.summary.startswith("Triage priority: URGENT")
    assert "PZpl-R-mid" in got.summary


def test_negative_sr(study, tmp_path: Path) -> None:
    prediction = make_prediction(study["t2w"], positive=False)
    seg = build_seg(study["t2w"], prediction, CLINICAL_MODEL)
    result = result_for(study, prediction, model=CLINICAL_MODEL)
    sr = build_triage_sr(result, evidence=study, model=CLINICAL_MODEL, seg=seg)
    got = validate(sr, tmp_path)
    assert got.priority == "routine"
    assert got.case_likelihood == pytest.approx(0.07)
    assert got.lesions == ()
    assert got.gland_volume_ml == pytest.approx(prediction.gland_volume_ml, rel=1e-5)
    assert not got.not_for_clinical_use
    assert "NOT FOR CLINICAL USE" not in sr.SeriesDescription
    assert "No AI lesion candidates" in got.summary


def test_waiting_list_inputs_are_coded_and_read_back(study, tmp_path: Path) -> None:
    """The referral's urgency and the days since the imaging request travel with the flag, so a
    PACS sees why a negative study is urgent, and that a not-analysed study was STAT."""
    prediction = make_prediction(study["t2w"], positive=False)
    seg = build_seg(study["t2w"], prediction, CLINICAL_MODEL)
    waited = result_for(
        study,
        prediction,
        model=CLINICAL_MODEL,
        priority="urgent",
        referral_urgency="routine",
        days_waited=26,
    )
    got = validate(build_triage_sr(waited, evidence=study, model=CLINICAL_MODEL, seg=seg), tmp_path)
    assert (got.priority, got.referral_urgency, got.days_waited) == ("urgent", "routine", 26)

    stat = TriageResult.model_validate(
        {**not_analysed(study).model_dump(), "referral_urgency": "urgent"}
    )
    instances = [ds for series in study.values() for ds in series]
    sr = build_triage_sr(stat, evidence={"study": instances}, model=None)
    got = validate(sr, tmp_path, "stat.dcm")
    assert (got.priority, got.referral_urgency, got.days_waited) == ("not_analysed", "urgent", None)

    plain = result_for(study, prediction, model=CLINICAL_MODEL)  # neither recorded
    got = validate(build_triage_sr(plain, evidence=study, model=CLINICAL_MODEL), tmp_path, "p.dcm")
    assert (got.referral_urgency, got.days_waited) == (None, None)


def test_not_analysed_sr_references_the_study_and_codes_the_reason(study, tmp_path: Path) -> None:
    instances = study["t2w"] + study["hbv"]
    sr = build_triage_sr(not_analysed(study), evidence={"study": instances}, model=None)
    assert sr.CompletionFlag == "PARTIAL"
    got = validate(sr, tmp_path)
    assert got.priority == "not_analysed"
    assert got.reason == {"code": "missing_adc", "message": "No ADC series in 2 series received"}
    assert got.case_likelihood is None and got.lesions == () and got.model is None
    assert set(got.referenced_series) == {
        study["t2w"][0].SeriesInstanceUID,
        study["hbv"][0].SeriesInstanceUID,
    }
    assert "NOT ANALYSED (No ADC series)" in got.summary


def test_not_analysed_after_model_failure_names_the_model(study, tmp_path: Path) -> None:
    result = not_analysed(study, code="model_failure", message="ONNX Runtime: out of memory")
    sr = build_triage_sr(result, evidence={"t2w": study["t2w"]}, model=DEMO_MODEL)
    got = validate(sr, tmp_path)
    assert got.reason == {"code": "model_failure", "message": "ONNX Runtime: out of memory"}
    assert got.model is not None and got.model.sha256 == DEMO_MODEL.sha256
    assert got.not_for_clinical_use


def test_unknown_reason_code_falls_back_to_invalid_input(study, tmp_path: Path) -> None:
    result = not_analysed(study, code="cosmic_rays", message="odd")
    got = validate(build_triage_sr(result, evidence={"study": study["t2w"]}, model=None), tmp_path)
    assert got.reason["code"] == "invalid_input"


def test_lesions_without_seg_use_a_centroid_point(study, tmp_path: Path) -> None:
    prediction = make_prediction(study["t2w"])
    result = result_for(study, prediction)
    sr = build_triage_sr(result, evidence=study, model=DEMO_MODEL)
    got = validate(sr, tmp_path)
    assert got.segmentation_sop_instance_uid is None
    assert [x.segment_number for x in got.lesions] == [None, None]
    assert got.lesions[0].centroid_mm == pytest.approx(prediction.lesions[0].centroid_mm, abs=1e-3)
    assert got.gland_volume_ml == pytest.approx(prediction.gland_volume_ml, rel=1e-5)


def test_same_result_same_uid_changed_result_references_predecessor(study, tmp_path: Path) -> None:
    prediction = make_prediction(study["t2w"])
    result = result_for(study, prediction)
    first = build_triage_sr(result, evidence=study, model=DEMO_MODEL)
    resent = build_triage_sr(
        result.model_copy(update={"status": StudyStatus.SENT, "timings_ms": {"total": 12.0}}),
        evidence=study,
        model=DEMO_MODEL,
        predecessor=first,
    )
    assert resent.SOPInstanceUID == first.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in resent

    changed = result.model_copy(update={"priority": Priority.SOON, "case_likelihood": 0.6})
    second = build_triage_sr(changed, evidence=study, model=DEMO_MODEL, predecessor=first)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    got = validate(second, tmp_path)
    assert got.predecessors == (first.SOPInstanceUID,)
    assert got.priority == "soon"


def test_free_text_category_and_unknown_sector_survive(study, tmp_path: Path) -> None:
    prediction = make_prediction(study["t2w"])
    lesion = LesionResult.from_lesion(prediction.lesions[0]).model_copy(
        update={"category": "ai_suspicious", "sector": "somewhere odd"}
    )
    result = result_for(study, prediction, lesions=(lesion,))
    got = validate(build_triage_sr(result, evidence=study, model=DEMO_MODEL), tmp_path)
    assert got.lesions[0].category == "ai_suspicious"
    assert got.lesions[0].sector is None


def test_non_latin_text_switches_to_utf8(study, tmp_path: Path) -> None:
    result = not_analysed(study, code="image_quality", message="Bewegungsartefakte – 運動")
    sr = build_triage_sr(result, evidence={"study": study["t2w"]}, model=None)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert validate(sr, tmp_path).reason["message"] == "Bewegungsartefakte – 運動"
    latin = build_triage_sr(not_analysed(study), evidence={"study": study["t2w"]}, model=None)
    assert latin.SpecificCharacterSet == "ISO_IR 100"


def test_bad_inputs_are_refused_with_reasons(study) -> None:
    other = make_study(seed=3)
    prediction = make_prediction(study["t2w"])
    result = result_for(study, prediction)
    with pytest.raises(InputError, match="belongs to study"):
        build_triage_sr(result, evidence=other, model=DEMO_MODEL)
    with pytest.raises(InputError, match="evidence is empty"):
        build_triage_sr(not_analysed(study), evidence={"study": []}, model=None)
    with pytest.raises(InputError, match="needs its model"):
        build_triage_sr(result.model_copy(update={"model": None}), evidence=study, model=None)


def test_evidence_without_type2_patient_attributes(study, tmp_path: Path) -> None:
    bare = []
    for ds in study["t2w"]:
        copy = Dataset()
        copy.update(ds)
        for keyword in ("PatientBirthDate", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
            del copy[keyword]
        bare.append(copy)
    sr = build_triage_sr(not_analysed(study), evidence={"study": bare}, model=None)
    assert validate(sr, tmp_path).priority == "not_analysed"


def test_prostatex_sr_references_the_series_used(prostatex: Path, tmp_path: Path) -> None:
    """ProstateX-0001 through the server's own study loading; a fixed prediction with the
    PI-CAI AI whole-gland mask (when present) and one lesion inside the gland."""
    import numpy as np

    from core.domain import Lesion
    from imaging.study_volumes import load_study_volumes

    volumes = load_study_volumes(prostatex)
    t2w = volumes.t2w
    gland_file = (
        prostatex.parent
        / "labels/anatomical_delineations/whole_gland/AI/Bosma22b/10795_1000811.nii.gz"
    )
    if gland_file.is_file():
        import SimpleITK as sitk

        gland = (sitk.GetArrayFromImage(sitk.ReadImage(str(gland_file))) > 0).astype(np.uint8)
    else:
        gland = np.zeros(t2w.array.shape, np.uint8)
        gland[6:13, 150:230, 150:230] = 1
    zyx = np.argwhere(gland).mean(axis=0).round().astype(int)
    labels = np.zeros_like(gland)
    labels[zyx[0], zyx[1] - 6 : zyx[1] + 6, zyx[2] - 6 : zyx[2] + 6] = 1
    idx = np.argwhere(labels == 1)
    lesion = Lesion(
        likelihood=0.64,
        volume_ml=len(idx) * t2w.voxel_volume_ml,
        centroid_mm=tuple(t2w.index_to_lps(idx[:, ::-1].mean(axis=0))),
        sector="TZa-R-mid",
        category="ai_intermediate",
        label=1,
    )
    prediction = Prediction(
        case_likelihood=0.64,
        lesions=(lesion,),
        gland_volume_ml=float(gland.sum()) * t2w.voxel_volume_ml,
        gland_mask=t2w.with_array(gland),
        lesion_labels=t2w.with_array(labels),
    )
    evidence = {role.value: headers for role, headers in volumes.headers.items()}
    seg = build_seg(evidence["t2w"], prediction, DEMO_MODEL)
    assert seg is not None
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path)
    assert dciodvfy_errors(seg_path) == []

    result = TriageResult(
        study_instance_uid=volumes.study_instance_uid,
        status="reported",
        priority="soon",
        case_likelihood=prediction.case_likelihood,
        lesions=(LesionResult.from_lesion(lesion),),
        gland_volume_ml=prediction.gland_volume_ml,
        psa_density=0.18,
        model=ModelInfo(name=DEMO_MODEL.name, version=DEMO_MODEL.version, sha256=DEMO_MODEL.sha256),
        series_used=volumes.series_used,
        disclaimer=DEMO_MODEL.disclaimer,
    )
    sr = build_triage_sr(result, evidence=evidence, model=DEMO_MODEL, seg=seg)
    got = validate(sr, tmp_path)
    assert set(got.referenced_series) == set(volumes.series_used.values())
    assert len(got.referenced_series) == 3
    assert got.psa_density == pytest.approx(0.18)
    assert got.lesions[0].sector == "TZa-R-mid"
    assert got.lesions[0].centroid_mm == pytest.approx(lesion.centroid_mm, abs=1e-3)
    assert sr.PatientID == "ProstateX-0001"
    # every instance of the three series is evidence, none of the others
    referenced = {
        inst.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    used = {ds.SOPInstanceUID for headers in evidence.values() for ds in headers}
    assert referenced == used | {seg.SOPInstanceUID}
