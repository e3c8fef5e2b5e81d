"""Pure pre-processing shared by training, serving and evaluation (no train/serve skew).

The model grid is declared by `InputSpec.grid` (models/metadata.py `GridSpec`):
- `t2w_center` (the 0.2.0 models): a box of `shape_zyx` voxels at `spacing_xyz`, with the T2W
  series' orientation, centred on the centre of the T2W field of view; ADC and high-b images are
  resampled straight onto it (one interpolation per channel).
- `picai_prep`: the PI-CAI preprocessing (resample on each series' own origin, centre crop or
  pad in index space, ADC/high-b onto the cropped T2W), pixel types kept as picai_prep does.
- `sliding_window`: the T2W field of view reoriented (RAS) and resampled, cropped to its
  foreground; the network then runs on windows (models/pipeline.py).
Each channel is then normalised by its rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    if rule.method == "zscore" and rule.percentile is not None:
        low = np.percentile(a, 100.0 - rule.percentile)
        a = np.clip(a, low, np.percentile(a, rule.percentile))
        mean, spread = np.mean(a), np.std(a)  # numpy scalars, as picai_baseline computes them
        a = (a - mean) / spread if spread > 0 else a * 0.0
    elif rule.method == "zscore":
        std = float(a.std())
        a = (a - float(a.mean())) / (std if std > 1e-6 else 1.0)
    elif rule.method == "zscore_nonzero":
        nonzero = a != 0
        if nonzero.any():
            values = a[nonzero]
            std = float(np.std(values))
            a[nonzero] = (values - np.mean(values)) / (std if std != 0 else 1.0)
    a = a.astype(np.float32, copy=False)
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
    canvas: Volume | None = None  # the box `grid` was cut from (index offset `offset_zyx`)
    offset_zyx: tuple[int, int, int] = (0, 0, 0)
    revert_order: int = 1

    def model_input(self, channels: tuple[str, ...]) -> np.ndarray:
        """(C', Z, Y, X) float32 with the channels a model wants, in its order."""
        missing = [c for c in channels if c not in self.channels]
        if missing:
            raise InputError(f"prepared case lacks channels {missing}; it has {self.channels}")
        return np.ascontiguousarray(self.image[[self.channels.index(c) for c in channels]])

    def to_reference(self, array: np.ndarray, *, order: int | None = None) -> Volume:
        """A model-grid array (Z, Y, X) resampled back onto the T2W grid: first zero-padded
        (or cropped) back into the box it was cut from, when there is one. `order` None: the
        grid's declared revert interpolation."""
        order = self.revert_order if order is None else order
        if self.canvas is None:
            return resample_to_reference(self.grid.with_array(array), self.reference, order=order)
        placed = place_in_box(array, self.canvas.array.shape, self.offset_zyx)
        if order != 0:
            placed = placed.astype(np.float32, copy=False)
        return resample_to_reference(self.canvas.with_array(placed), self.reference, order=order)


_ORDERS = {"linear": 1, "bspline": 3}


def place_in_box(array: np.ndarray, shape_zyx: tuple[int, ...], offset_zyx: Any) -> np.ndarray:
    """`array` put at index `offset_zyx` of a zero box of `shape_zyx` (cropping what falls out)."""
    out = np.zeros(shape_zyx, dtype=array.dtype)
    src, dst = [], []
    for n_out, n_in, off in zip(shape_zyx, array.shape, offset_zyx, strict=True):
        lo, hi = max(off, 0), min(off + n_in, n_out)
        dst.append(slice(lo, hi))
        src.append(slice(lo - off, hi - off))
    out[tuple(dst)] = array[tuple(src)]
    return out


def cut_box(volume: Volume, shape_zyx: tuple[int, int, int], offset_zyx: Any) -> Volume:
    """The sub-box of `volume` of `shape_zyx` starting at index `offset_zyx` (zero-padded where
    it reaches outside), with its geometry."""
    origin = volume.index_to_lps(np.asarray(offset_zyx[::-1], dtype=float))
    return Volume(
        place_in_box(volume.array, shape_zyx, tuple(-o for o in offset_zyx)),
        volume.spacing,
        tuple(float(c) for c in origin),  # type: ignore[arg-type]
        volume.direction,
        volume.series_instance_uid,
        volume.frame_of_reference_uid,
    )


def centre_offset(shape_zyx: tuple[int, ...], size_zyx: tuple[int, ...]) -> tuple[int, ...]:
    """Index of a centred `size_zyx` box in `shape_zyx` (negative: the box pads), as picai_prep's
    `crop_or_pad` places it."""
    return tuple(
        (n - s) // 2 if n >= s else -((s - n) // 2)
        for n, s in zip(shape_zyx, size_zyx, strict=True)
    )


def resample_keeping_type(volume: Volume, reference: Volume, order: int) -> Volume:
    """`volume` on `reference`'s grid, in its own pixel type (SimpleITK's default: values
    clamped to the type's range and truncated), 0 outside, as picai_prep resamples."""
    return reference.with_array(_resample_same_type(volume, reference, order))


def _resample_same_type(volume: Volume, reference: Volume, order: int) -> np.ndarray:
    source = to_sitk(volume)
    ref = sitk.Image(*reference.size, sitk.sitkUInt8)
    ref.SetSpacing(reference.spacing)
    ref.SetOrigin(reference.origin)
    ref.SetDirection(reference.direction)
    out = sitk.Resample(source, ref, sitk.Transform(), _INTERPOLATORS[order], 0.0)
    return sitk.GetArrayFromImage(out)


def spacing_box(volume: Volume, spacing_xyz: Any) -> Volume:
    """The (empty) box over `volume` at `spacing_xyz` on its own origin and direction, sizes
    rounded (picai_prep `resample_img`)."""
    size = [
        int(np.round(n * s_in / s_out))
        for n, s_in, s_out in zip(volume.size, volume.spacing, spacing_xyz, strict=True)
    ]
    return Volume(
        np.zeros(size[::-1], dtype=np.float32),
        tuple(float(s) for s in spacing_xyz),  # type: ignore[arg-type]
        volume.origin,
        volume.direction,
        "",
        volume.frame_of_reference_uid,
    )


def _picai_prep(
    sources: Mapping[str, Volume], spec: InputSpec
) -> tuple[dict[str, np.ndarray], Volume, Volume, tuple[int, int, int]]:
    order = _ORDERS[spec.grid.interpolation]
    cropped: dict[str, Volume] = {}
    for channel in dict.fromkeys(("t2w", *spec.channels)):
        source = sources[channel]
        box = spacing_box(source, spec.spacing_xyz)
        resampled = resample_keeping_type(source, box, order)
        offset = centre_offset(resampled.array.shape, spec.shape_zyx)
        cropped[channel] = cut_box(resampled, spec.shape_zyx, offset)
    grid = cropped["t2w"]
    canvas = spacing_box(sources["t2w"], spec.spacing_xyz)
    offset_t2w = centre_offset(canvas.array.shape, spec.shape_zyx)
    arrays = {
        c: (v if c == "t2w" else resample_keeping_type(v, grid, order)).array
        for c, v in cropped.items()
    }
    empty = grid.with_array(np.zeros(spec.shape_zyx, np.float32))
    return arrays, empty, canvas, offset_t2w  # type: ignore[return-value]


def ras_box(t2w: Volume, spacing_xyz: Any) -> Volume:
    """The (empty) T2W field of view with axes permuted/flipped to point right, anterior,
    superior (MONAI `Orientation("RAS")`) at `spacing_xyz` (MONAI `Spacing`): first voxel
    centre kept, each axis round((n - 1) x old / new) + 1 voxels."""
    d = t2w.direction_matrix
    ras_in_lps = np.array([-1.0, -1.0, 1.0])
    axes = [int(np.argmax(np.abs(d[k, :]))) for k in range(3)]  # array axis nearest L, P, S
    columns, size_in, spacing_in, flips = [], [], [], []
    for k, axis in enumerate(axes):
        sign = float(np.sign(d[k, axis])) * ras_in_lps[k]
        columns.append(d[:, axis] * sign)
        size_in.append(t2w.size[axis])
        spacing_in.append(t2w.spacing[axis])
        flips.append(sign < 0)
    first = np.array([(size_in[k] - 1) if flips[k] else 0 for k in range(3)], dtype=float)
    first_index = np.zeros(3)
    for k, axis in enumerate(axes):
        first_index[axis] = first[k]
    origin = t2w.index_to_lps(first_index)
    size = [
        int(np.round((n - 1) * s_in / s_out)) + 1
        for n, s_in, s_out in zip(size_in, spacing_in, spacing_xyz, strict=True)
    ]
    direction = np.stack(columns, axis=1)
    return Volume(
        np.zeros(size[::-1], dtype=np.float32),
        tuple(float(s) for s in spacing_xyz),  # type: ignore[arg-type]
        tuple(float(c) for c in origin),  # type: ignore[arg-type]
        tuple(float(c) for c in direction.ravel()),  # type: ignore[arg-type]
        "",
        t2w.frame_of_reference_uid,
    )


def foreground_box(image: np.ndarray, margin: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Offset and shape (z, y, x) of the box around voxels > 0 of any channel, + `margin`
    voxels; it may reach outside the image, which is then zero-padded (MONAI >= 1.5
    `CropForeground`, `allow_smaller=False`)."""
    found = np.argwhere((image > 0).any(axis=0))
    if found.size == 0:
        return (0, 0, 0), tuple(image.shape[1:])
    lo = found.min(axis=0) - margin
    hi = found.max(axis=0) + 1 + margin
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi - lo)


def prepare_case(t2w: Volume, adc: Volume, hbv: Volume, spec: InputSpec) -> PreparedCase:
    """Resample t2w/adc/hbv onto the model grid of `spec` and normalise each channel."""
    sources: Mapping[str, Volume] = {"t2w": t2w, "adc": adc, "hbv": hbv}
    canvas: Volume | None = None
    offset: tuple[int, ...] = (0, 0, 0)
    revert = _ORDERS[spec.grid.revert_interpolation]
    if spec.grid.kind == "picai_prep":
        resampled, grid, canvas, offset = _picai_prep(sources, spec)
        arrays = [normalise(resampled[c], spec.normalisation_for(c)) for c in spec.channels]
    elif spec.grid.kind == "sliding_window":
        box = ras_box(t2w, spec.spacing_xyz)
        order = _ORDERS[spec.grid.interpolation]
        arrays = [
            normalise(
                resample_to_reference(sources[c], box, order=order).array,
                spec.normalisation_for(c),
            )
            for c in spec.channels
        ]
        stacked = np.stack(arrays)
        offset, shape = foreground_box(stacked, spec.grid.foreground_margin or 0)
        canvas = box
        arrays = list(place_in_box(stacked, (len(arrays), *shape), (0, *[-o for o in offset])))
        grid = cut_box(box, shape, offset)  # type: ignore[arg-type]
    else:
        grid = model_grid(t2w, spec)
        arrays = [
            normalise(
                resample_to_reference(sources[c], grid, order=1).array, spec.normalisation_for(c)
            )
            for c in spec.channels
        ]
    image = np.stack(arrays).astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise InputError("pre-processed image contains NaN/inf: check the input pixel data")
    return PreparedCase(
        image=image,
        channels=tuple(spec.channels),
        grid=grid,
        reference=t2w,
        canvas=canvas,
        offset_zyx=tuple(offset),  # type: ignore[arg-type]
        revert_order=revert,
    )


def labels_to_grid(labels: Volume, grid: Volume) -> np.ndarray:
    """A label volume (any grid) on the model grid, nearest neighbour, uint8 (training)."""
    return resample_to_reference(labels, grid, order=0).array.astype(np.uint8)
