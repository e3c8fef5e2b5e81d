"""The triage pipeline: prepare -> (gland, detector ONNX runs) -> finish.

`PipelineSteps` holds the pure pre/post-processing of a detector + gland pair, built from their
metadata alone, so Ray Serve's CPU stages run it without loading a network and serving can
batch `OnnxModel.run` across studies; `TriagePipeline` adds the two loaded models for direct
calls (offline `infer`, `evaluate`, tests). Training and evaluation call the same steps: no
train/serve skew.

Both models run on one model grid (same spacing/shape/crop in their metadata, checked at
construction), so one `PreparedCase` feeds both and outputs map back to the T2W grid once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.domain import Prediction, Volume
from core.errors import InferenceError, ModelSignatureError
from core.priority import Thresholds
from models.calibration import calibrate
from models.metadata import InputSpec, ModelMetadata
from models.onnx_runner import OnnxModel
from models.ood_gate import domain_features
from models.postprocessing import (
    CalibratedPrediction,
    check_domain,
    extract_lesions,
    gate_to_gland,
    gland_volume_ml,
    zone_probabilities,
    zones_from_probabilities,
    zones_from_pz_tz,
)
from models.preprocessing import PreparedCase, prepare_case
from models.repository import default_repository

__all__ = ["TriagePipeline", "default_repository"]


def _single(output: np.ndarray, channels: int, what: str) -> np.ndarray:
    out = output[0] if output.ndim == 5 and output.shape[0] == 1 else output
    if out.ndim != 4 or out.shape[0] != channels:
        raise InferenceError(f"{what} output must be ({channels}, Z, Y, X), got {output.shape}")
    return out


class PipelineSteps:
    """Pre/post-processing of one csPCa detector + gland model pair, from their metadata."""

    def __init__(self, detector: ModelMetadata, gland: ModelMetadata) -> None:
        d, g = detector, gland
        if d.task != "cspca_detection" or g.task != "gland_segmentation":
            raise ModelSignatureError(
                f"need a cspca_detection and a gland_segmentation model, got {d.name} "
                f"({d.task}) and {g.name} ({g.task})"
            )
        if not d.input_spec.same_grid(g.input_spec):
            raise ModelSignatureError(
                f"{d.name}:{d.version} and {g.name}:{g.version} use different model grids "
                f"({d.input_spec.spacing_xyz} mm x {d.input_spec.shape_zyx} vs "
                f"{g.input_spec.spacing_xyz} mm x {g.input_spec.shape_zyx}); retrain on one grid"
            )
        for channel in g.input_spec.channels:
            if channel in d.input_spec.channels and (
                g.input_spec.normalisation_for(channel) != d.input_spec.normalisation_for(channel)
            ):
                raise ModelSignatureError(f"models normalise channel {channel!r} differently")
        if d.thresholds is None:
            raise ModelSignatureError(
                f"{d.name}:{d.version} has no priority thresholds in its metadata.json; choose "
                "them with `radtriage evaluate --write-thresholds` before serving it"
            )
        if len(g.output_channels) != 3:
            raise ModelSignatureError(f"{g.name} must output bg/PZ/TZ, got {g.output_channels}")
        self.detector_metadata = d
        self.gland_metadata = g
        channels = tuple(dict.fromkeys(d.input_spec.channels + g.input_spec.channels))
        rules = {n.channel: n for n in g.input_spec.normalisation + d.input_spec.normalisation}
        self.spec = InputSpec(
            spacing_xyz=d.input_spec.spacing_xyz,
            shape_zyx=d.input_spec.shape_zyx,
            channels=channels,
            normalisation=tuple(rules[c] for c in channels if c in rules),
            crop=d.input_spec.crop,
        )
        self.thresholds: Thresholds = d.thresholds.as_thresholds()

    def prepare(self, t2w: Volume, adc: Volume, hbv: Volume) -> PreparedCase:
        return prepare_case(t2w, adc, hbv, self.spec)

    def gland_input(self, prepared: PreparedCase) -> np.ndarray:
        """(C, Z, Y, X) for the gland model; stack several for one batched `run`."""
        return prepared.model_input(self.gland_metadata.input_spec.channels)

    def detector_input(self, prepared: PreparedCase) -> np.ndarray:
        return prepared.model_input(self.detector_metadata.input_spec.channels)

    def finish(
        self, prepared: PreparedCase, gland_out: np.ndarray, detector_out: np.ndarray
    ) -> Prediction:
        """Model outputs ((3|1, Z, Y, X), batch axis optional) -> Prediction on the T2W grid
        (a `CalibratedPrediction`: calibrated likelihood, raw score, out-of-distribution gate)."""
        probabilities = _single(gland_out, 3, "gland")
        zones_grid = zones_from_probabilities(probabilities)
        likelihood_grid = _single(detector_out, 1, "detector")[0]
        post = self.detector_metadata.postprocessing
        gated = gate_to_gland(
            likelihood_grid, zones_grid > 0, self.spec.spacing_xyz, post.gland_margin_mm
        )
        gated = np.clip(np.nan_to_num(gated, nan=0.0), 0.0, 1.0).astype(np.float32)
        pz_tz = zone_probabilities(probabilities, zones_grid)
        pz, tz = (prepared.to_reference(p).array for p in pz_tz)
        zones = prepared.reference.with_array(zones_from_pz_tz(pz, tz))
        likelihood = prepared.to_reference(gated, order=1)
        likelihood = likelihood.with_array(np.clip(likelihood.array, 0.0, 1.0))
        md = self.detector_metadata
        features = domain_features(
            prepared.image,
            prepared.channels,
            probabilities,
            zones_grid,
            gated,
            prepared.reference,
            self.spec.spacing_xyz,
        )
        domain = check_domain(md.ood_gate, features)  # raises OutsideValidatedDomainError
        lesions, labels = extract_lesions(likelihood, zones, post, self.thresholds, md.calibration)
        if md.calibration is not None:  # one scale for every likelihood the prediction carries
            calibrated = calibrate(likelihood.array, md.calibration)
            likelihood = likelihood.with_array(np.asarray(calibrated, dtype=np.float32))
        gland_mask = zones.with_array((zones.array > 0).astype(np.uint8))
        volume = gland_volume_ml(gland_mask)
        raw = float(gated.max())
        return CalibratedPrediction(
            case_likelihood=float(calibrate(raw, md.calibration)),
            lesions=lesions,
            gland_volume_ml=volume if volume > 0 else None,
            likelihood_map=likelihood,
            lesion_labels=labels,
            gland_mask=gland_mask,
            raw_case_likelihood=raw,
            domain=domain,
        )


class TriagePipeline(PipelineSteps):
    """`PipelineSteps` plus the two loaded, verified ONNX models."""

    def __init__(self, detector: OnnxModel, gland: OnnxModel) -> None:
        super().__init__(detector.metadata, gland.metadata)
        self.detector = detector
        self.gland = gland

    @classmethod
    def from_repository(
        cls,
        repository: Path | None = None,
        detector: str = "cspca_detector",
        gland: str = "prostate_gland",
        device: str = "auto",
        threads: int | None = None,
    ) -> TriagePipeline:
        root = repository if repository is not None else default_repository()
        return cls(
            OnnxModel.load(root, detector, device=device, threads=threads),
            OnnxModel.load(root, gland, device=device, threads=threads),
        )

    def predict(self, t2w: Volume, adc: Volume, hbv: Volume) -> Prediction:
        prepared = self.prepare(t2w, adc, hbv)
        gland_out = self.gland.run(self.gland_input(prepared)[None])
        detector_out = self.detector.run(self.detector_input(prepared)[None])
        return self.finish(prepared, gland_out, detector_out)
