"""Pure pre-processing shared by training, serving and evaluation (no train/serve skew).

The model grid is a box of `InputSpec.shape_zyx` voxels at `InputSpec.spacing_xyz`, with the T2W
series' orientation, centred on the centre of the T2W field of view. ADC and high-b images are
resampled straight onto it (one interpolation per channel), then normalised per channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from core.domain import Volume
from core.errors import InputError
from models.metadata import InputSpec, Normalisation

_INTERPOLATORS = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}


def to_sitk(volume: Volume) -> sitk.Image:
    """A SimpleITK image with the volume's voxels and geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


def from_sitk(image: sitk.Image, like: Volume | None = None) -> Volume:
    """A Volume from a SimpleITK image; UIDs are copied from `like` when given."""
    return Volume(
        sitk.GetArrayFromImage(image),
        image.GetSpacing(),
        image.GetOrigin(),
        image.GetDirection(),
        like.series_instance_uid if like is not None else "",
        like.frame_of_reference_uid if like is not None else "",
    )


def _resample(volume: Volume, reference: Volume, order: int, default: float) -> np.ndarray:
    if order not in _INTERPOLATORS:
        raise ValueError(f"order must be one of {sorted(_INTERPOLATORS)}, got {order}")
    source = to_sitk(volume)
    if order != 0 and source.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        source = sitk.Cast(source, sitk.sitkFloat32)
    ref = sitk.Image(*reference.size, sitk.sitkUInt8)
    ref.SetSpacing(reference.spacing)
    ref.SetOrigin(reference.origin)
    ref.SetDirection(reference.direction)
    out = sitk.Resample(
        source, ref, sitk.Transform(), _INTERPOLATORS[order], default, source.GetPixelID()
    )
    return sitk.GetArrayFromImage(out)


def resample_to_reference(volume: Volume, reference: Volume, *, order: int = 1) -> Volume:
    """`volume` resampled onto `reference`'s grid (patient coordinates; 0 outside).

    order: 0 nearest neighbour (labels), 1 linear, 3 B-spline. Linear output is float32.
    Frames of reference are not compared: series of one study share patient coordinates.
    """
    array = _resample(volume, reference, order, 0.0)
    if order != 0:
        array = array.astype(np.float32, copy=False)
    return reference.with_array(array)


def model_grid(t2w: Volume, spec: InputSpec) -> Volume:
    """The (empty) model grid for this T2W series: geometry only, zeros as voxels."""
    direction = t2w.direction_matrix
    size_xyz = np.asarray(t2w.size, dtype=float)
    centre = t2w.index_to_lps((size_xyz - 1.0) / 2.0)
    spacing = np.asarray(spec.spacing_xyz, dtype=float)
    shape_xyz = np.asarray(spec.shape_zyx[::-1], dtype=float)
    origin = centre - direction @ (spacing * (shape_xyz - 1.0) / 2.0)
    return Volume(
        np.zeros(spec.shape_zyx, dtype=np.float32),
        tuple(spacing),  # type: ignore[arg-type]
        tuple(origin),  # type: ignore[arg-type]
        t2w.direction,
        "",
        t2w.frame_of_reference_uid,
    )


def normalise(array: np.ndarray, rule: Normalisation) -> np.ndarray:
    """Apply one channel's normalisation rule (pure; float32 out)."""
    a = array.astype(np.float32, copy=True)
    if rule.method == "zscore":
        std = float(a.std())
        a = (a - float(a.mean())) / (std if std > 1e-6 else 1.0)
    if rule.clip is not None:
        np.clip(a, rule.clip[0], rule.clip[1], out=a)
    return a


@dataclass(frozen=True, eq=False)
class PreparedCase:
    """Model-grid input of one study and what is needed to map outputs back to the T2W grid.

    `image` is (C, Z, Y, X) float32 in `channels` order; `grid` is the model grid's geometry;
    `reference` is the T2W series (its grid is where outputs go back to).
    """

    image: np.ndarray
    channels: tuple[str, ...]
    grid: Volume
    reference: Volume

    def model_input(self, channels: tuple[str, ...]) -> np.ndarray:
        """(C', Z, Y, X) float32 with the channels a model wants, in its order."""
        missing = [c for c in channels if c not in self.channels]
        if missing:
            raise InputError(f"prepared case lacks channels {missing}; it has {self.channels}")
        return np.ascontiguousarray(self.image[[self.channels.index(c) for c in channels]])

    def to_reference(self, array: np.ndarray, *, order: int = 1) -> Volume:
        """A model-grid array (Z, Y, X) resampled back onto the T2W grid."""
        return resample_to_reference(self.grid.with_array(array), self.reference, order=order)


def prepare_case(t2w: Volume, adc: Volume, hbv: Volume, spec: InputSpec) -> PreparedCase:
    """Resample t2w/adc/hbv onto the model grid of `spec` and normalise each channel."""
    sources: Mapping[str, Volume] = {"t2w": t2w, "adc": adc, "hbv": hbv}
    grid = model_grid(t2w, spec)
    arrays = []
    for channel in spec.channels:
        resampled = resample_to_reference(sources[channel], grid, order=1).array
        arrays.append(normalise(resampled, spec.normalisation_for(channel)))
    image = np.stack(arrays).astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise InputError("pre-processed image contains NaN/inf: check the input pixel data")
    return PreparedCase(image=image, channels=tuple(spec.channels), grid=grid, reference=t2w)


def labels_to_grid(labels: Volume, grid: Volume) -> np.ndarray:
    """A label volume (any grid) on the model grid, nearest neighbour, uint8 (training)."""
    return resample_to_reference(labels, grid, order=0).array.astype(np.uint8)
