"""Labelled data sources and inference: turn `--data` into `CaseRecord`s with the server's code.

`--data` is either `phantoms:N[:SEED[:FAMILY]]` (synthetic cases from `training.phantoms`, seeds
SEED..SEED+N-1, vendors in rotation; default SEED 100000, outside the training seeds; FAMILY
`standard` (default), `randomised` (the domain-randomised family) or `shifted-oblique|large|
contrast|all`, the held-out shifted families of `evaluation.phantom_shift`) or a
folder read by `training.datasets` (PI-CAI MHA layout or DICOM folders with masks).

Inference goes through `models.pipeline.TriagePipeline`, the same pre/post-processing and ONNX
runner the server uses, so evaluation measures what would run in production.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
from scipy import ndimage

from core.domain import Prediction, Volume
from core.errors import InputError
from core.progress import progress
from evaluation.metrics import CaseRecord, detection_map_from_prediction

log = logging.getLogger(__name__)

DEFAULT_PHANTOM_SEED = 100_000  # training uses seeds below this


@dataclass(frozen=True, eq=False)
class LabelledCase:
    """One exam with ground truth; masks are on the T2W grid."""

    case_id: str
    t2w: Volume
    adc: Volume
    hbv: Volume
    is_cspca: bool
    lesion_mask: Volume | None = None  # csPCa lesions (ISUP >= 2) only, 0/1
    gland_mask: Volume | None = None
    vendor: str | None = None
    scanner: str | None = None
    field_strength: str | None = None


class Predictor(Protocol):
    def predict(self, t2w: Volume, adc: Volume, hbv: Volume) -> Prediction: ...


class PhantomSpec(NamedTuple):
    """A parsed `phantoms:N[:SEED[:FAMILY]]`."""

    n: int
    seed: int = DEFAULT_PHANTOM_SEED
    family: str = "standard"


def phantom_cases(
    n: int, seed: int = DEFAULT_PHANTOM_SEED, family: str = "standard"
) -> Iterator[LabelledCase]:
    """`n` synthetic cases (label drawn by the phantom generator, ~40% csPCa)."""
    from training.phantoms import VENDORS, synthesize_case
    from training.phantoms.vendors import FLAVOURS

    for i in range(n):
        vendor = VENDORS[i % len(VENDORS)]
        case = synthesize_case(seed + i, vendor=vendor, family=family)
        cspca_labels = [lesion.label for lesion in case.lesions if lesion.is_cspca]
        mask = np.isin(case.lesion_mask.array, cspca_labels).astype(np.uint8)
        flavour = FLAVOURS.get(vendor)
        yield LabelledCase(
            case_id=f"{case.case_id}-{vendor}" + ("" if family == "standard" else f"-{family}"),
            t2w=case.t2w,
            adc=case.adc,
            hbv=case.hbv,
            is_cspca=case.is_cspca,
            lesion_mask=case.lesion_mask.with_array(mask),
            gland_mask=case.gland_mask,
            vendor=vendor,
            scanner=f"{flavour.manufacturer} {flavour.model}" if flavour else None,
            field_strength=f"{flavour.field_strength:g}T" if flavour else None,
        )


def parse_phantom_spec(spec: str) -> PhantomSpec | None:
    """`phantoms:N[:SEED[:FAMILY]]` -> PhantomSpec; None when `spec` is not a phantom spec."""
    from training.phantoms.anatomy import FAMILIES

    if not spec.startswith("phantoms:"):
        return None
    parts = spec.split(":")[1:]
    usage = "phantoms:N[:SEED[:FAMILY]]"
    try:
        n = int(parts[0])
        seed = int(parts[1]) if len(parts) > 1 else DEFAULT_PHANTOM_SEED
    except (IndexError, ValueError) as exc:
        raise InputError(f"--data {spec!r} must look like {usage}") from exc
    if n <= 0 or len(parts) > 3:
        raise InputError(f"--data {spec!r}: N must be a positive integer ({usage})")
    family = parts[2] if len(parts) > 2 else "standard"
    allowed = (*FAMILIES, *(f"shifted-{s}" for s in SHIFTS))
    if family not in allowed:
        raise InputError(f"--data {spec!r}: FAMILY must be one of {', '.join(allowed)}")
    return PhantomSpec(n, seed, family)


# The held-out shifted families of `evaluation.phantom_shift` (kept here: it imports this module).
SHIFTS = ("oblique", "large", "contrast", "all")


def load_cases(spec: str) -> Iterator[LabelledCase]:
    """The labelled cases named by `--data`."""
    phantom = parse_phantom_spec(spec)
    if phantom is not None and phantom.family.startswith("shifted-"):
        from evaluation.phantom_shift import shifted_phantom_cases

        yield from shifted_phantom_cases(phantom.n, phantom.seed, phantom.family[8:])
        return
    if phantom is not None:
        yield from phantom_cases(*phantom)
        return
    path = Path(spec)
    if not path.is_dir():
        raise InputError(
            f"--data {spec}: no such folder; give a PI-CAI folder (marksheet.csv, images/, "
            "labels/), DICOM study folders with masks/, or phantoms:N[:SEED[:FAMILY]]"
        )
    yield from _dataset_cases(path)


def _dataset_cases(path: Path) -> Iterator[LabelledCase]:
    """A labelled folder as `training.datasets.open_dataset` reads it for training: the PI-CAI
    layout (`marksheet.csv`, `images/`, `labels/`) or DICOM study folders with `masks/` (and
    an optional `ground_truth.json`). Unlike training, the images stay native (the pipeline
    under test does the preprocessing); masks are resampled onto the T2W grid."""
    from models.preprocessing import resample_to_reference
    from training.datasets import open_dataset

    def on_t2w(mask: Volume | None, t2w: Volume) -> Volume | None:
        if mask is None:
            return None
        binary = mask.with_array((np.asarray(mask.array) > 0).astype(np.uint8))
        return resample_to_reference(binary, t2w, order=0)

    for raw in open_dataset(path):
        lesion = on_t2w(raw.lesion_mask, raw.t2w)
        is_cspca = raw.is_cspca
        if is_cspca is None:
            is_cspca = bool(lesion is not None and np.any(lesion.array))
        yield LabelledCase(
            case_id=raw.case_id,
            t2w=raw.t2w,
            adc=raw.adc,
            hbv=raw.hbv,
            is_cspca=is_cspca,
            lesion_mask=lesion,
            gland_mask=on_t2w(raw.gland_mask, raw.t2w),
            vendor=raw.vendor,
        )


def load_pipeline(
    detector: str, gland: str = "prostate_gland", repository: Path | str | None = None
) -> Predictor:
    """The server's inference pipeline for `detector` (NAME or NAME:VERSION)."""
    from models.pipeline import TriagePipeline

    root = Path(repository) if repository is not None else None
    return TriagePipeline.from_repository(repository=root, detector=detector, gland=gland)


def _thumbnail(t2w: np.ndarray, likelihood: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    z = (
        int(np.argmax(likelihood.reshape(likelihood.shape[0], -1).max(axis=1)))
        if (likelihood is not None and likelihood.shape == t2w.shape)
        else t2w.shape[0] // 2
    )
    overlay = likelihood[z] if likelihood is not None and likelihood.shape == t2w.shape else None
    return t2w[z].astype(np.float32), (
        overlay.astype(np.float32) if overlay is not None else np.zeros_like(t2w[z], np.float32)
    )


def run_case(predictor: Predictor, case: LabelledCase) -> CaseRecord:
    """Run one case through the pipeline and pair its outputs with the ground truth."""
    prediction = predictor.predict(case.t2w, case.adc, case.hbv)
    det = None
    if prediction.lesion_labels is not None or prediction.likelihood_map is not None:
        det = detection_map_from_prediction(prediction)
    lesion = case.lesion_mask.array if case.lesion_mask is not None else None
    if det is not None and lesion is None:
        lesion = np.zeros(det.shape, np.uint8)
    if det is not None and lesion is not None and det.shape != lesion.shape:
        raise InputError(
            f"case {case.case_id}: prediction grid {det.shape} differs from the lesion mask grid "
            f"{lesion.shape}; masks must be on the T2W grid"
        )
    lik_map = prediction.likelihood_map.array if prediction.likelihood_map is not None else None
    image, overlay = _thumbnail(np.asarray(case.t2w.array), lik_map)
    return CaseRecord(
        case_id=case.case_id,
        is_cspca=case.is_cspca,
        likelihood=float(prediction.case_likelihood),
        detection_map=det,
        lesion_mask=lesion,
        gland_pred=(prediction.gland_mask.array if prediction.gland_mask is not None else None),
        gland_true=case.gland_mask.array if case.gland_mask is not None else None,
        vendor=case.vendor,
        scanner=case.scanner,
        field_strength=case.field_strength,
        image=image,
        overlay=overlay,
        extra={
            "n_lesions_predicted": len(prediction.lesions),
            "gland_volume_ml": prediction.gland_volume_ml,
            "largest_lesion_ml": largest_lesion_ml(case.lesion_mask),
        },
    )


def largest_lesion_ml(mask: Volume | None) -> float | None:
    """Volume (ml) of the largest connected ground-truth csPCa lesion; None without lesions."""
    if mask is None:
        return None
    labels, n = ndimage.label(np.asarray(mask.array) > 0)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    return float(sizes.max()) * mask.voxel_volume_ml


def run_cases(predictor: Predictor, cases: Iterable[LabelledCase]) -> list[CaseRecord]:
    records = []
    total = len(cases) if isinstance(cases, Sized) else None
    for i, case in enumerate(progress(cases, "evaluated cases", total), 1):
        records.append(run_case(predictor, case))
        log.debug("evaluated %d cases (last: %s)", i, case.case_id)
    if not records:
        raise InputError("the data source held no cases to evaluate")
    return records
