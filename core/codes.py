"""Coded concepts radtriage writes into DICOM SR, defined once.

Where DICOM/SNOMED/DCM has no code we use our private coding scheme `CODING_SCHEME` (a "99"
prefix marks a private scheme, PS3.16 section 8.2). docs/conformance.md lists every code.
Plain tuples here (core imports no DICOM library); `dicom_node` turns them into CodedConcepts.
"""

from __future__ import annotations

from typing import NamedTuple

CODING_SCHEME = "99RADTRIAGE"
CODING_SCHEME_NAME = "radtriage private codes"


class Code(NamedTuple):
    value: str
    scheme: str
    meaning: str


# Concept names
WAITING_LIST_PRIORITY = Code("RT001", CODING_SCHEME, "Waiting-list priority")
CASE_LIKELIHOOD = Code("RT002", CODING_SCHEME, "AI csPCa case likelihood")
LESION_LIKELIHOOD = Code("RT003", CODING_SCHEME, "AI csPCa lesion likelihood")
AI_LESION_CATEGORY = Code("RT004", CODING_SCHEME, "AI lesion category (not PI-RADS)")
NOT_ANALYSED_REASON = Code("RT005", CODING_SCHEME, "Reason not analysed by AI")
PSA_DENSITY = Code("RT006", CODING_SCHEME, "PSA density")
AI_SUMMARY = Code("RT007", CODING_SCHEME, "AI result summary")
REFERRAL_URGENCY = Code("RT008", CODING_SCHEME, "Referral urgency")
DAYS_SINCE_REQUEST = Code("RT009", CODING_SCHEME, "Days since imaging request")
PRIORITY_DRIVER = Code("RT010", CODING_SCHEME, "Priority driver")
AI_PRIORITY = Code("RT011", CODING_SCHEME, "AI priority opinion")
PRIORITY_STATEMENT = Code("RT012", CODING_SCHEME, "Priority statement")
REQUEST_DATE_SOURCE = Code("RT013", CODING_SCHEME, "Request date source")
DOMAIN_GATE = Code("RT014", CODING_SCHEME, "AI domain gate")

# Concepts of the RIS and FHIR results (ORU^R01 OBX-3, Observation.code)
SERVICE = Code("RT500", CODING_SCHEME, "AI prostate MRI triage")
GLAND_VOLUME = Code("RT510", CODING_SCHEME, "Prostate gland volume (AI)")
LESION_COUNT = Code("RT511", CODING_SCHEME, "AI lesion candidates")
AI_MODEL = Code("RT512", CODING_SCHEME, "AI model")
NOT_CLINICAL = Code("RT513", CODING_SCHEME, "Not for clinical use")
SR_INSTANCE = Code("RT514", CODING_SCHEME, "Triage SR SOP Instance UID")
STUDY_UID = Code("110180", "DCM", "Study Instance UID")

# Values of WAITING_LIST_PRIORITY, keyed by core.domain.Priority value
# The flag alone: what set it is a separate coded driver (PRIORITY_DRIVER), never implied here.
PRIORITY_CODES: dict[str, Code] = {
    "urgent": Code("RT101", CODING_SCHEME, "Urgent: report first"),
    "soon": Code("RT102", CODING_SCHEME, "Soon: report before routine"),
    "routine": Code("RT103", CODING_SCHEME, "Routine"),
    "not_analysed": Code("RT104", CODING_SCHEME, "Not analysed by AI: needs manual triage"),
}

# Values of PRIORITY_DRIVER, keyed by core.priority.Driver value
DRIVER_CODES: dict[str, Code] = {
    "ai_suspicion": Code("RT601", CODING_SCHEME, "AI csPCa suspicion"),
    "referral_floor": Code("RT602", CODING_SCHEME, "Referral urgency floor"),
    "wait_clock": Code("RT603", CODING_SCHEME, "Waiting time against the diagnosis standard"),
    "low_confidence": Code("RT604", CODING_SCHEME, "AI result of low confidence (domain gate)"),
    "not_analysed": Code("RT605", CODING_SCHEME, "Not analysed by AI"),
    "human_override": Code("RT606", CODING_SCHEME, "Set by a radiologist"),
}

# Values of REQUEST_DATE_SOURCE: where the waiting-list clock's start came from
REQUEST_DATE_SOURCES: dict[str, Code] = {
    "order": Code("RT701", CODING_SCHEME, "RIS order"),
    "dicom_request": Code("RT702", CODING_SCHEME, "DICOM request attributes"),
    "study_date": Code("RT703", CODING_SCHEME, "Study date"),
    "received": Code("RT704", CODING_SCHEME, "Date received"),
}

# Values of DOMAIN_GATE, keyed by core.domain.DomainGate value: what the model's
# out-of-distribution gate said (information only: never a priority driver by itself)
DOMAIN_GATE_CODES: dict[str, Code] = {
    "in_domain": Code("RT801", CODING_SCHEME, "Within the model's validated domain"),
    "low_confidence": Code("RT802", CODING_SCHEME, "Near the edge of the model's validated domain"),
    "not_fitted": Code("RT803", CODING_SCHEME, "Model has no fitted domain gate: not checked"),
}

# Values of REFERRAL_URGENCY, keyed by core.domain.ReferralUrgency value
REFERRAL_CODES: dict[str, Code] = {
    "urgent": Code("RT401", CODING_SCHEME, "Urgent referral (STAT or HIGH)"),
    "soon": Code("RT402", CODING_SCHEME, "Soon referral (MEDIUM)"),
    "routine": Code("RT403", CODING_SCHEME, "Routine referral"),
}

# Values of AI_LESION_CATEGORY
LESION_CATEGORY_CODES: dict[str, Code] = {
    "ai_high": Code("RT201", CODING_SCHEME, "AI high suspicion"),
    "ai_intermediate": Code("RT202", CODING_SCHEME, "AI intermediate suspicion"),
    "ai_low": Code("RT203", CODING_SCHEME, "AI low suspicion"),
    "ai_suspicious": Code("RT204", CODING_SCHEME, "AI suspicious, not graded"),
}

# Values of NOT_ANALYSED_REASON, keyed by core.errors reason_code
NOT_ANALYSED_REASONS: dict[str, Code] = {
    "missing_t2w": Code("RT301", CODING_SCHEME, "No axial T2-weighted series"),
    "missing_adc": Code("RT302", CODING_SCHEME, "No ADC series"),
    "missing_hbv": Code("RT303", CODING_SCHEME, "No high b-value diffusion series"),
    "not_mr": Code("RT304", CODING_SCHEME, "Not an MR study"),
    "wrong_body_part": Code("RT305", CODING_SCHEME, "Not a prostate MRI"),
    "undecodable_pixel_data": Code("RT306", CODING_SCHEME, "Images could not be decoded"),
    "inconsistent_geometry": Code("RT307", CODING_SCHEME, "Series geometry inconsistent"),
    "missing_slices": Code("RT308", CODING_SCHEME, "Series has missing slices"),
    "inconsistent_spacing": Code("RT309", CODING_SCHEME, "Irregular slice spacing"),
    "mixed_orientation": Code("RT310", CODING_SCHEME, "Mixed slice orientations"),
    "image_quality": Code("RT311", CODING_SCHEME, "Image quality insufficient for AI"),
    "model_failure": Code("RT312", CODING_SCHEME, "AI model failed"),
    "malformed_dicom": Code("RT313", CODING_SCHEME, "Malformed DICOM"),
    "not_dicom": Code("RT314", CODING_SCHEME, "Not DICOM"),
    "invalid_input": Code("RT315", CODING_SCHEME, "Input not usable by the AI"),
    "outside_validated_domain": Code(
        "RT316", CODING_SCHEME, "Outside the model's validated domain"
    ),
    "internal_error": Code("RT399", CODING_SCHEME, "Internal error"),
}


def not_analysed_reason(code: str) -> Code:
    """The coded reason for an error `reason_code`, falling back to `invalid_input`."""
    return NOT_ANALYSED_REASONS.get(code, NOT_ANALYSED_REASONS["invalid_input"])
