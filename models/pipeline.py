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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, special

from core.domain import Lesion, Prediction, Volume
from core.errors import InferenceError, ModelSignatureError
from core.priority import Thresholds
from models.calibration import CalibrationSpec, calibrate
from models.metadata import GridSpec, InferenceSpec, InputSpec, LesionSpec, ModelMetadata
from models.onnx_runner import OnnxModel
from models.ood_gate import (
    declared_domain_features,
    domain_features,
    sigmoid_entropy,
    softmax_entropy,
)
from models.postprocessing import (
    WHOLE_GLAND,
    CalibratedPrediction,
    category,
    check_domain,
    extract_lesions,
    gate_to_gland,
    gland_volume_ml,
    sector,
    zone_probabilities,
    zones_from_probabilities,
    zones_from_pz_tz,
)
from models.preprocessing import PreparedCase, prepare_case, resample_to_reference
from models.repository import default_repository

__all__ = ["TriagePipeline", "default_repository"]


def _single(output: np.ndarray, channels: int, what: str) -> np.ndarray:
    out = output[0] if output.ndim == 5 and output.shape[0] == 1 else output
    if out.ndim != 4 or out.shape[0] != channels:
        raise InferenceError(f"{what} output must be ({channels}, Z, Y, X), got {output.shape}")
    return out


def declared(md: ModelMetadata) -> bool:
    """Whether a model runs beyond the 0.2.0 contract (own grid, flips, members, activation,
    one-channel gland, report-guided lesions): then its map goes through `forward_map`."""
    inf = md.inference
    return (
        md.input_spec.grid.kind != "t2w_center"
        or bool(inf.tta_flips or inf.members or inf.smoothing_sigma)
        or inf.activation != "none"
        or inf.channel is not None
        or md.lesions.method != "components"
        or (md.task == "gland_segmentation" and len(md.output_channels) == 1)
    )


@dataclass(frozen=True, eq=False)
class PreparedPair:
    """Each model's own prepared case when detector and gland use different grids."""

    detector: PreparedCase
    gland: PreparedCase


class PipelineSteps:
    """Pre/post-processing of one csPCa detector + gland model pair, from their metadata.

    0.2.0-style pairs share one model grid and one `PreparedCase`; any other pair (declared
    pipelines: PI-CAI baseline, TAPS, ...) prepares one case per model (`PreparedPair`) and
    maps each output back to the T2W grid on its own. Both compute the out-of-distribution
    gate's features (`models.ood_gate`) and check the detector's `ood_gate`, which applies only
    with the gland model it was fitted with (otherwise "not_fitted", with the reason)."""

    def __init__(self, detector: ModelMetadata, gland: ModelMetadata) -> None:
        d, g = detector, gland
        if d.task != "cspca_detection" or g.task != "gland_segmentation":
            raise ModelSignatureError(
                f"need a cspca_detection and a gland_segmentation model, got {d.name} "
                f"({d.task}) and {g.name} ({g.task})"
            )
        self.shared_grid = not (declared(d) or declared(g))
        if self.shared_grid and not d.input_spec.same_grid(g.input_spec):
            raise ModelSignatureError(
                f"{d.name}:{d.version} and {g.name}:{g.version} use different model grids "
                f"({d.input_spec.spacing_xyz} mm x {d.input_spec.shape_zyx} vs "
                f"{g.input_spec.spacing_xyz} mm x {g.input_spec.shape_zyx}); retrain on one grid"
            )
        for channel in g.input_spec.channels:
            if (
                self.shared_grid
                and channel in d.input_spec.channels
                and (
                    g.input_spec.normalisation_for(channel)
                    != d.input_spec.normalisation_for(channel)
                )
            ):
                raise ModelSignatureError(f"models normalise channel {channel!r} differently")
        if d.thresholds is None:
            raise ModelSignatureError(
                f"{d.name}:{d.version} has no priority thresholds in its metadata.json; choose "
                "them with `radtriage evaluate --write-thresholds` before serving it"
            )
        if len(g.output_channels) not in (1, 3):
            raise ModelSignatureError(
                f"{g.name} must output bg/PZ/TZ or one gland channel, got {g.output_channels}"
            )
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

    def prepare(self, t2w: Volume, adc: Volume, hbv: Volume) -> PreparedCase | PreparedPair:
        if self.shared_grid:
            return prepare_case(t2w, adc, hbv, self.spec)
        return PreparedPair(
            detector=prepare_case(t2w, adc, hbv, self.detector_metadata.input_spec),
            gland=prepare_case(t2w, adc, hbv, self.gland_metadata.input_spec),
        )

    def gland_input(self, prepared: PreparedCase | PreparedPair) -> np.ndarray:
        """(C, Z, Y, X) for the gland model; stack several for one batched `run`."""
        case = prepared.gland if isinstance(prepared, PreparedPair) else prepared
        return case.model_input(self.gland_metadata.input_spec.channels)

    def detector_input(self, prepared: PreparedCase | PreparedPair) -> np.ndarray:
        case = prepared.detector if isinstance(prepared, PreparedPair) else prepared
        return case.model_input(self.detector_metadata.input_spec.channels)

    def finish(
        self,
        prepared: PreparedCase | PreparedPair,
        gland_out: np.ndarray,
        detector_out: np.ndarray,
    ) -> Prediction:
        """Model outputs ((C, Z, Y, X) maps, batch axis optional) -> Prediction on the T2W grid
        (a `CalibratedPrediction`: calibrated likelihood, raw score, out-of-distribution gate)."""
        if isinstance(prepared, PreparedPair):
            return self._finish_declared(prepared, gland_out, detector_out)
        return self._finish_shared(prepared, gland_out, detector_out)

    def _finish_declared(
        self, prepared: PreparedPair, gland_out: np.ndarray, detector_out: np.ndarray
    ) -> Prediction:
        d, g = self.detector_metadata, self.gland_metadata
        reference = prepared.detector.reference
        gland_map = gland_out[0] if gland_out.ndim == 5 else gland_out
        if len(g.output_channels) == 1 or gland_map.shape[0] == 1:
            gland_probability = map_to_t2w(g, prepared.gland, gland_map)
            zones_array = gland_mask(g, gland_probability) * WHOLE_GLAND
            gland_entropy = sigmoid_entropy(gland_probability[0])
        else:
            probabilities = _single(gland_map, 3, "gland")
            gland_entropy = softmax_entropy(probabilities)
            zones_grid = zones_from_probabilities(probabilities)
            pz, tz = (
                prepared.gland.to_reference(p, order=1).array
                for p in zone_probabilities(probabilities, zones_grid)
            )
            zones_array = zones_from_pz_tz(pz, tz)
        zones = reference.with_array(zones_array.astype(np.uint8))
        gland = zones.with_array((zones.array > 0).astype(np.uint8))
        detector_map = _single(detector_out, 1, "detector")
        likelihood = map_to_t2w(d, prepared.detector, detector_map)[0]
        post = d.postprocessing
        if post.gland_margin_mm is not None:
            likelihood = gate_to_gland(
                likelihood, gland.array > 0, reference.spacing, post.gland_margin_mm
            )
        likelihood = np.clip(np.nan_to_num(likelihood, nan=0.0), 0.0, 1.0).astype(np.float32)
        likelihood_volume = reference.with_array(likelihood)
        features = declared_domain_features(
            prepared.detector.image,
            prepared.detector.channels,
            resample_to_reference(gland, prepared.detector.grid, order=0).array,
            gland.array,
            likelihood,
            reference,
            gland_entropy,
        )
        # raises OutsideValidatedDomainError; "not_fitted" without a gate fitted for this pair
        domain = check_domain(d.ood_gate, features, f"{g.name}:{g.version}", declared=True)
        if d.lesions.method == "report_guided_dynamic":
            found = detect(d.lesions, likelihood)
            raw = found.case_likelihood
            lesions = detection_lesions(found, reference, zones, self.thresholds, d.calibration)
            labels = reference.with_array(found.index)
        else:
            lesions, labels = extract_lesions(
                likelihood_volume, zones, post, self.thresholds, d.calibration
            )
            raw = float(likelihood.max())
        if d.calibration is not None:
            calibrated = calibrate(likelihood, d.calibration)
            likelihood_volume = reference.with_array(np.asarray(calibrated, dtype=np.float32))
        volume = gland_volume_ml(gland)
        return CalibratedPrediction(
            case_likelihood=float(calibrate(raw, d.calibration)),
            lesions=lesions,
            gland_volume_ml=volume if volume > 0 else None,
            likelihood_map=likelihood_volume,
            lesion_labels=labels,
            gland_mask=gland,
            raw_case_likelihood=raw,
            domain=domain,
        )

    def _finish_shared(
        self, prepared: PreparedCase, gland_out: np.ndarray, detector_out: np.ndarray
    ) -> Prediction:
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
        gland_ref = f"{self.gland_metadata.name}:{self.gland_metadata.version}"
        domain = check_domain(md.ood_gate, features, gland_ref)  # may raise OutsideValidated...
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
        gland_out = model_map(self.gland, self.gland_input(prepared))
        detector_out = model_map(self.detector, self.detector_input(prepared))
        return self.finish(prepared, gland_out, detector_out)


def model_map(model: OnnxModel, x: np.ndarray) -> np.ndarray:
    """One study's (C, Z, Y, X) input through a loaded model: its declared inference (members,
    flips, windows, activation, smoothing) or, for a 0.2.0 model, one plain run."""
    return model_maps(model, x[None])[0]


def model_maps(model: OnnxModel, xs: np.ndarray) -> np.ndarray:
    """`model_map` for N studies stacked ((N, C, Z, Y, X)): one run per member for all."""
    if declared(model.metadata):
        return forward_maps(model.metadata, model.member_runs(), xs)
    return model.run(xs)


# --- declared pipeline executor -----------------------------------------------------------
# One model's declared inference (metadata `inference`, `input_spec.grid`, `lesions`): used by
# `PipelineSteps.finish`, the Ray deployments (`OnnxModel.forward`) and the PI-CAI/TAPS parity
# tests, so a field model runs here exactly as its authors' code runs it.

Run = Callable[[np.ndarray], np.ndarray]
_FLIP_AXES = {"z": -3, "y": -2, "x": -1}


def _network(run: Run, x: np.ndarray, grid: GridSpec) -> np.ndarray:
    """(N, C, Z, Y, X) -> (N, C_out, Z, Y, X) through the network, in its axis order and, for a
    sliding-window grid, window by window with Gaussian blending (MONAI's inferer)."""
    if grid.axis_order == "xyz":
        x = np.ascontiguousarray(x.transpose(0, 1, 4, 3, 2))
    if grid.kind == "sliding_window" and grid.roi_zyx is not None:
        import torch
        from monai.inferers.utils import sliding_window_inference

        roi = grid.roi_zyx[::-1] if grid.axis_order == "xyz" else grid.roi_zyx

        def predictor(t: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(run(np.ascontiguousarray(t.numpy(), dtype=np.float32)))

        with torch.inference_mode():
            y = sliding_window_inference(
                torch.from_numpy(x),
                roi_size=roi,
                sw_batch_size=1,
                predictor=predictor,
                overlap=grid.overlap,
                mode="gaussian",
            )
        out = np.asarray(y.numpy() if hasattr(y, "numpy") else y, dtype=np.float32)
    else:
        out = run(x)
    if grid.axis_order == "xyz":
        out = np.ascontiguousarray(out.transpose(0, 1, 4, 3, 2))
    return out


def _activate(y: np.ndarray, activation: str, axis: int = 0) -> np.ndarray:
    if activation == "sigmoid":
        return np.asarray(special.expit(y), dtype=np.float32)
    if activation == "softmax":
        e = np.exp(y - y.max(axis=axis, keepdims=True))
        return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)
    return y


def forward_map(md: ModelMetadata, runs: Sequence[Run], x: np.ndarray) -> np.ndarray:
    """One study's (C, Z, Y, X) model input -> its (C_out, Z, Y, X) map on the model grid:
    every member on the input and its declared flips (one batch), outputs un-flipped, activated
    (on the model grid when so declared), the declared channel kept, smoothed per augmentation,
    averaged over augmentations, then over members."""
    return forward_maps(md, runs, x[None])[0]


def forward_maps(md: ModelMetadata, runs: Sequence[Run], xs: np.ndarray) -> np.ndarray:
    """`forward_map` for N studies at once ((N, C, Z, Y, X) -> (N, C_out, Z, Y, X)): each
    member runs once on every study and flip (one batch of N x augmentations), which is how
    Ray Serve's dynamic batching reaches an ensemble's members."""
    spec = md.inference
    grid = md.input_spec.grid
    variants: list[tuple[int, ...]] = [()] + [(_FLIP_AXES[a],) for a in spec.tta_flips]
    batch = np.stack([np.flip(x, v) if v else x for x in xs for v in variants]).astype(np.float32)
    n = len(variants)
    per_study: list[list[np.ndarray]] = [[] for _ in xs]
    for run in runs:
        out = _network(run, batch, grid)
        for i in range(len(xs)):
            per_study[i].append(_average_variants(spec, out[i * n : (i + 1) * n], variants))
    return np.stack([np.mean(m, axis=0) for m in per_study]).astype(np.float32)


def _average_variants(
    spec: InferenceSpec, out: np.ndarray, variants: Sequence[tuple[int, ...]]
) -> np.ndarray:
    """One member's outputs for one study's augmentations -> their mean map (un-flipped,
    activated, channel kept, smoothed per augmentation)."""
    maps = []
    for y, flips in zip(out, variants, strict=True):
        if spec.activate_on == "model_grid":
            y = _activate(y, spec.activation)
        if spec.channel is not None:
            y = y[spec.channel : spec.channel + 1]
        if flips:
            y = np.flip(y, flips)
        if spec.smoothing_sigma > 0:
            y = np.stack(
                [
                    ndimage.gaussian_filter(c, sigma=spec.smoothing_sigma, mode=spec.smoothing_mode)
                    for c in y
                ]
            )
        maps.append(np.ascontiguousarray(y, dtype=np.float32))
    return np.mean(maps, axis=0)


def map_to_t2w(md: ModelMetadata, prepared: PreparedCase, model_map: np.ndarray) -> np.ndarray:
    """(C, Z, Y, X) model-grid map -> (C, z, y, x) on the T2W grid (declared revert), activated
    there when the model declares so."""
    back = np.stack([prepared.to_reference(c).array for c in model_map]).astype(np.float32)
    if md.inference.activate_on == "t2w_grid":
        back = _activate(back, md.inference.activation)
    return back


@dataclass(frozen=True)
class Detection:
    """A detection map's candidates: `index` labels each (1..n), `peaks[i - 1]` its likelihood,
    `case_likelihood` the declared aggregation (max)."""

    likelihood: np.ndarray  # (z, y, x) on the T2W grid, as extraction saw it
    detection_map: np.ndarray  # each candidate's voxels set to its peak
    index: np.ndarray
    peaks: tuple[float, ...]
    case_likelihood: float


def detect(spec: LesionSpec, likelihood: np.ndarray) -> Detection:
    """Candidates of a T2W-grid likelihood map: report_guided_annotation's dynamic threshold
    (the PI-CAI baseline), candidates below `min_peak_fraction` x the highest peak dropped."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a banner on import
        from report_guided_annotation import extract_lesion_candidates

    blobs, confidences, index = extract_lesion_candidates(likelihood, threshold="dynamic")
    top = max((c for _, c in confidences), default=0.0)
    kept = [(i, float(c)) for i, c in confidences if top > 0 and c >= spec.min_peak_fraction * top]
    keep_ids = np.array([i for i, _ in kept], dtype=int)
    mask = np.isin(index, keep_ids) if kept else np.zeros(index.shape, bool)
    detection_map = np.where(mask, blobs, 0.0).astype(np.float32)
    relabelled = np.zeros(index.shape, dtype=np.uint8)
    order = sorted(kept, key=lambda ic: -ic[1])
    for new, (i, _) in enumerate(order, start=1):
        relabelled[index == i] = new
    return Detection(
        likelihood=likelihood,
        detection_map=detection_map,
        index=relabelled,
        peaks=tuple(c for _, c in order),
        case_likelihood=float(detection_map.max()) if detection_map.size else 0.0,
    )


def detection_lesions(
    found: Detection,
    reference: Volume,
    zones: Volume | None,
    thresholds: Thresholds | None,
    calibration: CalibrationSpec | None = None,
) -> tuple[Lesion, ...]:
    """Lesions of the candidates (peaks on the `calibration` scale when one is given)."""
    lesions = []
    for label, raw_peak in enumerate(found.peaks, start=1):
        peak = float(calibrate(raw_peak, calibration))
        component = found.index == label
        centroid = reference.index_to_lps(np.argwhere(component).mean(axis=0)[::-1])
        lesions.append(
            Lesion(
                likelihood=min(max(peak, 0.0), 1.0),
                volume_ml=float(component.sum()) * reference.voxel_volume_ml,
                centroid_mm=tuple(float(c) for c in centroid),  # type: ignore[arg-type]
                sector=sector(component, centroid, zones) if zones is not None else None,
                category=category(peak, thresholds) if thresholds else "ai_unthresholded",
                label=label,
            )
        )
    return tuple(lesions)


def gland_mask(md: ModelMetadata, gland_map: np.ndarray) -> np.ndarray:
    """A one-channel gland model's T2W-grid map -> its largest 26-connected component."""
    threshold = md.inference.mask_threshold if md.inference.mask_threshold is not None else 0.5
    mask = gland_map[0] > threshold
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        mask = labels == (int(np.argmax(sizes)) + 1)
    return mask.astype(np.uint8)


def run_detector(
    md: ModelMetadata, runs: Sequence[Run], t2w: Volume, adc: Volume, hbv: Volume
) -> tuple[PreparedCase, np.ndarray, Detection]:
    """A declared detector on one study, end to end: prepared case, T2W-grid map, candidates."""
    prepared = prepare_case(t2w, adc, hbv, md.input_spec)
    model_map = forward_map(md, runs, prepared.model_input(md.input_spec.channels))
    likelihood = map_to_t2w(md, prepared, model_map)[0]
    return prepared, likelihood, detect(md.lesions, likelihood)


def run_gland(
    md: ModelMetadata, runs: Sequence[Run], t2w: Volume, adc: Volume, hbv: Volume
) -> Volume:
    """A declared one-channel gland model on one study: the binary gland on the T2W grid."""
    prepared = prepare_case(t2w, adc, hbv, md.input_spec)
    model_map = forward_map(md, runs, prepared.model_input(md.input_spec.channels))
    return t2w.with_array(gland_mask(md, map_to_t2w(md, prepared, model_map)))
