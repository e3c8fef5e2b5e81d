"""A phantom family held out from training: `training.phantoms` cases with shifted anatomy,
geometry and intensity, for measuring the out-of-distribution gate (and AUROC under shift).

Each shift is a pure function of a `LabelledCase` (labels and masks move with the images):

- ``oblique``: the whole exam rotated 25 degrees about the patient's left-right axis (double
  the largest obliquity the generator draws);
- ``large``: anatomy 1.4x larger in every direction (gland ~2.7x the volume);
- ``contrast``: another intensity profile: T2W gamma 0.5 (flatter zonal contrast), ADC raised
  to the power 1.6 (restriction contrast exaggerated), high-b with 35% extra Gaussian noise;
- ``all``: the three together.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np

from core.domain import Volume
from evaluation.runner import SHIFTS, LabelledCase, phantom_cases

__all__ = ["SHIFTS", "shifted", "shifted_phantom_cases"]


def _centre(v: Volume) -> np.ndarray:
    return np.asarray(v.index_to_lps((np.asarray(v.size, float) - 1) / 2), dtype=float)


def _moved(v: Volume, centre: np.ndarray, matrix: np.ndarray) -> Volume:
    """`v` with patient geometry mapped by x -> centre + matrix @ (x - centre)."""
    d = np.asarray(v.direction, float).reshape(3, 3)
    sp = np.asarray(v.spacing, float)
    axes = matrix @ (d * sp)  # columns: voxel steps in patient mm
    spacing = np.linalg.norm(axes, axis=0)
    origin = centre + matrix @ (np.asarray(v.origin, float) - centre)
    return dataclasses.replace(
        v,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=tuple(float(x) for x in (axes / spacing).ravel()),
    )


def _geometry(case: LabelledCase, matrix: np.ndarray) -> LabelledCase:
    c = _centre(case.t2w)
    return dataclasses.replace(
        case,
        t2w=_moved(case.t2w, c, matrix),
        adc=_moved(case.adc, c, matrix),
        hbv=_moved(case.hbv, c, matrix),
        lesion_mask=_moved(case.lesion_mask, c, matrix) if case.lesion_mask is not None else None,
        gland_mask=_moved(case.gland_mask, c, matrix) if case.gland_mask is not None else None,
    )


def oblique(case: LabelledCase, degrees: float = 25.0) -> LabelledCase:
    a = math.radians(degrees)
    rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    return _geometry(case, rot)


def large(case: LabelledCase, factor: float = 1.4) -> LabelledCase:
    return _geometry(case, np.eye(3) * factor)


def contrast(case: LabelledCase, seed: int = 0) -> LabelledCase:
    rng = np.random.default_rng(seed)
    t2 = np.asarray(case.t2w.array, np.float32)
    top = float(np.percentile(t2, 99.5)) or 1.0
    t2 = top * np.clip(t2 / top, 0, None) ** 0.5
    adc = np.asarray(case.adc.array, np.float32)
    scale = float(np.percentile(adc, 99)) or 1.0
    adc = scale * np.clip(adc / scale, 0, None) ** 1.6
    hbv = np.asarray(case.hbv.array, np.float32)
    noise = 0.35 * float(np.median(hbv[hbv > 0])) if np.any(hbv > 0) else 1.0
    hbv = np.abs(hbv + rng.normal(0, noise, hbv.shape)).astype(np.float32)
    return dataclasses.replace(
        case,
        t2w=case.t2w.with_array(t2.astype(np.float32)),
        adc=case.adc.with_array(adc.astype(np.float32)),
        hbv=case.hbv.with_array(hbv),
    )


def shifted(case: LabelledCase, shift: str, seed: int = 0) -> LabelledCase:
    """`case` under the named shift (see module doc)."""
    steps: dict[str, Callable[[LabelledCase], LabelledCase]] = {
        "oblique": oblique,
        "large": large,
        "contrast": lambda c: contrast(c, seed),
        "all": lambda c: contrast(large(oblique(c)), seed),
    }
    if shift not in steps:
        raise ValueError(f"shift must be one of {SHIFTS}, got {shift!r}")
    out = steps[shift](case)
    return dataclasses.replace(out, case_id=f"{case.case_id}-{shift}")


def shifted_phantom_cases(n: int, seed: int, shift: str) -> Iterator[LabelledCase]:
    """`n` phantom cases (seeds `seed`..) under `shift`."""
    for i, case in enumerate(phantom_cases(n, seed)):
        yield shifted(case, shift, seed + i)
