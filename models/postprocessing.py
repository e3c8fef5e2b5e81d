"""Pure post-processing: model outputs -> gland/zones, lesion candidates, case likelihood.

Choices (documented in the model card and DESIGN notes):
- Gland = PZ + TZ of the gland model's arg-max, largest connected component, on the model grid;
  on the T2W grid, PZ/TZ probabilities (around that component) are resampled linearly and the
  gland is where PZ + TZ >= 0.5 (smoother than nearest-neighbour labels: Dice +0.01).
- The gland is the detector's region of interest: likelihood farther than `gland_margin_mm`
  outside it is set to 0 (only when a plausible gland, >= `MIN_GLAND_ML`, was found; otherwise
  the map is kept as is, so a failed gland model can never silence the detector).
- Case likelihood = max of the (gated) likelihood map on the model grid (PI-CAI convention).
- Lesion candidates: connected components of likelihood >= `detection_threshold` on the T2W grid;
  likelihood = max inside the component, volume = voxel count x voxel volume, centroid = mean voxel
  position in LPS mm. Sector = side (patient left/right), level (base/mid/apex by thirds of the
  gland's superior-inferior extent) and zone (PZ/TZ by majority, + a/p half), e.g. "left mid PZp".
- Lesion category from the model's case thresholds: >= urgent "ai_high", >= soon
  "ai_intermediate", else "ai_low". Never a PI-RADS score.
- Calibration (metadata `calibration`, models/calibration.py) maps the raw case likelihood and
  each lesion's peak likelihood (monotone, so the case is still the max over its lesions) to the
  calibrated scale the thresholds are on; voxel maps and `detection_threshold` stay raw.
- The out-of-distribution gate (metadata `ood_gate`, models/ood_gate.py) checks each study:
  outside the validated domain raises `OutsideValidatedDomainError` (-> `not_analysed`); a
  low-confidence verdict travels in `CalibratedPrediction.domain`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from core.domain import DOMAIN_GATES, DomainGate, Lesion, Prediction, Priority, Volume
from core.errors import OutsideValidatedDomainError
from core.priority import Thresholds
from models.calibration import CalibrationSpec, calibrate
from models.metadata import PostprocessingSpec
from models.ood_gate import DomainCheck, OodGateSpec, not_applicable, unchecked

MIN_GLAND_ML = 5.0
ZONE_NAMES = {1: "PZ", 2: "TZ", 3: "WG"}
#: Zone value of a whole-gland model's mask (no PZ/TZ split): sectors then say "WG".
WHOLE_GLAND = 3
#: The least priority a low-confidence study is shown with (it may raise, never lower).
LOW_CONFIDENCE_FLOOR = Priority.SOON


@dataclass(frozen=True)
class CalibratedPrediction(Prediction):
    """A `Prediction` (case likelihood calibrated) with the raw score and the gate's answer."""

    raw_case_likelihood: float | None = None
    domain: DomainCheck | None = None

    @property
    def low_confidence(self) -> bool:
        return self.domain is not None and self.domain.low_confidence

    @property
    def domain_gate(self) -> DomainGate:
        verdict = self.domain.verdict if self.domain is not None else "not_fitted"
        return verdict if verdict in DOMAIN_GATES else "not_fitted"  # type: ignore[return-value]

    @property
    def domain_gate_note(self) -> str | None:
        return self.domain.reason if self.domain is not None else None


def check_domain(
    spec: OodGateSpec | None,
    features: Mapping[str, float],
    gland_model: str | None = None,
    *,
    declared: bool = False,
) -> DomainCheck:
    """The gate's verdict; raise `OutsideValidatedDomainError` for a study outside it. A gate
    fitted with another gland model than `gland_model` (NAME:VERSION), without one recorded on a
    `declared` pair, or on features this pipeline lacks, does not apply: "not_fitted" with the
    reason (models/ood_gate.py)."""
    if spec is None:
        return unchecked(features)
    reason = not_applicable(spec, features, gland_model, declared=declared)
    if reason is not None:
        return unchecked(features, reason)
    result = spec.check(features)
    if result.verdict == "outside":
        raise OutsideValidatedDomainError(
            "the study lies outside what this model was validated on: " + result.describe()
        )
    return result


def zones_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """(3, Z, Y, X) softmax (background, PZ, TZ) -> uint8 zones (0, 1 PZ, 2 TZ), keeping only
    the largest connected gland component."""
    if probabilities.ndim != 4 or probabilities.shape[0] != 3:
        raise ValueError(f"expected (3, Z, Y, X) probabilities, got {probabilities.shape}")
    zones = np.argmax(probabilities, axis=0).astype(np.uint8)
    return zones * largest_component(zones > 0).astype(np.uint8)


def zone_probabilities(probabilities: np.ndarray, zones: np.ndarray) -> np.ndarray:
    """(2, Z, Y, X) PZ and TZ probabilities restricted to one voxel around the kept gland
    component: resampled linearly to the T2W grid they give a smoother gland than labels."""
    keep = ndimage.binary_dilation(zones > 0, iterations=1)
    return np.where(keep[None], probabilities[1:3], 0.0).astype(np.float32)


def zones_from_pz_tz(pz: np.ndarray, tz: np.ndarray) -> np.ndarray:
    """Zones (0, 1 PZ, 2 TZ) from PZ/TZ probabilities on any grid: gland where PZ + TZ >= 0.5."""
    gland = (pz + tz) >= 0.5
    return np.where(gland, np.where(pz >= tz, 1, 2), 0).astype(np.uint8)


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def gate_to_gland(
    likelihood: np.ndarray,
    gland: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    margin_mm: float | None,
) -> np.ndarray:
    """Zero the likelihood farther than `margin_mm` outside a plausible gland (see module doc)."""
    voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
    if margin_mm is None or float(gland.sum()) * voxel_ml < MIN_GLAND_ML:
        return likelihood
    distance = ndimage.distance_transform_edt(~gland.astype(bool), sampling=spacing_xyz[::-1])
    return np.where(distance <= margin_mm, likelihood, 0.0).astype(np.float32)


def category(likelihood: float, thresholds: Thresholds) -> str:
    if likelihood >= thresholds.urgent:
        return "ai_high"
    if likelihood >= thresholds.soon:
        return "ai_intermediate"
    return "ai_low"


def gland_volume_ml(gland: Volume) -> float:
    return float(np.count_nonzero(gland.array)) * gland.voxel_volume_ml


def sector(component: np.ndarray, centroid_mm: np.ndarray, zones: Volume) -> str | None:
    """PI-RADS-style sector of a lesion (see module doc); None when it lies outside the gland."""
    in_gland = zones.array[component]
    in_gland = in_gland[in_gland > 0]
    if in_gland.size == 0:
        return None
    zone = ZONE_NAMES.get(int(np.bincount(in_gland).argmax()), "PZ")
    gland_idx = np.argwhere(zones.array > 0)[:, ::-1]  # (x, y, z)
    gland_mm = zones.index_to_lps(gland_idx)
    centre = gland_mm.mean(axis=0)
    side = "left" if centroid_mm[0] >= centre[0] else "right"  # LPS: +x is patient left
    half = "p" if centroid_mm[1] >= centre[1] else "a"  # LPS: +y is posterior
    s_lo, s_hi = float(gland_mm[:, 2].min()), float(gland_mm[:, 2].max())
    frac = (float(centroid_mm[2]) - s_lo) / max(s_hi - s_lo, 1e-6)  # 0 inferior .. 1 superior
    level = "apex" if frac < 1 / 3 else "mid" if frac < 2 / 3 else "base"
    return f"{side} {level} {zone}{half}"


def extract_lesions(
    likelihood: Volume,
    zones: Volume | None,
    spec: PostprocessingSpec,
    thresholds: Thresholds,
    calibration: CalibrationSpec | None = None,
) -> tuple[tuple[Lesion, ...], Volume]:
    """Lesion candidates of a likelihood map (T2W grid) and their label volume (uint8);
    lesion likelihoods (and so categories) on the `calibration` scale when one is given."""
    lmap = likelihood.array
    # 26-connected, as PI-CAI's evaluation reads detection maps: no two lesions touch.
    labels, n = ndimage.label(lmap >= spec.detection_threshold, structure=np.ones((3, 3, 3)))
    candidates = []
    if n:
        index = np.arange(1, n + 1)
        peaks = ndimage.maximum(lmap, labels, index)
        counts = ndimage.sum_labels(np.ones_like(labels), labels, index)
        for lab, peak, count in zip(index, peaks, counts, strict=True):
            volume = float(count) * likelihood.voxel_volume_ml
            if volume >= spec.min_lesion_volume_ml:
                candidates.append((float(peak), int(lab), volume))
    candidates.sort(key=lambda c: -c[0])
    out_labels = np.zeros(lmap.shape, dtype=np.uint8)
    lesions = []
    for new_label, (raw_peak, lab, volume) in enumerate(candidates[: spec.max_lesions], start=1):
        peak = float(calibrate(raw_peak, calibration))
        component = labels == lab
        out_labels[component] = new_label
        centroid = likelihood.index_to_lps(np.argwhere(component).mean(axis=0)[::-1])
        lesions.append(
            Lesion(
                likelihood=min(max(peak, 0.0), 1.0),
                volume_ml=volume,
                centroid_mm=tuple(float(c) for c in centroid),  # type: ignore[arg-type]
                sector=sector(component, centroid, zones) if zones is not None else None,
                category=category(peak, thresholds),
                label=new_label,
            )
        )
    return tuple(lesions), likelihood.with_array(out_labels)
