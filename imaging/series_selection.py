"""Pick the axial T2W, ADC and high-b DWI series of a study with declarative rules.

The rules (`selection_rules.json`) are data: per role, the conditions a series must meet and the
keys that rank the candidates. This module only computes the *features* the rules refer to from
DICOM content (ImageType, b-values (0018,9087) and vendor tags, orientation, timing, slice count)
and applies the rules. A DWI series holding several b-values is split into per-b-value
candidates. Every series gets a role and a `reason` saying why.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from core.domain import SeriesChoice, SeriesRole
from core.errors import ConfigError, RadtriageError
from imaging.study_reader import SeriesInfo, StudyScan
from imaging.volumes import series_geometry

DEFAULT_RULES = Path(__file__).with_name("selection_rules.json")
_OPS = {"eq", "ne", "ge", "le", "in", "not_in", "has_any", "has_none"}


@dataclass(frozen=True)
class Condition:
    feature: str
    op: str
    value: Any
    why: str
    missing: str = "fail"  # what an absent feature does: "pass" or "fail"

    def check(self, features: dict[str, Any]) -> bool:
        actual = features.get(self.feature)
        if actual is None:
            return self.missing == "pass"
        v = self.value
        if self.op == "eq":
            return bool(actual == v)
        if self.op == "ne":
            return bool(actual != v)
        if self.op == "ge":
            return bool(actual >= v)
        if self.op == "le":
            return bool(actual <= v)
        if self.op == "in":
            return actual in v
        if self.op == "not_in":
            return actual not in v
        tokens = set(actual) if isinstance(actual, list | tuple | set) else {actual}
        if self.op == "has_any":
            return bool(tokens & set(v))
        return not tokens & set(v)  # has_none


@dataclass(frozen=True)
class RankKey:
    feature: str
    descending: bool


@dataclass(frozen=True)
class RoleRule:
    role: SeriesRole
    require: tuple[Condition, ...]
    rank: tuple[RankKey, ...]
    description_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdcContent:
    """How a diffusion map is recognised as ADC when ImageType does not say so (rules file
    ``adc_content``): diffusivity units in the header, or, for a DERIVED diffusion series
    with no ADC/trace/computed-b ImageType value, pixel values in the ADC range
    (10^-6 mm2/s: tissue ~500-2000, fluid ~3000; trace-weighted images are far darker)."""

    units: frozenset[str] = frozenset()
    median_range: tuple[float, float] = (300.0, 3000.0)
    p99_range: tuple[float, float] = (1000.0, 6000.0)


@dataclass(frozen=True)
class SelectionRules:
    roles: dict[SeriesRole, RoleRule]
    role_order: tuple[SeriesRole, ...]
    max_oblique_deg: float
    tokens: dict[str, frozenset[str]]
    body_part_deny: frozenset[str] = frozenset()
    adc_content: AdcContent = AdcContent()
    source: str = ""


@dataclass
class Selection:
    """The outcome: one `SeriesChoice` per series, and the series (or sub-series) per role."""

    choices: list[SeriesChoice]
    roles: dict[SeriesRole, SeriesInfo]
    features: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def missing_roles(self) -> list[SeriesRole]:
        return [r for r in (SeriesRole.T2W, SeriesRole.ADC, SeriesRole.HBV) if r not in self.roles]


# --- rules ------------------------------------------------------------------------------------


def load_rules(path: Path | None = None) -> SelectionRules:
    """Parse and validate a rules file (default: the packaged `selection_rules.json`)."""
    path = Path(path) if path is not None else DEFAULT_RULES
    try:
        data = json.loads(path.read_text())
        roles: dict[SeriesRole, RoleRule] = {}
        for name, spec in data["roles"].items():
            role = SeriesRole(name)
            conditions = []
            for c in spec["require"]:
                if c["op"] not in _OPS:
                    raise ValueError(f"unknown op {c['op']!r} (use one of {sorted(_OPS)})")
                if c.get("missing", "fail") not in {"pass", "fail"}:
                    raise ValueError(f"missing must be 'pass' or 'fail', got {c['missing']!r}")
                conditions.append(
                    Condition(c["feature"], c["op"], c["value"], c["why"], c.get("missing", "fail"))
                )
            rank = []
            for k in spec["rank"]:
                if k["order"] not in {"asc", "desc"}:
                    raise ValueError(f"rank order must be 'asc' or 'desc', got {k['order']!r}")
                rank.append(RankKey(k["feature"], k["order"] == "desc"))
            patterns = tuple(spec.get("description_patterns", ()))
            for p in patterns:
                re.compile(p)
            roles[role] = RoleRule(role, tuple(conditions), tuple(rank), patterns)
        order = tuple(SeriesRole(r) for r in data["role_order"])
        if set(order) != set(roles):
            raise ValueError("role_order must name every role in 'roles' exactly once")
        tokens = {k: frozenset(v) for k, v in data["image_type_tokens"].items()}
        for needed in (
            "diffusion",
            "adc",
            "trace",
            "not_trace",
            "computed_b",
            "localizer",
            "projection",
        ):
            tokens.setdefault(needed, frozenset())
        adc = data.get("adc_content", {})
        adc_content = AdcContent(
            units=frozenset(_unit_key(u) for u in adc.get("units", [])),
            median_range=_range(adc.get("pixel_median_range", (300.0, 3000.0))),
            p99_range=_range(adc.get("pixel_p99_range", (1000.0, 6000.0))),
        )
        return SelectionRules(
            roles=roles,
            role_order=order,
            max_oblique_deg=float(data["orientation"]["max_oblique_deg"]),
            tokens=tokens,
            body_part_deny=frozenset(
                normalise_body_part(v) for v in data.get("body_part", {}).get("deny", [])
            ),
            adc_content=adc_content,
            source=str(path),
        )
    except (OSError, ValueError, KeyError, TypeError, re.error) as exc:
        raise ConfigError(
            f"series selection rules {path} are invalid ({type(exc).__name__}: {exc})"
        ) from exc


def _range(value: Any) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not low < high:
        raise ValueError(f"range must be [low, high] with low < high, got {value!r}")
    return low, high


def _unit_key(unit: str) -> str:
    return "".join(str(unit).split()).lower().replace("^", "").replace("µ", "u")


# --- body part --------------------------------------------------------------------------------


def normalise_body_part(value: Any) -> str:
    """Body Part Examined as compared with the rules: upper case, no spaces."""
    return "".join(str(value or "").split()).upper()


def wrong_body_part(parts: Iterable[Any], rules: SelectionRules) -> list[str] | None:
    """The rules' body-part policy, the one place it is applied (study check and the node's
    early ``not_applicable``): the MR series' Body Part Examined values when *every* one names
    a body part on the deny list, else None. Absent values and PROSTATE/PELVIS/ABDOMEN pass."""
    normalised = [normalise_body_part(p) for p in parts]
    if normalised and all(p and p in rules.body_part_deny for p in normalised):
        return sorted(set(normalised))
    return None


# --- features ---------------------------------------------------------------------------------


def _header_units(h: Dataset) -> set[str]:
    """Units the header gives the pixel values: Real World Value Mapping units (code value and
    meaning, LUT Label) and Rescale Type."""
    units: set[str] = set()
    for item in h.get("RealWorldValueMappingSequence") or ():
        for code in item.get("MeasurementUnitsCodeSequence") or ():
            units |= {str(code.get("CodeValue", "")), str(code.get("CodeMeaning", ""))}
        units.add(str(item.get("LUTLabel", "")))
    units.add(str(h.get("RescaleType", "")))
    return {_unit_key(u) for u in units if u}


def _adc_like_pixels(series: SeriesInfo, content: AdcContent) -> bool | None:
    """Whether the middle image's non-zero pixel values lie in the ADC range; None when the
    pixels cannot be read."""
    import pydicom

    instances = series.instances
    if not instances:
        return None
    try:
        ds = pydicom.dcmread(instances[len(instances) // 2].path)
        array = np.asarray(ds.pixel_array, dtype=float)
    except Exception:  # unreadable pixels: the header decides
        return None
    array = array * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    values = array[array > 0]
    if values.size < 100:
        return None
    median, p99 = np.percentile(values, [50, 99])
    lo, hi = content.median_range
    lo99, hi99 = content.p99_range
    return bool(lo <= median <= hi and lo99 <= p99 <= hi99)


def _adc_evidence(
    series: SeriesInfo, image_type: set[str], has_b_value: bool, rules: SelectionRules
) -> str | None:
    """Why this series is an ADC map (ImageType, units or pixel range), or None."""
    tokens = rules.tokens
    if image_type & tokens["adc"]:
        return "ImageType ADC"
    if _header_units(series.headers) & rules.adc_content.units:
        return "diffusivity units"
    ambiguous = (
        "DERIVED" in image_type
        and (has_b_value or bool(image_type & tokens["diffusion"]))
        and not image_type & (tokens["trace"] | tokens["computed_b"] | tokens["not_trace"])
    )
    if ambiguous and _adc_like_pixels(series, rules.adc_content):
        return "pixel values in the ADC range"
    return None


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    """First item of a functional-group macro (shared, else the first frame's)."""
    for seq_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_kw)
        if seq and keyword in seq[0] and len(seq[0][keyword].value):
            return seq[0][keyword].value[0]
    return None


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _seconds(tm: str) -> float | None:
    """DICOM TM (or the time part of a DT) as seconds since midnight."""
    tm = tm.strip()
    if len(tm) >= 14 and tm[:8].isdigit():  # DT: YYYYMMDDHHMMSS...
        tm = tm[8:]
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?", tm)
    if not m:
        return None
    h, mi, s = int(m[1]), int(m[2] or 0), int(m[3] or 0)
    return h * 3600 + mi * 60 + s + float(m[4] or 0)


def _orientation(series: SeriesInfo, max_oblique_deg: float) -> tuple[str, float | None]:
    cosines = [f.image_orientation for _, f in series.frames if f.image_orientation]
    if not cosines:
        return "unknown", None
    arr = np.asarray(cosines, dtype=float)
    if np.abs(arr - arr[0]).max() > 1e-3:
        return "mixed", None
    normal = np.cross(arr[0, :3], arr[0, 3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return "unknown", None
    normal = np.abs(normal / norm)
    axis = int(np.argmax(normal))
    angle = math.degrees(math.acos(min(1.0, float(normal[axis]))))
    if angle > max_oblique_deg:
        return "oblique", angle
    return ("sagittal", "coronal", "axial")[axis], angle


def series_features(series: SeriesInfo, rules: SelectionRules) -> dict[str, Any]:
    """The DICOM-content features the rules refer to, for one series or b-value sub-series."""
    h = series.headers
    image_type = {t for inst in series.instances for t in inst.image_type} | set(series.image_type)
    frame_type_item = _first_item(h, "MRImageFrameTypeSequence")
    if frame_type_item is not None:
        image_type |= {str(v).upper() for v in (frame_type_item.get("FrameType") or ())}
    tokens = rules.tokens
    b_values = series.b_values
    b_value = series.b_value
    if b_value is None and b_values:
        b_value = max(b_values)
    acquisition_contrast = str(h.get("AcquisitionContrast") or "").upper()
    is_diffusion = bool(image_type & tokens["diffusion"]) or bool(b_values and max(b_values) > 0)
    is_diffusion = is_diffusion or acquisition_contrast == "DIFFUSION"
    adc_evidence = _adc_evidence(series, image_type, bool(b_values), rules)
    is_adc = adc_evidence is not None
    is_diffusion = is_diffusion or is_adc
    orientation, obliquity = _orientation(series, rules.max_oblique_deg)

    frames = series.frames
    positions = [f.image_position for _, f in frames if f.image_position]
    n_slices = len(frames)
    if positions and orientation not in {"mixed", "unknown"}:
        o = np.asarray(frames[0][1].image_orientation, dtype=float)
        normal = np.cross(o[:3], o[3:])
        distances = np.round(np.asarray(positions, dtype=float) @ normal, 1)
        n_slices = len(np.unique(distances))
    volumes_per_position = round(len(frames) / n_slices, 2) if n_slices else None

    echo_time = _number(h.get("EchoTime"))
    if echo_time is None and (item := _first_item(h, "MREchoSequence")) is not None:
        echo_time = _number(item.get("EffectiveEchoTime"))
    repetition = _number(h.get("RepetitionTime"))
    if repetition is None and (item := _first_item(h, "MRTimingAndRelatedParametersSequence")):
        repetition = _number(item.get("RepetitionTime"))
    scanning = [str(v).upper() for v in (h.get("ScanningSequence") or [])]
    if isinstance(h.get("ScanningSequence"), str):
        scanning = [str(h.ScanningSequence).upper()]
    pulse = str(h.get("EchoPulseSequence") or "").upper()  # Enhanced MR: SPIN|GRADIENT|BOTH
    if not scanning and pulse:
        scanning = {"SPIN": ["SE"], "GRADIENT": ["GR"], "BOTH": ["SE", "GR"]}.get(pulse, [])
    temporal = {f.temporal_position for _, f in frames if f.temporal_position is not None}
    n_temporal = _number(h.get("NumberOfTemporalPositions"))
    spacing = frames[0][1].pixel_spacing if frames and frames[0][1].pixel_spacing else None
    times = [_seconds(i.acquisition_time) for i in series.instances if i.acquisition_time]
    times_s = [t for t in times if t is not None]
    description = series.series_description.lower()
    body_part = str(h.get("BodyPartExamined") or "").upper()
    return {
        "modality": series.modality.upper(),
        "image_type": sorted(image_type),
        "is_adc": is_adc,
        "adc_evidence": adc_evidence,
        "is_diffusion": is_diffusion,
        # an ADC map is never the trace-weighted image, whatever b-value its header carries
        "is_trace": is_diffusion and not is_adc and not (image_type & tokens["not_trace"]),
        "is_computed_b": bool(image_type & tokens["computed_b"]),
        "is_localizer": bool(image_type & tokens["localizer"]) or orientation == "mixed",
        "is_projection": bool(image_type & tokens["projection"]),
        "b_values": b_values,
        "b_value": b_value,
        "b_value_at_least_1400": None if b_value is None else b_value >= 1400,
        "orientation": orientation,
        "obliquity_deg": None if obliquity is None else round(obliquity, 1),
        "n_slices": n_slices,
        "n_frames": len(frames),
        "volumes_per_position": volumes_per_position,
        "echo_time_ms": echo_time,
        "repetition_time_ms": repetition,
        "scanning_sequence": scanning or None,
        "temporal_positions": max(len(temporal), int(n_temporal or 0)) or None,
        "contrast_agent": bool(str(h.get("ContrastBolusAgent") or "").strip()),
        "pixel_spacing_mm": None if spacing is None else round(min(spacing), 3),
        "acquisition_time_s": max(times_s) if times_s else None,
        "series_number": series.series_number,
        "body_part": body_part or None,
        "description": description,
    }


def _description_score(description: str, patterns: tuple[str, ...]) -> int:
    return sum(1 for p in patterns if re.search(p, description))


def _rank_tuple(features: dict[str, Any], keys: tuple[RankKey, ...]) -> tuple[Any, ...]:
    """Sort key: smaller sorts first. Missing values sort last in either order."""
    out: list[Any] = []
    for k in keys:
        v = features.get(k.feature)
        if isinstance(v, bool):
            v = int(v)
        if v is None:
            out.append((1, 0.0))
        else:
            out.append((0, -float(v) if k.descending else float(v)))
    return tuple(out)


# --- selection --------------------------------------------------------------------------------


@dataclass
class _Candidate:
    series: SeriesInfo
    features: dict[str, Any]

    @property
    def label(self) -> str:
        b = f" b={self.series.b_value:g}" if self.series.b_value is not None else ""
        return f"series {self.series.series_number}{b}"


def _candidates(series: SeriesInfo, rules: SelectionRules) -> list[_Candidate]:
    """The series itself, plus one sub-series per b-value when a DWI series holds several."""
    whole = _Candidate(series, series_features(series, rules))
    out = [whole]
    if len(series.b_values) > 1:
        for b in series.b_values:
            sub = series.with_b_value(b)
            out.append(_Candidate(sub, series_features(sub, rules)))
    return out


def _failures(rule: RoleRule, features: dict[str, Any]) -> list[Condition]:
    return [c for c in rule.require if not c.check(features)]


def _describe(c: Condition, features: dict[str, Any]) -> str:
    actual = features.get(c.feature)
    if c.feature in {"orientation"}:
        return f"{c.why} ({actual})"
    if actual is None:
        return f"{c.why} ({c.feature} absent)"
    if isinstance(actual, bool):
        return c.why
    return f"{c.why} ({c.feature}={actual})"


def _summary(role: SeriesRole, f: dict[str, Any]) -> str:
    parts = [f"{f['orientation']}"]
    if f.get("obliquity_deg"):
        parts[0] += f" ({f['obliquity_deg']:g} deg oblique)"
    parts.append(f"{f['n_slices']} slices")
    if role is SeriesRole.T2W:
        if f.get("echo_time_ms") is not None:
            parts.append(f"TE {f['echo_time_ms']:g} ms")
        if f.get("scanning_sequence"):
            parts.append("/".join(f["scanning_sequence"]))
    if role is SeriesRole.ADC:
        parts.append(f.get("adc_evidence") or "ImageType ADC")
    if role is SeriesRole.HBV:
        parts.append(f"b={f['b_value']:g}" + (" (computed)" if f["is_computed_b"] else ""))
    return ", ".join(parts)


def select_series(scan: StudyScan, rules: SelectionRules | None = None) -> Selection:
    """Apply the rules: every series gets a role (t2w/adc/hbv/other) and a reason."""
    rules = rules or load_rules()
    per_series = [_candidates(s, rules) for s in scan.series]
    for cands in per_series:
        for c in cands:
            c.features["description_score"] = 0
    roles: dict[SeriesRole, SeriesInfo] = {}
    chosen_reason: dict[str, tuple[SeriesRole, str, _Candidate]] = {}
    notes: dict[str, list[str]] = {s.series_instance_uid: [] for s in scan.series}
    taken: set[str] = set()

    for role in rules.role_order:
        rule = rules.roles[role]
        eligible: list[_Candidate] = []
        for cands in per_series:
            uid = cands[0].series.series_instance_uid
            if uid in taken:
                continue
            # A multi-b-value series competes through its sub-series for hbv.
            pool = cands[1:] if role is SeriesRole.HBV and len(cands) > 1 else cands[:1]
            passed = []
            for c in pool:
                f = dict(c.features)
                f["description_score"] = _description_score(
                    c.series.series_description.lower(), rule.description_patterns
                )
                c.features["description_score"] = f["description_score"]
                failed = _failures(rule, f)
                if failed:
                    notes[uid].append(f"not {role.value}: {_describe(failed[0], f)}")
                else:
                    passed.append(c)
            eligible.extend(passed)
        if not eligible:
            continue
        eligible.sort(key=lambda c: _rank_tuple(c.features, rule.rank))
        best = eligible[0]
        uid = best.series.series_instance_uid
        roles[role] = best.series
        taken.add(uid)
        why = f"{role.value}: {_summary(role, best.features)}"
        others = [c for c in eligible[1:] if c.series.series_instance_uid != uid]
        if others:
            deciding = _deciding_key(best, others[0], rule.rank)
            why += f"; preferred over {', '.join(o.label for o in others)}"
            if deciding:
                why += f" ({deciding})"
        chosen_reason[uid] = (role, why, best)
        for o in others:
            notes[o.series.series_instance_uid].append(
                f"{role.value} candidate, but {best.label} preferred"
                + (f" ({deciding})" if deciding else "")
            )

    choices: list[SeriesChoice] = []
    features_out: dict[str, list[dict[str, Any]]] = {}
    for s, cands in zip(scan.series, per_series, strict=True):
        uid = s.series_instance_uid
        features_out[uid] = [c.features for c in cands]
        if uid in chosen_reason:
            role, reason, best = chosen_reason[uid]
            details = {k: best.features[k] for k in ("b_value", "b_values", "n_slices")}
        else:
            role = SeriesRole.OTHER
            candidate_notes = [n for n in notes[uid] if "candidate" in n]
            relevant = ("adc", "hbv") if cands[0].features["is_diffusion"] else ("t2w",)
            failed_notes = [n for n in notes[uid] if n.split(":")[0][4:] in relevant]
            shown = candidate_notes or _dedupe(failed_notes or notes[uid])[:2]
            reason = "other: " + "; ".join(shown)
            if len(s.b_values) > 1:
                reason += f" (b-values {'/'.join(f'{b:g}' for b in s.b_values)})"
            details = {"b_values": cands[0].features["b_values"]}
        choices.append(
            SeriesChoice(
                series_instance_uid=uid,
                series_number=s.series_number,
                series_description=s.series_description,
                role=role,
                reason=reason,
                instances=len(s.instances),
                details=details,
            )
        )
    return Selection(choices=choices, roles=roles, features=features_out)


def _dedupe(items: list[str]) -> list[str]:
    seen: list[str] = []
    for i in items:
        if i not in seen:
            seen.append(i)
    return seen


def _deciding_key(best: _Candidate, other: _Candidate, keys: tuple[RankKey, ...]) -> str:
    for k in keys:
        a, b = best.features.get(k.feature), other.features.get(k.feature)
        if a != b:
            word = {
                "acquisition_time_s": "later acquisition",
                "pixel_spacing_mm": "finer pixel spacing",
                "n_slices": "more slices",
                "b_value": "higher b-value",
                "b_value_at_least_1400": "b-value >= 1400",
                "description_score": "SeriesDescription tie-break",
                "series_number": "higher SeriesNumber tie-break",
            }.get(k.feature, k.feature)
            return word
    return ""


def series_geometrically_complete(series: SeriesInfo) -> bool:
    """True when the series' headers form whole regular volume(s): one per b-value for a
    multi-b-value DWI series; slice count equal to ImagesInAcquisition where it is recorded.

    Used by the DICOM node to decide that a study is complete before its quiet period ends.
    """
    parts = (
        [series.with_b_value(b) for b in series.b_values] if len(series.b_values) > 1 else [series]
    )
    try:
        for part in parts:
            series_geometry(part)
    except RadtriageError:
        return False
    return True
