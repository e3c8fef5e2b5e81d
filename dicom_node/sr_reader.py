"""Read a radtriage triage SR back: the priority flag, likelihoods and lesion measurements.

For the worklist and for PACS integrators. Only pydicom is needed to call it::

    from pydicom import dcmread
    from dicom_node.sr_reader import read_triage_sr

    summary = read_triage_sr(dcmread("sr.dcm"))
    summary.priority            # Priority.URGENT | SOON | ROUTINE | NOT_ANALYSED
    summary.case_likelihood     # 0..1, or None when not analysed
    summary.lesions[0].sector   # "PZpl-R-mid" (PI-RADS v2.1 sector key) or None

Items are found by concept name anywhere in the content tree (see `dicom_node.sr` for the
tree), so unknown extra items are ignored. A document without our waiting-list priority item is
not a triage SR: MalformedDicomError.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from core import codes
from core.domain import ModelInfo, Priority
from core.errors import MalformedDicomError
from dicom_node import dicom_codes as dc

_SR_CLASSES_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


@dataclass(frozen=True)
class SrLesion:
    """One AI lesion group (TID 1411) of the SR."""

    likelihood: float | None
    volume_ml: float | None
    sector: str | None  # PI-RADS v2.1 sector key (dicom_codes), None when not coded
    category: str | None  # core.codes.LESION_CATEGORY_CODES key, or the free-text category
    centroid_mm: tuple[float, float, float] | None  # LPS patient coordinates
    segment_number: int | None  # in the referenced SEG
    tracking_uid: str | None


@dataclass(frozen=True)
class TriageSrSummary:
    """What a triage SR says, in `core.domain` terms."""

    sop_instance_uid: str
    study_instance_uid: str
    priority: Priority
    case_likelihood: float | None
    gland_volume_ml: float | None
    psa_density: float | None
    lesions: tuple[SrLesion, ...]
    reason: dict[str, str] | None  # {"code", "message"} when not analysed
    model: ModelInfo | None
    referenced_series: tuple[str, ...]  # image series referenced as evidence, SEG excluded
    segmentation_sop_instance_uid: str | None
    not_for_clinical_use: bool
    summary: str
    completion_flag: str
    verification_flag: str
    predecessors: tuple[str, ...] = field(default_factory=tuple)
    referral_urgency: str | None = None  # core.domain.ReferralUrgency value, when recorded
    days_waited: int | None = None  # days since the imaging request, when recorded
    drivers: tuple[str, ...] = ()  # core.priority.Driver values, the deciding one first
    ai_priority: Priority | None = None  # the AI's own opinion, apart from the flag
    headline: str = ""  # the priority statement ("Urgent: waited 26 of 28 days (FDS)")
    verifying_observer: str | None = None  # the radiologist whose override set the flag
    domain_gate: str | None = None  # core.domain.DomainGate value, when recorded


def _name(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator))


def _key(concept) -> tuple[str, str]:
    return (str(concept.value), str(concept.scheme_designator))


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in _children(item):
        yield child
        yield from _walk(child)


def _code(item: Dataset) -> tuple[str, str, str] | None:
    seq = item.get("ConceptCodeSequence")
    if not seq:
        return None
    c = seq[0]
    return (str(c.CodeValue), str(c.CodingSchemeDesignator), str(c.get("CodeMeaning", "")))


def _num(item: Dataset) -> float | None:
    seq = item.get("MeasuredValueSequence")
    if not seq:
        return None
    return float(seq[0].NumericValue)


def _direct(group: Dataset, name: tuple[str, str], value_type: str) -> list[Dataset]:
    return [c for c in _children(group) if c.get("ValueType") == value_type and _name(c) == name]


def _first_num(group: Dataset, name: tuple[str, str], **where: tuple[str, str]) -> float | None:
    for item in _direct(group, name, "NUM"):
        if "site" in where:
            sites = [c[:2] for m in _children(item) if (c := _code(m)) is not None]
            if where["site"] not in sites:
                continue
        return _num(item)
    return None


def _text(group: Dataset, name: tuple[str, str]) -> list[str]:
    return [str(c.TextValue) for c in _direct(group, name, "TEXT")]


def _measurement_groups(root: Dataset) -> list[Dataset]:
    group_name = ("125007", "DCM")
    return [
        item
        for item in _walk(root)
        if item.get("ValueType") == "CONTAINER" and _name(item) == group_name
    ]


def _model(group: Dataset) -> ModelInfo | None:
    names = _text(group, ("111001", "DCM"))
    versions = _text(group, ("111003", "DCM"))
    if not names:
        return None
    found = {"sha256": "", "version_digest": ""}
    for parameter in _text(group, ("111002", "DCM")):
        key, sep, value = parameter.partition("=")
        if sep and key in found:
            found[key] = value
    return ModelInfo(
        name=names[0],
        version=versions[0] if versions else "",
        sha256=found["sha256"],
        digest=found["version_digest"],
    )


def _lesion(group: Dataset) -> SrLesion:
    sector = category = None
    segment_number = None
    centroid = None
    for item in _children(group):
        name = _name(item)
        vt = item.get("ValueType")
        if vt == "CODE" and name == ("363698007", "SCT"):  # Finding Site
            code = _code(item)
            if code is not None:
                sector = dc.sector_for(code[0], code[1])
        elif name == _key(dc.AI_LESION_CATEGORY):
            if vt == "CODE" and (code := _code(item)) is not None:
                category = dc.category_for(code[0], code[1]) or code[2]
            elif vt == "TEXT":
                category = str(item.TextValue)
        elif vt == "IMAGE" and name == ("121191", "DCM"):  # Referenced Segment
            ref = item.ReferencedSOPSequence[0]
            if "ReferencedSegmentNumber" in ref:
                segment_number = int(
                    ref.ReferencedSegmentNumber[0]
                    if isinstance(ref.ReferencedSegmentNumber, list)
                    else ref.ReferencedSegmentNumber
                )
        elif vt == "SCOORD3D" and name == _key(dc.CENTER_OF_MASS):
            x, y, z = (float(v) for v in item.GraphicData[:3])
            centroid = (x, y, z)
    tracking = [str(c.UID) for c in _direct(group, ("112040", "DCM"), "UIDREF")]
    return SrLesion(
        likelihood=_first_num(group, _key(dc.LESION_LIKELIHOOD)),
        volume_ml=_first_num(group, _key(dc.VOLUME)),
        sector=sector,
        category=category,
        centroid_mm=centroid,
        segment_number=segment_number,
        tracking_uid=tracking[0] if tracking else None,
    )


def _finding(group: Dataset) -> tuple[str, str] | None:
    for item in _direct(group, ("121071", "DCM"), "CODE"):
        code = _code(item)
        if code is not None:
            return code[:2]
    return None


def _evidence(ds: Dataset) -> tuple[tuple[str, ...], str | None]:
    series: list[str] = []
    seg_uid = None
    for attr in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(attr, []):
            for s in study.get("ReferencedSeriesSequence", []):
                for inst in s.get("ReferencedSOPSequence", []):
                    cls = str(inst.ReferencedSOPClassUID)
                    if cls == SegmentationStorage:
                        seg_uid = str(inst.ReferencedSOPInstanceUID)
                    elif not cls.startswith(_SR_CLASSES_PREFIX) and (
                        str(s.SeriesInstanceUID) not in series
                    ):
                        series.append(str(s.SeriesInstanceUID))
    return tuple(series), seg_uid


def read_triage_sr(ds: Dataset) -> TriageSrSummary:
    """Summarise a triage SR written by `dicom_node.sr.build_triage_sr` (tolerant reader)."""
    if "ContentSequence" not in ds or not str(ds.get("SOPClassUID", "")).startswith(
        _SR_CLASSES_PREFIX
    ):
        raise MalformedDicomError(
            f"{ds.get('SOPInstanceUID', '?')} is not a DICOM SR document; pass a triage SR"
        )
    priority_name = _key(dc.WAITING_LIST_PRIORITY)
    case_group = None
    lesions: list[SrLesion] = []
    gland_volume = None
    for group in _measurement_groups(ds):
        if _direct(group, priority_name, "CODE") and case_group is None:
            case_group = group
            continue
        finding = _finding(group)
        if finding == _key(dc.LOCALIZED_PROSTATE_FINDING):
            lesions.append(_lesion(group))
        elif finding == _key(dc.PROSTATE):
            gland_volume = _first_num(group, _key(dc.VOLUME))
    if case_group is None:
        raise MalformedDicomError(
            f"SR {ds.get('SOPInstanceUID', '?')} has no '{codes.WAITING_LIST_PRIORITY.meaning}' "
            "item: not a radtriage triage SR"
        )
    code = _code(_direct(case_group, priority_name, "CODE")[0])
    priority_value = dc.priority_for(code[0], code[1]) if code else None
    if priority_value is None:
        raise MalformedDicomError(f"unknown waiting-list priority code {code}")
    priority = Priority(priority_value)

    reason = None
    reason_items = _direct(case_group, _key(dc.NOT_ANALYSED_REASON), "CODE")
    comments = _text(case_group, _key(dc.COMMENT))
    disclaimers = [c for c in comments if "NOT FOR CLINICAL USE" in c.upper()]
    if reason_items and (rc := _code(reason_items[0])) is not None:
        messages = [c for c in comments if c not in disclaimers]
        reason = {
            "code": dc.reason_for(rc[0], rc[1]) or rc[0],
            "message": messages[0] if messages else rc[2],
        }
    if gland_volume is None:
        gland_volume = _first_num(case_group, _key(dc.VOLUME), site=_key(dc.PROSTATE))
    series, seg_uid = _evidence(ds)
    summaries = _text(case_group, _key(dc.AI_SUMMARY))
    referral_items = _direct(case_group, _key(dc.REFERRAL_URGENCY), "CODE")
    referral_code = _code(referral_items[0]) if referral_items else None
    days = _first_num(case_group, _key(dc.DAYS_SINCE_REQUEST))
    drivers = tuple(
        d
        for item in _direct(case_group, _key(dc.PRIORITY_DRIVER), "CODE")
        if (c := _code(item)) is not None and (d := dc.driver_for(c[0], c[1])) is not None
    )
    ai_items = _direct(case_group, _key(dc.AI_PRIORITY), "CODE")
    ai_code = _code(ai_items[0]) if ai_items else None
    ai_value = dc.priority_for(ai_code[0], ai_code[1]) if ai_code else None
    headlines = _text(case_group, _key(dc.PRIORITY_STATEMENT))
    gate_items = _direct(case_group, _key(dc.DOMAIN_GATE), "CODE")
    gate_code = _code(gate_items[0]) if gate_items else None
    verifiers = ds.get("VerifyingObserverSequence") or []
    return TriageSrSummary(
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        priority=priority,
        case_likelihood=_first_num(case_group, _key(dc.CASE_LIKELIHOOD)),
        gland_volume_ml=gland_volume,
        psa_density=_first_num(case_group, _key(dc.PSA_DENSITY)),
        lesions=tuple(lesions),
        reason=reason,
        model=_model(case_group),
        referenced_series=series,
        segmentation_sop_instance_uid=seg_uid,
        not_for_clinical_use=bool(disclaimers),
        summary=summaries[0] if summaries else "",
        completion_flag=str(ds.get("CompletionFlag", "")),
        verification_flag=str(ds.get("VerificationFlag", "")),
        predecessors=tuple(
            str(inst.ReferencedSOPInstanceUID)
            for study in ds.get("PredecessorDocumentsSequence", [])
            for s in study.get("ReferencedSeriesSequence", [])
            for inst in s.get("ReferencedSOPSequence", [])
        ),
        referral_urgency=dc.referral_for(*referral_code[:2]) if referral_code else None,
        days_waited=round(days) if days is not None else None,
        drivers=drivers,
        ai_priority=Priority(ai_value) if ai_value else None,
        headline=headlines[0] if headlines else "",
        verifying_observer=str(verifiers[0].VerifyingObserverName) if verifiers else None,
        domain_gate=dc.domain_gate_for(gate_code[0], gate_code[1]) if gate_code else None,
    )
