"""Out-of-distribution gate: is this study like the ones the model was validated on?

Every prediction carries `DomainFeatures` (computed in `PipelineSteps.finish`, both engines):

- what the network sees: 5th/50th/95th percentiles of each normalised input channel inside the
  gland found on the model grid (zonal contrast and intensity profile after z-scoring);
- anatomy and acquisition: gland volume, the T2W voxel spacing, the slice-stack obliquity
  (angle between the T2W slice normal and the nearest patient axis);
- model uncertainty: mean voxel entropy of the gland model's softmax around the gland, and mean
  binary entropy of the detector's likelihood inside it.

`radtriage evaluate --write-thresholds` fits `OodGateSpec` on validation cases: features are
standardised (scales floored at `SCALE_FLOORS`, so a feature constant in validation, e.g. spacing,
still has a tolerance), a Ledoit-Wolf covariance gives a Mahalanobis distance, and the
low-confidence distance is the split-conformal (1 - alpha) quantile of distances on a second
split, so an in-distribution study is flagged with probability <= alpha (+ 1/(n+1)). A study
beyond `outside_distance` (= `outside_factor` x that) is outside the validated domain: the
pipeline raises `core.errors.OutsideValidatedDomainError` and the study is `not_analysed` with
reason `outside_validated_domain`. Between the two it is flagged low confidence, which may raise
the priority shown (never lower it). No `ood_gate` in metadata = no gate: the verdict is
"not_fitted" and every result, SR and ORU says the domain was not checked.

Declared pipelines (`declared_domain_features`: PI-CAI U-Net, TAPS, any `models import
--pipeline`) compute the same features from what their path has: the detector's normalised inputs
on its own grid inside the T2W gland mapped there, the T2W gland's volume, the T2W geometry, the
gland model's entropy (softmax entropy of a 3-channel model on its grid, binary entropy of a
one-channel sigmoid model on the T2W grid) and the detector's binary entropy inside the T2W
gland. A channel the detector does not take has no quantiles: those features are absent (never
zero-filled), and a gate fitted on such studies lists only the features it had.

The gland model is part of what the gate measures (gland entropy and volume, the region the
quantiles are taken in), so `OodGateSpec.gland_model` records the NAME:VERSION it was fitted
with. Run with another gland model the gate does not apply: the verdict is "not_fitted" with a
`reason` naming both (the study is analysed and every result says the domain was not checked;
refusing would drop the AI's opinion for a pairing choice, applying would pass studies on
another model's uncertainty). A gate without `gland_model` (fitted before it was recorded, on
the 0.2.0 shared-grid path) still applies to shared-grid pairs, as it always did, but never to a
declared pair: its features were computed another way, with another gland model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.domain import Volume

QUANTILES = (5, 50, 95)
CHANNELS = ("t2w", "adc", "hbv")
FEATURES: tuple[str, ...] = (
    *(f"{c}_q{q:02d}" for c in CHANNELS for q in QUANTILES),
    "gland_volume_ml",
    "t2w_spacing_x_mm",
    "t2w_spacing_y_mm",
    "t2w_spacing_z_mm",
    "obliquity_deg",
    "gland_entropy",
    "detector_entropy",
)
#: Smallest standard deviation assumed per feature (its units): what counts as "different".
SCALE_FLOORS: dict[str, float] = {
    **{f"{c}_q{q:02d}": 0.1 for c in CHANNELS for q in QUANTILES},
    "gland_volume_ml": 3.0,
    "t2w_spacing_x_mm": 0.05,
    "t2w_spacing_y_mm": 0.05,
    "t2w_spacing_z_mm": 0.2,
    "obliquity_deg": 2.0,
    "gland_entropy": 0.01,
    "detector_entropy": 0.005,
}
MIN_GLAND_VOXELS = 50
Verdict = Literal["in_domain", "low_confidence", "outside", "not_fitted"]


def obliquity_deg(direction: Sequence[float]) -> float:
    """Angle (degrees) between the slice normal (third direction column) and the nearest axis."""
    normal = np.asarray(direction, dtype=float).reshape(3, 3)[:, 2]
    norm = float(np.linalg.norm(normal)) or 1.0
    return math.degrees(math.acos(min(1.0, float(np.max(np.abs(normal))) / norm)))


def _entropy(p: np.ndarray, axis: int | None = None) -> np.ndarray:
    q = np.clip(p, 1e-7, 1.0)
    return -(q * np.log(q)).sum(axis=axis) if axis is not None else -(q * np.log(q))


def central_box(shape: Sequence[int]) -> np.ndarray:
    """The middle half of a (Z, Y, X) grid: where the features look when no gland was found."""
    box = np.zeros(tuple(shape), dtype=bool)
    z, y, x = box.shape
    box[z // 4 : z - z // 4, y // 4 : y - y // 4, x // 4 : x - x // 4] = True
    return box


def _channel_quantiles(
    image: np.ndarray, channels: Sequence[str], region: np.ndarray, *, absent_as_zero: bool
) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in CHANNELS:
        if c not in channels and not absent_as_zero:
            continue
        values = image[list(channels).index(c)][region] if c in channels else np.zeros(1)
        for q, v in zip(QUANTILES, np.percentile(values, QUANTILES), strict=True):
            out[f"{c}_q{q:02d}"] = float(v)
    return out


def _acquisition(reference: Volume) -> dict[str, float]:
    out = {f"t2w_spacing_{a}_mm": float(s) for a, s in zip("xyz", reference.spacing, strict=True)}
    out["obliquity_deg"] = obliquity_deg(reference.direction)
    return out


def softmax_entropy(gland_probabilities: np.ndarray) -> float:
    """Mean entropy of a (bg, PZ, TZ) softmax where PZ + TZ >= 0.05 (0 when nowhere)."""
    around = gland_probabilities[1:].sum(axis=0) >= 0.05
    return float(_entropy(gland_probabilities[:, around], axis=0).mean()) if around.any() else 0.0


def binary_entropy(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 0.0, 1.0)
    return _entropy(q) + _entropy(1.0 - q)


def sigmoid_entropy(gland_probability: np.ndarray) -> float:
    """Mean binary entropy of a one-channel gland probability where it is >= 0.05."""
    around = gland_probability >= 0.05
    return float(binary_entropy(gland_probability[around]).mean()) if around.any() else 0.0


def domain_features(
    image: np.ndarray,
    channels: Sequence[str],
    gland_probabilities: np.ndarray,
    zones_grid: np.ndarray,
    likelihood_grid: np.ndarray,
    reference: Volume,
    grid_spacing_xyz: Sequence[float],
) -> dict[str, float]:
    """The gate's features of one study (see module doc); arrays on the model grid."""
    gland = zones_grid > 0
    n_gland = int(gland.sum())
    if n_gland < MIN_GLAND_VOXELS:  # no plausible gland: describe the central box instead
        gland = central_box(gland.shape)
    out = _channel_quantiles(image, channels, gland, absent_as_zero=True)
    voxel_ml = float(np.prod(grid_spacing_xyz)) / 1000.0
    out["gland_volume_ml"] = n_gland * voxel_ml if n_gland >= MIN_GLAND_VOXELS else 0.0
    out.update(_acquisition(reference))
    out["gland_entropy"] = softmax_entropy(gland_probabilities)
    out["detector_entropy"] = float(binary_entropy(likelihood_grid[gland]).mean())
    return out


def declared_domain_features(
    detector_image: np.ndarray,
    detector_channels: Sequence[str],
    gland_on_detector_grid: np.ndarray,
    gland_t2w: np.ndarray,
    likelihood_t2w: np.ndarray,
    reference: Volume,
    gland_entropy: float,
) -> dict[str, float]:
    """The gate's features of one study on a declared pipeline (see module doc).

    `detector_image` is the detector's normalised (C, Z, Y, X) input, `gland_on_detector_grid`
    the T2W gland resampled onto that grid; `gland_t2w` and `likelihood_t2w` (the detector's
    map, before calibration) are on the T2W grid `reference`. Where no plausible gland was found
    (< `MIN_GLAND_VOXELS`) the central box of each grid stands in and the volume is 0.
    """
    on_grid = gland_on_detector_grid > 0
    if int(on_grid.sum()) < MIN_GLAND_VOXELS:
        on_grid = central_box(on_grid.shape)
    out = _channel_quantiles(detector_image, detector_channels, on_grid, absent_as_zero=False)
    gland = gland_t2w > 0
    n_gland = int(gland.sum())
    if n_gland < MIN_GLAND_VOXELS:
        gland = central_box(gland.shape)
    voxel_ml = float(np.prod(reference.spacing)) / 1000.0
    out["gland_volume_ml"] = n_gland * voxel_ml if n_gland >= MIN_GLAND_VOXELS else 0.0
    out.update(_acquisition(reference))
    out["gland_entropy"] = float(gland_entropy)
    out["detector_entropy"] = float(binary_entropy(likelihood_t2w[gland]).mean())
    return out


@dataclass(frozen=True)
class DomainCheck:
    """The gate's answer for one study."""

    verdict: Verdict
    distance: float | None  # Mahalanobis distance to the validation set (None: no gate)
    features: Mapping[str, float]
    furthest: tuple[tuple[str, float], ...] = ()  # (feature, standardised deviation), worst first
    reason: str | None = None  # why a fitted gate was not applied ("not_fitted" only)

    @property
    def low_confidence(self) -> bool:
        return self.verdict == "low_confidence"

    def describe(self) -> str:
        worst = ", ".join(f"{name} {z:+.1f} SD" for name, z in self.furthest[:3])
        d = "n/a" if self.distance is None else f"{self.distance:.1f}"
        text = f"distance {d} from the validation set (furthest: {worst or 'n/a'})"
        return f"{text}; {self.reason}" if self.reason else text


class OodGateSpec(BaseModel):
    """Gate thresholds in `metadata.json` (`ood_gate`), fitted by `radtriage evaluate`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    features: tuple[str, ...]
    location: tuple[float, ...]
    scale: tuple[float, ...]
    precision: tuple[tuple[float, ...], ...] = Field(
        description="inverse Ledoit-Wolf covariance of the standardised features"
    )
    low_confidence_distance: float = Field(gt=0)
    outside_distance: float = Field(gt=0)
    alpha: float = Field(gt=0, lt=1, description="target in-distribution low-confidence rate")
    validated_range: dict[str, tuple[float, float]] = Field(default_factory=dict)
    n_fit: int = Field(ge=1)
    n_threshold: int = Field(ge=1)
    source: str
    gland_model: str | None = Field(
        default=None,
        description="NAME:VERSION of the gland model the features were computed with; with "
        "another gland model the gate does not apply (verdict not_fitted). None: fitted before "
        "this was recorded, applies to any gland model",
    )

    @model_validator(mode="after")
    def _consistent(self) -> OodGateSpec:
        k = len(self.features)
        if len(self.location) != k or len(self.scale) != k or len(self.precision) != k:
            raise ValueError("ood_gate location/scale/precision must match its features")
        if any(len(row) != k for row in self.precision) or min(self.scale) <= 0:
            raise ValueError("ood_gate precision must be k x k and scales positive")
        if self.outside_distance < self.low_confidence_distance:
            raise ValueError("ood_gate outside_distance must be >= low_confidence_distance")
        return self

    def standardised(self, features: Mapping[str, float]) -> np.ndarray:
        missing = [f for f in self.features if f not in features]
        if missing:
            raise ValueError(f"features missing for the gate: {missing}")
        x = np.array([features[f] for f in self.features], dtype=float)
        return (x - np.asarray(self.location)) / np.asarray(self.scale)

    def distance(self, features: Mapping[str, float]) -> float:
        z = self.standardised(features)
        return float(math.sqrt(max(0.0, float(z @ np.asarray(self.precision) @ z))))

    def check(self, features: Mapping[str, float]) -> DomainCheck:
        z = self.standardised(features)
        if not np.isfinite(z).all():
            return DomainCheck("outside", math.inf, dict(features), ())
        d = self.distance(features)
        order = np.argsort(-np.abs(z))
        furthest = tuple((self.features[i], float(z[i])) for i in order[:5])
        verdict: Verdict = (
            "outside"
            if d > self.outside_distance
            else "low_confidence"
            if d > self.low_confidence_distance
            else "in_domain"
        )
        return DomainCheck(verdict, d, dict(features), furthest)


def unchecked(features: Mapping[str, float], reason: str | None = None) -> DomainCheck:
    """The answer of a model without a fitted gate (or one that does not apply, `reason`): not
    checked ("not_fitted"), never "in_domain" by assumption; every result says so."""
    return DomainCheck("not_fitted", None, dict(features), (), reason)


def not_applicable(
    spec: OodGateSpec,
    features: Mapping[str, float],
    gland_model: str | None,
    *,
    declared: bool = False,
) -> str | None:
    """Why `spec` cannot judge this study (None: it can): fitted with another gland model than
    `gland_model` (NAME:VERSION), fitted without recording one while the pair is `declared`, or
    on features this pipeline does not compute."""
    if spec.gland_model is None and declared:
        return (
            "the gate was fitted on the shared-grid path before its gland model was recorded; "
            "it does not apply to this declared pair: fit one with radtriage evaluate "
            "--write-thresholds"
        )
    if spec.gland_model is not None and gland_model is not None and spec.gland_model != gland_model:
        return (
            f"the gate was fitted with gland model {spec.gland_model}, this study ran with "
            f"{gland_model}; fit one for this pair with radtriage evaluate --write-thresholds"
        )
    missing = [f for f in spec.features if f not in features]
    if missing:
        return f"the gate needs features this pipeline does not compute: {missing}"
    return None


def fit_ood_gate(
    fit: Sequence[Mapping[str, float]],
    threshold: Sequence[Mapping[str, float]],
    *,
    alpha: float = 0.02,
    outside_factor: float = 2.0,
    source: str,
    features: Sequence[str] = FEATURES,
    gland_model: str | None = None,
) -> OodGateSpec:
    """Fit the gate on `fit` cases and set its distance thresholds on `threshold` cases (split
    conformal: the ceil((n + 1)(1 - alpha))-th smallest distance, or the largest when n is
    too small for alpha)."""
    from sklearn.covariance import LedoitWolf

    if len(fit) < 5 or len(threshold) < 5:
        raise ValueError("the gate needs >= 5 cases to fit and >= 5 to set thresholds")
    if not 0 < alpha < 1 or outside_factor < 1:
        raise ValueError("alpha must be in (0, 1) and outside_factor >= 1")
    names = tuple(features)
    x = np.array([[f[n] for n in names] for f in fit], dtype=float)
    location = x.mean(axis=0)
    floors = np.array([SCALE_FLOORS.get(n, 1e-3) for n in names])
    scale = np.maximum(x.std(axis=0, ddof=1), floors)
    precision = np.linalg.pinv(LedoitWolf().fit((x - location) / scale).covariance_)
    spec = OodGateSpec(
        features=names,
        location=tuple(location.tolist()),
        scale=tuple(scale.tolist()),
        precision=tuple(tuple(row) for row in precision.tolist()),
        low_confidence_distance=1.0,
        outside_distance=1.0,
        alpha=alpha,
        validated_range={
            n: (float(x[:, i].min()), float(x[:, i].max())) for i, n in enumerate(names)
        },
        n_fit=len(fit),
        n_threshold=len(threshold),
        source=source,
        gland_model=gland_model,
    )
    d = np.sort([spec.distance(f) for f in threshold])
    k = math.ceil((d.size + 1) * (1 - alpha))
    low = float(d[min(k, d.size) - 1])
    low = max(low, 1e-3)
    return spec.model_copy(
        update={"low_confidence_distance": low, "outside_distance": outside_factor * low}
    )
