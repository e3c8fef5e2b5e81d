"""Frozen domain types shared by every package.

Geometry follows ITK/SimpleITK conventions throughout, so a `Volume` compares directly with an MHA
file read by SimpleITK:

- `array` is indexed ``[z, y, x]`` (what ``sitk.GetArrayFromImage`` returns);
- `spacing`, `origin` and `size` are in ``(x, y, z)`` order, millimetres, LPS patient coordinates;
- `direction` is the row-major 3x3 matrix whose *columns* are the unit vectors of the x, y and z
  voxel axes in LPS: ``point = origin + direction @ (spacing * index_xyz)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class SeriesRole(StrEnum):
    """What a series is used for by the models."""

    T2W = "t2w"
    ADC = "adc"
    HBV = "hbv"
    OTHER = "other"


REQUIRED_ROLES: tuple[SeriesRole, ...] = (SeriesRole.T2W, SeriesRole.ADC, SeriesRole.HBV)


class Priority(StrEnum):
    """Waiting-list priority flag carried by every result."""

    URGENT = "urgent"
    SOON = "soon"
    ROUTINE = "routine"
    NOT_ANALYSED = "not_analysed"

    @property
    def rank(self) -> int:
        """Worklist order, lowest first. A study the AI could not analyse has unknown risk and
        must be read by a person, so it sorts straight after `urgent`."""
        return _PRIORITY_RANK[self]

    @property
    def severity(self) -> int:
        """How urgent the flag is, for "at least" rules (routine 0 < soon 1 < urgent 2);
        `not_analysed` has no severity of its own (-1): floors apply to its rank instead."""
        return _SEVERITY.get(self, -1)


#: The one urgency ranking (worklist order, lowest first). Every other ordering derives from it.
_PRIORITY_RANK = {
    Priority.URGENT: 0,
    Priority.NOT_ANALYSED: 1,
    Priority.SOON: 2,
    Priority.ROUTINE: 3,
}
_SEVERITY = {Priority.ROUTINE: 0, Priority.SOON: 1, Priority.URGENT: 2}


def most_urgent(a: Priority, b: Priority) -> Priority:
    """The more urgent of two analysed flags (by `Priority.severity`)."""
    return a if a.severity >= b.severity else b


class StudyStatus(StrEnum):
    """Job state of a study (persistent state machine in `dicom_node`)."""

    RECEIVED = "received"
    COMPLETE = "complete"
    ANALYSING = "analysing"
    REPORTED = "reported"
    SENT = "sent"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"


class ReferralUrgency(StrEnum):
    """The referrer's own urgency. AI may raise a study above it, never below it.

    From DICOM Requested Procedure Priority (0040,1003): STAT/HIGH -> urgent, MEDIUM -> soon,
    ROUTINE/LOW/absent -> routine. From an HL7 v2 order (ORC-7.6 / TQ1-9): S (stat) -> urgent,
    A (asap) -> soon, R (routine) -> routine. From FHIR ServiceRequest.priority (ordered routine <
    urgent < asap < stat): stat -> urgent, asap and urgent -> soon, routine -> routine.
    """

    URGENT = "urgent"
    SOON = "soon"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        """Order rank, lowest first: the rank of the `Priority` this urgency is a floor of."""
        return self.floor.rank

    @property
    def floor(self) -> Priority:
        """The flag this referral guarantees at least."""
        return Priority(self.value)

    @classmethod
    def from_dicom(cls, value: str | None) -> ReferralUrgency:
        v = (value or "").strip().upper()
        if v in {"STAT", "HIGH"}:
            return cls.URGENT
        if v == "MEDIUM":
            return cls.SOON
        return cls.ROUTINE

    @classmethod
    def from_hl7(cls, value: str | None) -> ReferralUrgency:
        """HL7 v2 Priority (table 0027: S, A, R, P, C, T, PRN); unknown or absent -> routine."""
        v = (value or "").strip().upper()
        if v == "S":
            return cls.URGENT
        if v == "A":
            return cls.SOON
        return cls.ROUTINE

    @classmethod
    def from_fhir(cls, value: str | None) -> ReferralUrgency:
        """FHIR request-priority (routine | urgent | asap | stat)."""
        v = (value or "").strip().lower()
        if v == "stat":
            return cls.URGENT
        if v in {"asap", "urgent"}:
            return cls.SOON
        return cls.ROUTINE


def _as_triple(name: str, value: Any) -> tuple[float, float, float]:
    t = tuple(float(v) for v in value)
    if len(t) != 3 or not all(math.isfinite(v) for v in t):
        raise ValueError(f"{name} must be 3 finite numbers, got {value!r}")
    return (t[0], t[1], t[2])


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image with its patient-space geometry (see the module docstring for conventions)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    series_instance_uid: str = ""
    frame_of_reference_uid: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.array, np.ndarray) or self.array.ndim != 3:
            raise TypeError("array must be a 3D numpy array indexed [z, y, x]")
        spacing = _as_triple("spacing", self.spacing)
        if min(spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing}")
        origin = _as_triple("origin", self.origin)
        direction = tuple(float(v) for v in self.direction)
        if len(direction) != 9:
            raise ValueError(f"direction must have 9 values, got {len(direction)}")
        d = np.asarray(direction).reshape(3, 3)
        if not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
            raise ValueError(f"direction must be orthonormal, got {direction}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    @property
    def size(self) -> tuple[int, int, int]:
        """Voxel counts in (x, y, z) order."""
        z, y, x = self.array.shape
        return (x, y, z)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def affine(self) -> np.ndarray:
        """4x4 matrix mapping a homogeneous (x, y, z, 1) voxel index to LPS millimetres."""
        a = np.eye(4)
        a[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        a[:3, 3] = self.origin
        return a

    def index_to_lps(self, index_xyz: Any) -> np.ndarray:
        """Continuous voxel index/indices (..., 3) in (x, y, z) order -> LPS millimetres."""
        idx = np.asarray(index_xyz, dtype=float)
        return idx @ (self.direction_matrix @ np.diag(self.spacing)).T + np.asarray(self.origin)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def with_array(self, array: np.ndarray) -> Volume:
        """Same geometry, other voxels (e.g. a mask or likelihood map on this grid)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from {self.array.shape}")
        return Volume(
            array,
            self.spacing,
            self.origin,
            self.direction,
            self.series_instance_uid,
            self.frame_of_reference_uid,
        )

    def geometry(self) -> dict[str, list[float] | list[int]]:
        """The `inspect --json` geometry object: size, spacing, origin, direction."""
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }


@dataclass(frozen=True)
class Lesion:
    """One AI lesion candidate. `category` is the AI's own category, never a PI-RADS score."""

    likelihood: float
    volume_ml: float
    centroid_mm: tuple[float, float, float]
    sector: str | None = None
    category: str = "ai_suspicious"
    label: int = 0  # value of this lesion in `Prediction.lesion_labels`

    def __post_init__(self) -> None:
        if not 0.0 <= self.likelihood <= 1.0:
            raise ValueError(f"likelihood must be in [0, 1], got {self.likelihood}")
        if self.volume_ml < 0:
            raise ValueError(f"volume_ml must be >= 0, got {self.volume_ml}")
        object.__setattr__(self, "centroid_mm", _as_triple("centroid_mm", self.centroid_mm))


#: What a model's out-of-distribution gate said about a study it analysed: within its validated
#: domain, near its edge (`low_confidence`), or nothing because the model has no fitted gate.
#: (A study outside the domain is not analysed: `outside_validated_domain`.)
DomainGate = Literal["in_domain", "low_confidence", "not_fitted"]
DOMAIN_GATES: tuple[DomainGate, ...] = ("in_domain", "low_confidence", "not_fitted")


@dataclass(frozen=True, eq=False)
class Prediction:
    """What the models say about one study, on the T2W grid."""

    case_likelihood: float
    lesions: tuple[Lesion, ...] = ()
    gland_volume_ml: float | None = None
    likelihood_map: Volume | None = None  # float32 0..1 on the T2W grid
    lesion_labels: Volume | None = None  # uint8/int labels on the T2W grid, 0 = background
    gland_mask: Volume | None = None  # uint8 0/1 on the T2W grid

    def __post_init__(self) -> None:
        if not 0.0 <= self.case_likelihood <= 1.0:
            raise ValueError(f"case_likelihood must be in [0, 1], got {self.case_likelihood}")

    @property
    def low_confidence(self) -> bool:
        """Whether the model's domain gate found the study near the edge of what the model was
        validated on (a prediction with a gate answer overrides this)."""
        return False

    @property
    def domain_gate(self) -> DomainGate:
        """What the model's domain gate said; a prediction without a gate answer was not
        checked (a prediction with one overrides this)."""
        return "not_fitted"

    @property
    def domain_gate_note(self) -> str | None:
        """Why a fitted gate did not apply (e.g. fitted with another gland model), if so."""
        return None


@dataclass(frozen=True)
class ModelRef:
    """Identity of a model version as recorded in results and SRs."""

    name: str
    version: str
    sha256: str
    clinical_use: bool = False  # False for demo models trained on synthetic data
    intended_use: str = ""
    digest: str = ""  # the version's sealed digest (metadata + every file), "" when unknown

    @property
    def disclaimer(self) -> str | None:
        if self.clinical_use:
            return None
        return "NOT FOR CLINICAL USE: demonstration model trained on synthetic data."


# --- result.json contract (DESIGN.md) -------------------------------------------------------


class LesionResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    likelihood: float = Field(ge=0.0, le=1.0)
    volume_ml: float = Field(ge=0.0)
    centroid_mm: tuple[float, float, float]
    sector: str | None = None
    category: str

    @classmethod
    def from_lesion(cls, lesion: Lesion) -> LesionResult:
        return cls(
            likelihood=lesion.likelihood,
            volume_ml=lesion.volume_ml,
            centroid_mm=lesion.centroid_mm,
            sector=lesion.sector,
            category=lesion.category,
        )


class ModelInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    sha256: str
    digest: str = Field(
        default="", description="the version's sealed digest: thresholds, calibration, gate, files"
    )


class TriageResult(BaseModel):
    """The per-study result: `result.json` and `GET /api/studies/{uid}`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    study_instance_uid: str = Field(min_length=1)
    status: StudyStatus
    priority: Priority
    case_likelihood: float | None = Field(default=None, ge=0.0, le=1.0)
    lesions: tuple[LesionResult, ...] = ()
    gland_volume_ml: float | None = None
    psa_density: float | None = None
    model: ModelInfo | None = None  # the detector
    gland_model: ModelInfo | None = None  # the gland model (None in results before it was kept)
    series_used: dict[str, str] = Field(default_factory=dict)
    reason: dict[str, str] | None = None  # {"code", "message"} when not analysed
    timings_ms: dict[str, float] = Field(default_factory=dict)
    analysed_at: str | None = None  # ISO 8601 UTC, when the analysis finished
    disclaimer: str | None = None
    # The priority policy's other inputs and what it made of them (`core.priority`).
    referral_urgency: ReferralUrgency | None = None
    days_waited: int | None = None  # since the imaging request was issued
    priority_reasons: tuple[str, ...] = ()
    # worklist order, lowest first: the flag's rank, or a not-analysed study's referral or
    # waiting-time floor (`core.priority.PriorityDecision.rank`)
    priority_rank: int | None = None
    # What set the flag (`core.priority.Driver` values, the deciding one first), the flag in
    # words naming it, and the AI's own opinion, apart from the flag.
    priority_drivers: tuple[str, ...] = ()
    priority_headline: str | None = None
    ai_priority: Priority | None = None
    low_confidence: bool = False  # the model's domain gate: near the edge of its domain
    # the domain gate's state for an analysed study (None: not analysed, or a result written
    # before it was recorded); "not_fitted" says the model's domain was not checked
    domain_gate: DomainGate | None = None
    domain_gate_note: str | None = Field(
        default=None, description="why a fitted gate did not apply to this study (not_fitted)"
    )
    # The policy inputs with their sources (the decision record's inputs).
    referral_source: str | None = None  # order | dicom_request | none
    image_referral_urgency: ReferralUrgency | None = None  # what the images' request said
    request_date: str | None = None  # YYYYMMDD, the waiting-list clock's start
    request_date_source: str | None = None  # order | dicom_request | study_date | received
    request_date_note: str | None = None  # e.g. a future date clamped to today
    thresholds: dict[str, float] | None = None  # the operating points that made ai_priority
    override: dict[str, str] | None = None  # {"priority", "by", "reason"}: a radiologist's flag

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@dataclass(frozen=True)
class SeriesChoice:
    """Why a series got its role: the explainable output of series selection."""

    series_instance_uid: str
    series_number: int | None
    series_description: str
    role: SeriesRole
    reason: str
    instances: int
    score: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def cspca_label(case_cspca: str | None, case_isup: str | None) -> bool | None:
    """The one csPCa rule for marksheets (PI-CAI ``case_csPCa``/``case_ISUP`` columns): YES/NO
    when given, else ISUP grade group >= 2; None when neither is known (biopsy pending). An
    ISUP may be written as an integer or an integral decimal ("2", "2.0"); anything else, or a
    label other than YES/NO, is a ValueError naming the column."""
    label = (case_cspca or "").strip().upper()
    if label:
        if label not in ("YES", "NO"):
            raise ValueError(f"case_csPCa must be YES or NO, not {case_cspca!r}")
        return label == "YES"
    isup = (case_isup or "").strip()
    if not isup:
        return None
    try:
        value = float(isup)
    except ValueError:
        raise ValueError(f"case_ISUP must be a grade group 0-5, not {case_isup!r}") from None
    if not value.is_integer() or not 0 <= value <= 5:
        raise ValueError(f"case_ISUP must be a grade group 0-5, not {case_isup!r}")
    return int(value) >= 2
