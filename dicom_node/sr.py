"""The triage result as a DICOM Comprehensive 3D SR holding a TID 1500 Measurement Report.

Content tree (highdicom templates; codes in `dicom_node.dicom_codes`, listed in
docs/conformance.md)::

    CONTAINER Imaging Measurement Report (TID 1500)
      Language; Observer Type = Device (TID 1004: the model as device observer)
      Procedure reported = Multiparametric MRI of prostate
      CONTAINER Imaging Measurements
        CONTAINER Measurement Group (TID 1501)      "AI case assessment", first; TID 1411
                                                    referencing the gland segment when the
                                                    SEG has one (then every group is 1411)
          Tracking Identifier / UID; Finding = Overall Prostate Finding
          Algorithm Name / Version / Parameters "sha256=...", "version_digest=..." (TID 4019)
          NUM  AI csPCa case likelihood (0..1)      [analysed]
          NUM  PSA density (ng/mL/mL)               [when known]
          NUM  Volume, finding site Prostate        [when known and not in the SEG]
          CODE Waiting-list priority = urgent|soon|routine|not_analysed
          CODE Priority driver (RT6xx), one each    what set the flag, the deciding one first
          CODE AI priority opinion                  the AI's own flag [analysed]
          CODE AI domain gate = in_domain|low_confidence|not_fitted (RT80x) [analysed]
          CODE Reason not analysed by AI            [not analysed]
          TEXT Priority statement                   the flag naming its driver, e.g. "Urgent:
                                                    waited 26 of 28 days (FDS)"
          TEXT AI result summary                    (human-readable, for text-only PACS)
          TEXT Comment                              (NOT FOR CLINICAL USE; why not analysed)
        CONTAINER Measurement Group (TID 1411)      prostate gland, refs SEG segment [SEG]
          NUM  Volume (ml)
        CONTAINER Measurement Group (TID 1411)      one per AI lesion
          Referenced Segment (SEG with a gland segment) or a POINT volume surface
          Finding = Localized Prostate Finding; Finding Site = PI-RADS v2.1 sector (CID 6304)
          NUM  AI csPCa lesion likelihood; NUM Volume (ml)
          CODE AI lesion category (not PI-RADS)
          SCOORD3D Center of Mass (POINT, patient LPS mm)

Evidence: every instance of the series used (or of the study, when not analysed) and the SEG
are listed in Current Requested Procedure Evidence Sequence. CompletionFlag is COMPLETE for an
analysed study, PARTIAL when not analysed; VerificationFlag is UNVERIFIED (no person has
verified an AI result) unless a radiologist's override set the flag: then VERIFIED, with the
radiologist as Verifying Observer; PreliminaryFlag PRELIMINARY. SeriesDescription names the flag
and its driver ("Triage URGENT (wait clock)").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as sr_codes

from core import codes
from core.domain import (
    LesionResult,
    ModelRef,
    Prediction,
    Priority,
    TriageResult,
)
from core.errors import InputError
from dicom_node import dicom_codes as dc
from dicom_node.seg import MANUFACTURER, copying_source_names, segment_tracking_uid, stable_uid

__all__ = ["build_triage_sr", "stable_uid", "summary_text"]

_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_ROLE_ORDER = ("t2w", "adc", "hbv")


def _header(ds: Dataset) -> Dataset:
    """A pixel-free copy of `ds` with the Type 2 patient/study attributes highdicom copies
    present (empty when the source lacks them)."""
    out = Dataset()
    for elem in ds:
        if elem.tag.group != 0x7FE0:
            out.add(elem)
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in out:
            setattr(out, keyword, None)
    return out


def _evidence_list(
    result: TriageResult, evidence: Mapping[str, Sequence[Dataset]]
) -> list[Dataset]:
    roles = sorted(evidence, key=lambda r: (*_ROLE_ORDER, r).index(r))
    seen: set[str] = set()
    datasets: list[Dataset] = []
    for role in roles:
        for ds in evidence[role]:
            uid = str(ds.SOPInstanceUID)
            if uid in seen:
                continue
            seen.add(uid)
            if str(ds.StudyInstanceUID) != result.study_instance_uid:
                raise InputError(
                    f"evidence instance {uid} ({role}) belongs to study {ds.StudyInstanceUID}, "
                    f"not {result.study_instance_uid}; pass only this study's series",
                    study_instance_uid=result.study_instance_uid,
                )
            datasets.append(ds)
    if not datasets:
        raise InputError(
            "an SR must reference at least one instance of the study; evidence is empty",
            study_instance_uid=result.study_instance_uid,
        )
    datasets[0] = _header(datasets[0])
    return datasets


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def summary_text(result: TriageResult, *, psa_density: float | None = None) -> str:
    """One paragraph a person can read on a text-only SR display."""
    priority = Priority(result.priority)
    if priority is Priority.NOT_ANALYSED:
        reason = result.reason or {"code": "invalid_input", "message": ""}
        coded = codes.not_analysed_reason(reason.get("code", "invalid_input"))
        text = f"AI triage: NOT ANALYSED ({coded.meaning})."
        if reason.get("message"):
            text += f" {reason['message'].rstrip('.')}."
        return text + " This study needs manual triage."
    parts = [f"Triage priority: {result.priority_headline or priority.value.upper()}."]
    if result.ai_priority is not None and Priority(result.ai_priority) is not priority:
        parts.append(f"AI opinion alone: {Priority(result.ai_priority).value}.")
    if result.case_likelihood is not None:
        parts.append(f"AI csPCa likelihood {_fmt(result.case_likelihood)}.")
    if result.lesions:
        items = []
        for i, lesion in enumerate(result.lesions, 1):
            where = f", {lesion.sector}" if lesion.sector else ""
            items.append(
                f"#{i} likelihood {_fmt(lesion.likelihood)}, {_fmt(lesion.volume_ml)} ml"
                f"{where}, {lesion.category}"
            )
        parts.append(f"{len(result.lesions)} AI lesion candidate(s): " + "; ".join(items) + ".")
    else:
        parts.append("No AI lesion candidates.")
    if result.gland_volume_ml is not None:
        parts.append(f"Gland volume {_fmt(result.gland_volume_ml, 1)} ml.")
    if psa_density is not None:
        parts.append(f"PSA density {_fmt(psa_density)} ng/mL/mL.")
    if result.model is not None:
        parts.append(f"Model {result.model.name} {result.model.version}.")
    parts.append("AI categories are not PI-RADS scores. Unverified AI result.")
    return " ".join(parts)


def _model_ref(result: TriageResult, model: ModelRef | None) -> ModelRef | None:
    if model is not None:
        return model
    if result.model is None:
        return None
    return ModelRef(
        name=result.model.name,
        version=result.model.version,
        sha256=result.model.sha256,
        clinical_use=result.disclaimer is None,
        digest=result.model.digest,
    )


def _observer(model: ModelRef | None) -> hd.sr.ObservationContext:
    name = model.name if model else MANUFACTURER
    version = model.version if model else _radtriage_version()
    attrs = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=stable_uid("device", name, version, model.sha256 if model else ""),
        name=name[:64],
        manufacturer_name=MANUFACTURER,
        model_name=f"{name} {version}"[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=sr_codes.DCM.Device, observer_identifying_attributes=attrs
        )
    )


def _radtriage_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("radtriage")
    except PackageNotFoundError:
        return "unknown"


def _algorithm(model: ModelRef) -> hd.sr.AlgorithmIdentification:
    parameters = [f"sha256={model.sha256}"]
    if model.digest:  # the sealed version: thresholds, calibration, gate and files
        parameters.append(f"version_digest={model.digest}")
    return hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, parameters=parameters
    )


def _num(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept, **kw: Any):
    return hd.sr.Measurement(name=name, value=round(float(value), 6), unit=unit, **kw)


#: C0 control characters a UT value may not carry in our UTF-8 SRs (PS3.5 6.1.3: only LF, FF
#: and CR; ESC would start a code extension that ISO_IR 192 does not allow).
_CONTROL = dict.fromkeys(c for c in range(0x20) if c not in (0x0A, 0x0C, 0x0D))
_CONTROL[0x7F] = None


def clean_text(value: str) -> str:
    """`value` without the control characters a DICOM text value may not hold (error messages
    can quote hostile header text)."""
    return value.translate(_CONTROL)


def _text(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name,
        value=clean_text(value),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


_VolumetricGroup = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations


def _case_group(
    result: TriageResult,
    model: ModelRef | None,
    *,
    psa_density: float | None,
    gland_segment: hd.sr.ReferencedSegment | None,
    disclaimer: str | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations | _VolumetricGroup:
    """The case-level group: TID 1501, or TID 1411 over the gland segment when the SEG has one.

    Over the gland segment, every group of the report is a TID 1411 volumetric ROI group; a
    validator (PixelMed) that picks one sub-template for all groups of Imaging Measurements
    then checks them all against the template they follow.
    """
    gland_in_seg = gland_segment is not None
    priority = Priority(result.priority)
    measurements = []
    if result.case_likelihood is not None:
        measurements.append(_num(dc.CASE_LIKELIHOOD, result.case_likelihood, dc.UNIT_NONE))
    if psa_density is not None:
        measurements.append(_num(dc.PSA_DENSITY, psa_density, dc.UNIT_PSA_DENSITY))
    if result.days_waited is not None:
        measurements.append(_num(dc.DAYS_SINCE_REQUEST, result.days_waited, dc.UNIT_DAY))
    if result.gland_volume_ml is not None and not gland_in_seg:
        measurements.append(
            _num(
                dc.VOLUME,
                result.gland_volume_ml,
                dc.UNIT_ML,
                finding_sites=[hd.sr.FindingSite(dc.PROSTATE)],
            )
        )
    evaluations = [
        hd.sr.QualitativeEvaluation(dc.WAITING_LIST_PRIORITY, dc.priority_concept(priority))
    ]
    evaluations.extend(
        hd.sr.QualitativeEvaluation(dc.PRIORITY_DRIVER, dc.driver_concept(driver))
        for driver in result.priority_drivers
    )
    if result.ai_priority is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                dc.AI_PRIORITY, dc.priority_concept(Priority(result.ai_priority).value)
            )
        )
    if result.referral_urgency is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                dc.REFERRAL_URGENCY,
                dc.referral_concept(result.referral_urgency),
            )
        )
    if result.domain_gate is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(dc.DOMAIN_GATE, dc.domain_gate_concept(result.domain_gate))
        )
    reason = result.reason or {}
    if priority is Priority.NOT_ANALYSED:
        code = reason.get("code", "invalid_input")
        evaluations.append(
            hd.sr.QualitativeEvaluation(dc.NOT_ANALYSED_REASON, dc.reason_concept(code))
        )
    common: dict[str, Any] = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=stable_uid("tracking", result.study_instance_uid, "case"),
            identifier="AI case assessment",
        ),
        "finding_type": dc.OVERALL_PROSTATE_FINDING,
        "algorithm_id": _algorithm(model) if model else None,
        "measurements": measurements or None,
        "qualitative_evaluations": evaluations,
    }
    group: Any
    if gland_segment is not None:
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=gland_segment,
            finding_sites=[hd.sr.FindingSite(dc.PROSTATE)],
            **common,
        )
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    content = group[0].ContentSequence
    if result.priority_headline:
        content.append(_text(dc.PRIORITY_STATEMENT, result.priority_headline))
    content.append(_text(dc.AI_SUMMARY, summary_text(result, psa_density=psa_density)))
    if priority is Priority.NOT_ANALYSED and reason.get("message"):
        content.append(_text(dc.COMMENT, reason["message"]))
    if disclaimer:
        content.append(_text(dc.COMMENT, disclaimer))
    return group


#: A driver in a SeriesDescription ("Triage URGENT (wait clock)").
DRIVER_WORDS = {
    "ai_suspicion": "AI",
    "referral_floor": "referral",
    "wait_clock": "wait clock",
    "low_confidence": "low-confidence AI",
    "not_analysed": "",
    "human_override": "radiologist",
}


def _verifier(result: TriageResult) -> str | None:
    """The radiologist whose override set the flag (the SR's verifying observer), as a PN."""
    if not result.priority_drivers or result.priority_drivers[0] != "human_override":
        return None
    name = (result.override or {}).get("by", "")
    return "".join(c for c in name if c.isprintable() and c not in "\\^=")[:64] or "radiologist"


def _segment_numbers(seg: Dataset | None) -> dict[str, int]:
    if seg is None:
        return {}
    return {
        str(s.TrackingUID): int(s.SegmentNumber) for s in seg.SegmentSequence if "TrackingUID" in s
    }


def _referenced_segment(seg: Dataset, number: int, t2w_series: str) -> hd.sr.ReferencedSegment:
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(t2w_series),
    )


def _lesion_group(
    result: TriageResult,
    index: int,
    lesion: LesionResult,
    model: ModelRef,
    *,
    seg: Dataset | None,
    segment_number: int | None,
    t2w_series: str,
    frame_of_reference_uid: str,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    tracking_uid = segment_tracking_uid(result.study_instance_uid, model, "lesion", index)
    roi: dict[str, Any]
    if seg is not None and segment_number is not None:
        roi = {"referenced_segment": _referenced_segment(seg, segment_number, t2w_series)}
        volume_method = {"method": dc.SUM_OF_SEGMENTED_VOXEL_VOLUMES}
    else:
        roi = {
            "referenced_volume_surface": hd.sr.VolumeSurface(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.asarray([lesion.centroid_mm], dtype=float),
                frame_of_reference_uid=frame_of_reference_uid,
                source_series=hd.sr.SourceSeriesForSegmentation(t2w_series),
            )
        }
        volume_method = {}
    sector = dc.sector_concept(lesion.sector)
    evaluations = []
    category = dc.category_concept(lesion.category)
    if category is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(dc.AI_LESION_CATEGORY, category))
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"AI lesion {index + 1}"
        ),
        finding_type=dc.LOCALIZED_PROSTATE_FINDING,
        finding_sites=[hd.sr.FindingSite(sector if sector is not None else dc.PROSTATE)],
        measurements=[
            _num(dc.LESION_LIKELIHOOD, lesion.likelihood, dc.UNIT_NONE),
            _num(dc.VOLUME, lesion.volume_ml, dc.UNIT_ML, **volume_method),
        ],
        qualitative_evaluations=evaluations or None,
        **roi,
    )
    content = group[0].ContentSequence
    if category is None:
        content.append(_text(dc.AI_LESION_CATEGORY, lesion.category))
    content.append(
        hd.sr.Scoord3DContentItem(
            name=dc.CENTER_OF_MASS,
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.round(np.asarray([lesion.centroid_mm], dtype=float), 4),
            frame_of_reference_uid=frame_of_reference_uid,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _gland_group(
    result: TriageResult, model: ModelRef, seg: Dataset, number: int, t2w_series: str
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    measurements = None
    if result.gland_volume_ml is not None:
        measurements = [
            _num(
                dc.VOLUME,
                result.gland_volume_ml,
                dc.UNIT_ML,
                method=dc.SUM_OF_SEGMENTED_VOXEL_VOLUMES,
            )
        ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=segment_tracking_uid(result.study_instance_uid, model, "gland"),
            identifier="prostate gland",
        ),
        referenced_segment=_referenced_segment(seg, number, t2w_series),
        finding_type=dc.PROSTATE,
        finding_category=dc.ANATOMICAL_STRUCTURE,
        measurements=measurements,
    )


def _character_set(first: Dataset, result: TriageResult, model: ModelRef | None) -> str:
    """ISO_IR 100 (Latin-1) when the source used it (or nothing) and all our text fits in it;
    otherwise UTF-8 (ISO_IR 192), which holds any patient name pydicom has decoded."""
    source = first.get("SpecificCharacterSet") or "ISO_IR 6"
    if isinstance(source, (list, tuple)) or source not in {"ISO_IR 6", "ISO_IR 100"}:
        return "ISO_IR 192"
    text = json.dumps(result.to_json_dict(), ensure_ascii=False)
    if model is not None:
        text += model.name + model.version
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return "ISO_IR 192"
    return "ISO_IR 100"


def _fingerprint(result: TriageResult, psa_density: float | None, seg: Dataset | None) -> str:
    content = result.to_json_dict()
    for volatile in ("status", "timings_ms", "analysed_at"):
        content.pop(volatile, None)
    content["psa_density_arg"] = psa_density
    content["seg"] = str(seg.SOPInstanceUID) if seg is not None else None
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def build_triage_sr(
    result: TriageResult,
    *,
    evidence: Mapping[str, Sequence[Dataset]],
    model: ModelRef | None,
    prediction: Prediction | None = None,
    seg: hd.seg.Segmentation | None = None,
    predecessor: Dataset | None = None,
    series_number: int = 9900,
    psa_density: float | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The triage SR for `result` (TID 1500 in a Comprehensive 3D SR).

    `evidence`: role (``t2w``/``adc``/``hbv``, or ``study`` when not analysed) -> datasets of
    the series used (headers suffice); all are referenced as evidence. `seg`: the SEG from
    `build_seg`, whose segments the lesion/gland groups reference. `predecessor`: a previously
    sent SR for this study; when this SR differs from it, it is listed in Predecessor Documents
    Sequence. Same result -> same SOP Instance UID (idempotent resend).

    `prediction` is accepted for symmetry with `build_seg`; values come from `result`.
    """
    del prediction  # values are taken from `result`; masks reach the SR through `seg`
    priority = Priority(result.priority)
    model = _model_ref(result, model)
    psa_density = psa_density if psa_density is not None else result.psa_density
    if priority is not Priority.NOT_ANALYSED and model is None:
        raise InputError(
            "an analysed result needs its model (name, version, sha256) for the SR; pass model=",
            study_instance_uid=result.study_instance_uid,
        )
    datasets = _evidence_list(result, evidence)
    disclaimer = result.disclaimer or (model.disclaimer if model else None)

    t2w = list(evidence.get("t2w", ()))
    t2w_series = str(t2w[0].SeriesInstanceUID) if t2w else ""
    frame_of_reference = str(t2w[0].get("FrameOfReferenceUID", "")) if t2w else ""
    segments = _segment_numbers(seg)
    gland_number = (
        segments.get(segment_tracking_uid(result.study_instance_uid, model, "gland"))
        if model is not None and seg is not None and t2w_series
        else None
    )

    gland_segment = (
        _referenced_segment(seg, gland_number, t2w_series)
        if seg is not None and gland_number is not None
        else None
    )
    groups: list[Any] = [
        _case_group(
            result,
            model,
            psa_density=psa_density,
            gland_segment=gland_segment,
            disclaimer=disclaimer,
        )
    ]
    if priority is not Priority.NOT_ANALYSED and model is not None:
        if gland_number is not None and seg is not None:
            groups.append(_gland_group(result, model, seg, gland_number, t2w_series))
        if result.lesions and not (t2w_series and frame_of_reference):
            raise InputError(
                "lesions need the T2W series (with FrameOfReferenceUID) in evidence['t2w']",
                study_instance_uid=result.study_instance_uid,
            )
        for i, lesion in enumerate(result.lesions):
            number = (
                segments.get(segment_tracking_uid(result.study_instance_uid, model, "lesion", i))
                if gland_segment is not None
                else None
            )
            groups.append(
                _lesion_group(
                    result,
                    i,
                    lesion,
                    model,
                    seg=seg,
                    segment_number=number,
                    t2w_series=t2w_series,
                    frame_of_reference_uid=frame_of_reference,
                )
            )

    report = hd.sr.MeasurementReport(
        observation_context=_observer(model),
        procedure_reported=dc.PROCEDURE_MPMRI_PROSTATE,
        imaging_measurements=groups,
    )
    if seg is not None:
        datasets.append(seg)

    sop_uid = stable_uid("sr", result.study_instance_uid, _fingerprint(result, psa_density, seg))
    previous = None
    if predecessor is not None and str(predecessor.SOPInstanceUID) != sop_uid:
        previous = [predecessor]
    label = "NOT ANALYSED" if priority is Priority.NOT_ANALYSED else priority.value.upper()
    driver = DRIVER_WORDS.get(result.priority_drivers[0], "") if result.priority_drivers else ""
    description = f"Triage {label}" + (f" ({driver})" if driver else "")
    description += " - NOT FOR CLINICAL USE" if disclaimer else ""
    verifier = _verifier(result)
    with copying_source_names():
        return hd.sr.Comprehensive3DSR(
            evidence=datasets,
            content=report,
            series_instance_uid=stable_uid("sr-series", result.study_instance_uid),
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=priority is not Priority.NOT_ANALYSED,
            is_final=False,
            is_verified=verifier is not None,
            verifying_observer_name=verifier,
            verifying_organization=MANUFACTURER if verifier is not None else None,
            previous_versions=previous,
            series_description=description[:64],
            specific_character_set=_character_set(datasets[0], result, model),
            coding_schemes=[
                hd.coding_schemes.CodingSchemeIdentificationItem(
                    designator=codes.CODING_SCHEME, name=codes.CODING_SCHEME_NAME
                )
            ],
        )
