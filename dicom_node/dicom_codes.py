"""`core.codes` as highdicom `CodedConcept`s, plus the standard codes our SR and SEG use.

Everything coded that radtriage writes is named here once; docs/conformance.md lists it.

PI-RADS v2.1 sectors (DICOM CID 6304, SNOMED CT) are keyed ``ZONE-SIDE-LEVEL`` using the
PI-RADS sector-map abbreviations: zone ``PZa|PZpl|PZpm|TZa|TZp|AS|CZ|SV|US``, side ``R|L``,
level ``base|mid|apex`` (``CZ`` is basal only; ``SV-R``/``SV-L`` and ``US`` have no level).
Examples: ``"PZpl-R-mid"``, ``"TZa-L-apex"``, ``"CZ-R-base"``. `sector_concept` also accepts
the words in any order and case (``"right mid PZpl"``, ``"pzpl_right_middle"``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from highdicom.sr import CodedConcept

from core import codes
from core.codes import Code


def concept(code: Code) -> CodedConcept:
    """A `core.codes.Code` as a highdicom CodedConcept (with the scheme version-free)."""
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


def _dcm(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="DCM", meaning=meaning)


def _ucum(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="UCUM", meaning=meaning)


# --- our private concepts (core.codes, scheme 99RADTRIAGE) ----------------------------------
WAITING_LIST_PRIORITY = concept(codes.WAITING_LIST_PRIORITY)
CASE_LIKELIHOOD = concept(codes.CASE_LIKELIHOOD)
LESION_LIKELIHOOD = concept(codes.LESION_LIKELIHOOD)
AI_LESION_CATEGORY = concept(codes.AI_LESION_CATEGORY)
NOT_ANALYSED_REASON = concept(codes.NOT_ANALYSED_REASON)
PSA_DENSITY = concept(codes.PSA_DENSITY)
AI_SUMMARY = concept(codes.AI_SUMMARY)
REFERRAL_URGENCY = concept(codes.REFERRAL_URGENCY)
DAYS_SINCE_REQUEST = concept(codes.DAYS_SINCE_REQUEST)
PRIORITY_DRIVER = concept(codes.PRIORITY_DRIVER)
AI_PRIORITY = concept(codes.AI_PRIORITY)
PRIORITY_STATEMENT = concept(codes.PRIORITY_STATEMENT)
DOMAIN_GATE = concept(codes.DOMAIN_GATE)

# --- standard concepts ----------------------------------------------------------------------
PROCEDURE_MPMRI_PROSTATE = _dcm("126021", "Multiparametric MRI of prostate")
OVERALL_PROSTATE_FINDING = _dcm("130554", "Overall Prostate Finding")
LOCALIZED_PROSTATE_FINDING = _dcm("130555", "Localized Prostate Finding")
COMMENT = _dcm("121106", "Comment")
CENTER_OF_MASS = _dcm("128138", "Center of Mass")
SUM_OF_SEGMENTED_VOXEL_VOLUMES = _dcm("126030", "Sum of segmented voxel volumes")
ARTIFICIAL_INTELLIGENCE = _dcm("123110", "Artificial Intelligence")
DEVICE = _dcm("121007", "Device")
VOLUME = _sct("118565006", "Volume")
PROSTATE = _sct("41216001", "Prostate")
LESION = _sct("52988006", "Lesion")
ANATOMICAL_STRUCTURE = _sct("91723000", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = _sct("49755003", "Morphologically Abnormal Structure")

UNIT_NONE = _ucum("1", "no units")
UNIT_ML = _ucum("ml", "milliliter")
UNIT_PSA_DENSITY = _ucum("ng/mL/mL", "nanogram per milliliter per milliliter")
UNIT_DAY = _ucum("d", "day")

# --- PI-RADS v2.1 sectors (DICOM CID 6304 "Prostate Sector Anatomy from PI-RADS v2.1") -------
_SECTORS: dict[str, tuple[str, str]] = {
    "PZa-R-base": ("716904003", "Right anterior basal peripheral zone of prostate"),
    "PZa-L-base": ("716905002", "Left anterior basal peripheral zone of prostate"),
    "PZpl-R-base": ("716906001", "Right posterolateral basal peripheral zone of prostate"),
    "PZpl-L-base": ("716907005", "Left posterolateral basal peripheral zone of prostate"),
    "PZpm-R-base": ("836428004", "Right posteromedial basal peripheral zone of prostate"),
    "PZpm-L-base": ("836427009", "Left posteromedial basal peripheral zone of prostate"),
    "TZa-R-base": ("716896009", "Right anterior basal transition zone of prostate"),
    "TZa-L-base": ("716897000", "Left anterior basal transition zone of prostate"),
    "TZp-R-base": ("716898005", "Right posterior basal transition zone of prostate"),
    "TZp-L-base": ("716899002", "Left posterior basal transition zone of prostate"),
    "AS-R-base": ("716892006", "Right basal anterior fibromuscular stroma of prostate"),
    "AS-L-base": ("716893001", "Left basal anterior fibromuscular stroma of prostate"),
    "CZ-R-base": ("716900007", "Central zone of right half prostate"),
    "CZ-L-base": ("716901006", "Central zone of left half prostate"),
    "PZa-R-mid": ("716919002", "Right anterior middle peripheral zone of prostate"),
    "PZa-L-mid": ("716920008", "Left anterior middle peripheral zone of prostate"),
    "PZpl-R-mid": ("716921007", "Right posterolateral middle peripheral zone of prostate"),
    "PZpl-L-mid": ("716922000", "Left posterolateral middle peripheral zone of prostate"),
    "PZpm-R-mid": ("716923005", "Right posteromedial middle peripheral zone of prostate"),
    "PZpm-L-mid": ("716924004", "Left posteromedial middle peripheral zone of prostate"),
    "TZa-R-mid": ("716913001", "Right anterior middle transition zone of prostate"),
    "TZa-L-mid": ("716914007", "Left anterior middle transition zone of prostate"),
    "TZp-R-mid": ("716915008", "Right posterior middle transition zone of prostate"),
    "TZp-L-mid": ("716916009", "Left posterior middle transition zone of prostate"),
    "AS-R-mid": ("716909008", "Right middle anterior fibromuscular stroma of prostate"),
    "AS-L-mid": ("716910003", "Left middle anterior fibromuscular stroma of prostate"),
    "PZa-R-apex": ("716936005", "Right anterior apical peripheral zone of prostate"),
    "PZa-L-apex": ("716937001", "Left anterior apical peripheral zone of prostate"),
    "PZpl-R-apex": ("716938006", "Right posterolateral apical peripheral zone of prostate"),
    "PZpl-L-apex": ("716939003", "Left posterolateral apical peripheral zone of prostate"),
    "PZpm-R-apex": ("716940001", "Right posteromedial apical peripheral zone of prostate"),
    "PZpm-L-apex": ("716941002", "Left posteromedial apical peripheral zone of prostate"),
    "TZa-R-apex": ("716930004", "Right anterior apical transition zone of prostate"),
    "TZa-L-apex": ("716931000", "Left anterior apical transition zone of prostate"),
    "TZp-R-apex": ("716932007", "Right posterior apical transition zone of prostate"),
    "TZp-L-apex": ("716933002", "Left posterior apical transition zone of prostate"),
    "AS-R-apex": ("716926002", "Right apical anterior fibromuscular stroma of prostate"),
    "AS-L-apex": ("716927006", "Left apical anterior fibromuscular stroma of prostate"),
    "SV-R": ("74308000", "Right seminal vesicle"),
    "SV-L": ("42320003", "Left seminal vesicle"),
    "US": ("717027004", "Male external urethral sphincter"),
}
PIRADS_SECTORS: Mapping[str, CodedConcept] = {k: _sct(*v) for k, v in _SECTORS.items()}

_ZONES = {z.lower(): z for z in ("PZa", "PZpl", "PZpm", "TZa", "TZp", "AS", "CZ", "SV", "US")}
_SIDES = {"r": "R", "right": "R", "l": "L", "left": "L"}
_LEVELS = {
    "base": "base",
    "basal": "base",
    "mid": "mid",
    "middle": "mid",
    "midgland": "mid",
    "apex": "apex",
    "apical": "apex",
}


def normalise_sector(sector: str) -> str | None:
    """The canonical ``ZONE-SIDE-LEVEL`` key for a sector label, or None if it is not one."""
    zone = side = level = None
    for token in re.split(r"[\s_\-/,]+", sector.strip().lower()):
        if not token:
            continue
        if token in _ZONES and zone is None:
            zone = _ZONES[token]
        elif token in _SIDES and side is None:
            side = _SIDES[token]
        elif token in _LEVELS and level is None:
            level = _LEVELS[token]
        else:
            return None
    if zone is None:
        return None
    if zone == "CZ" and level is None:
        level = "base"
    key = "-".join(t for t in (zone, side, level) if t is not None)
    return key if key in PIRADS_SECTORS else None


def sector_concept(sector: str | None) -> CodedConcept | None:
    """The CID 6304 code for a PI-RADS v2.1 sector label; None when absent or unknown."""
    if not sector:
        return None
    key = normalise_sector(sector)
    return PIRADS_SECTORS[key] if key else None


def _reverse(table: Mapping[str, CodedConcept | Code]) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    for key, code in table.items():
        if isinstance(code, Code):
            out[(code.value, code.scheme)] = key
        else:
            out[(code.value, code.scheme_designator)] = key
    return out


_SECTOR_BY_CODE = _reverse(PIRADS_SECTORS)
_PRIORITY_BY_CODE = _reverse(codes.PRIORITY_CODES)
_CATEGORY_BY_CODE = _reverse(codes.LESION_CATEGORY_CODES)
_REASON_BY_CODE = _reverse(codes.NOT_ANALYSED_REASONS)
_REFERRAL_BY_CODE = _reverse(codes.REFERRAL_CODES)
_DRIVER_BY_CODE = _reverse(codes.DRIVER_CODES)
_DOMAIN_GATE_BY_CODE = _reverse(codes.DOMAIN_GATE_CODES)


def sector_for(value: str, scheme: str) -> str | None:
    """Sector key for a coded finding site (inverse of `sector_concept`)."""
    return _SECTOR_BY_CODE.get((value, scheme))


def priority_for(value: str, scheme: str) -> str | None:
    """`core.domain.Priority` value for a coded priority flag."""
    return _PRIORITY_BY_CODE.get((value, scheme))


def category_for(value: str, scheme: str) -> str | None:
    """AI lesion category key (`core.codes.LESION_CATEGORY_CODES`) for a code."""
    return _CATEGORY_BY_CODE.get((value, scheme))


def reason_for(value: str, scheme: str) -> str | None:
    """Error `reason_code` for a coded not-analysed reason."""
    return _REASON_BY_CODE.get((value, scheme))


def priority_concept(priority: str) -> CodedConcept:
    return concept(codes.PRIORITY_CODES[priority])


def category_concept(category: str) -> CodedConcept | None:
    code = codes.LESION_CATEGORY_CODES.get(category)
    return concept(code) if code else None


def referral_concept(urgency: str) -> CodedConcept:
    return concept(codes.REFERRAL_CODES[urgency])


def referral_for(value: str, scheme: str) -> str | None:
    """`core.domain.ReferralUrgency` value for a coded referral urgency."""
    return _REFERRAL_BY_CODE.get((value, scheme))


def reason_concept(reason_code: str) -> CodedConcept:
    return concept(codes.not_analysed_reason(reason_code))


def driver_concept(driver: str) -> CodedConcept:
    """A `core.priority.Driver` value as its code (RT6xx)."""
    return concept(codes.DRIVER_CODES[driver])


def driver_for(value: str, scheme: str) -> str | None:
    """`core.priority.Driver` value for a coded priority driver."""
    return _DRIVER_BY_CODE.get((value, scheme))


def domain_gate_concept(state: str) -> CodedConcept:
    """A `core.domain.DomainGate` value as its code (RT8xx)."""
    return concept(codes.DOMAIN_GATE_CODES[state])


def domain_gate_for(value: str, scheme: str) -> str | None:
    """`core.domain.DomainGate` value for a coded domain-gate state."""
    return _DOMAIN_GATE_BY_CODE.get((value, scheme))
