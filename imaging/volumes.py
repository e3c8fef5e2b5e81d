"""Build a `core.domain.Volume` from a series: classic MR or Enhanced MR, any decodable syntax.

Slices are sorted along the slice normal (cross product of the ImageOrientationPatient cosines);
slice spacing comes from the positions, never from SliceThickness; geometry is LPS in the ITK
convention of `core.domain`. Every failure is a `core.errors` error saying what to fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from core.domain import Volume
from core.errors import (
    GeometryError,
    InconsistentSpacingError,
    MalformedDicomError,
    MissingSlicesError,
    MixedOrientationError,
    NotMRError,
    RadtriageError,
    UndecodablePixelDataError,
)
from imaging.study_reader import FrameInfo, InstanceInfo, SeriesInfo, read_header

ORIENTATION_TOLERANCE = 1e-3  # direction cosines
SPACING_RELATIVE_TOLERANCE = 0.02  # slice steps may differ by 2 % (+ 0.01 mm) from the mean
POSITION_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class StackGeometry:
    """Geometry of a sorted slice stack; `order` indexes the input frames, first slice first."""

    order: tuple[int, ...]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def n_slices(self) -> int:
        return len(self.order)


def _label(series: SeriesInfo) -> str:
    b = f" b={series.b_value:g}" if series.b_value is not None else ""
    return f"series {series.series_number} '{series.series_description}'{b}"


def _single_slice_thickness(headers: Dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(headers.get(keyword) or 0)
        except (TypeError, ValueError):
            value = 0.0
        if value > 0:
            return value
    shared = headers.get("SharedFunctionalGroupsSequence")
    if shared and "PixelMeasuresSequence" in shared[0]:
        try:
            value = float(shared[0].PixelMeasuresSequence[0].get("SliceThickness") or 0)
        except (TypeError, ValueError):
            value = 0.0
        if value > 0:
            return value
    return 1.0


def stack_geometry(
    frames: list[tuple[InstanceInfo, FrameInfo]],
    *,
    label: str = "series",
    headers: Dataset | None = None,
) -> StackGeometry:
    """Sort frames into one regular stack and return its geometry, or raise a GeometryError."""
    if not frames:
        raise GeometryError(f"{label}: no image frames")
    missing = [
        name
        for name, ok in (
            ("ImagePositionPatient", all(f.image_position for _, f in frames)),
            ("ImageOrientationPatient", all(f.image_orientation for _, f in frames)),
            ("PixelSpacing", all(f.pixel_spacing for _, f in frames)),
        )
        if not ok
    ]
    if missing:
        raise GeometryError(
            f"{label}: {', '.join(missing)} missing on some frames; the series has no patient "
            "geometry and cannot form a volume"
        )
    orientations = np.array([f.image_orientation for _, f in frames], dtype=float)
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise MixedOrientationError(
            f"{label}: slices have different ImageOrientationPatient (a localizer or a mixed "
            "series); send a single-orientation series"
        )
    row = orientations[0, :3] / np.linalg.norm(orientations[0, :3])
    col = orientations[0, 3:] / np.linalg.norm(orientations[0, 3:])
    if abs(float(row @ col)) > 1e-2:
        raise GeometryError(f"{label}: ImageOrientationPatient row and column are not orthogonal")
    col = col - (row @ col) * row
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)

    spacings = np.array([f.pixel_spacing for _, f in frames], dtype=float)
    grids = {(i.rows, i.columns) for i, _ in frames}
    if len(grids) > 1 or np.abs(spacings - spacings[0]).max() > 1e-4 * spacings[0].max():
        raise InconsistentSpacingError(
            f"{label}: slices have different Rows/Columns or PixelSpacing ({sorted(grids)}); "
            "the series mixes pixel grids"
        )
    if spacings[0].min() <= 0:
        raise GeometryError(f"{label}: PixelSpacing {tuple(spacings[0])} is not positive")

    positions = np.array([f.image_position for _, f in frames], dtype=float)
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    distance = distance[order]
    steps = np.diff(distance)
    if len(steps) and steps.min() < POSITION_TOLERANCE_MM:
        n_positions = len(np.unique(np.round(distance, 2)))
        raise GeometryError(
            f"{label}: {len(frames)} frames at only {n_positions} slice positions (a 4D, "
            "multi-echo or multi-b-value series that is not split); cannot form one volume"
        )
    origin = positions[order[0]]
    if len(frames) > 1:
        in_plane = (positions[order] - origin) @ np.stack([row, col]).T
        if np.abs(in_plane).max() > max(0.05 * spacings[0].min(), POSITION_TOLERANCE_MM):
            raise InconsistentSpacingError(
                f"{label}: slice positions drift in-plane by up to {np.abs(in_plane).max():.2f} mm"
                " (sheared stack); cannot form a regular volume"
            )
        step = float(np.median(steps))
        tolerance = SPACING_RELATIVE_TOLERANCE * step + POSITION_TOLERANCE_MM
        irregular = np.abs(steps - step) > tolerance
        if irregular.any():
            ratios = steps[irregular] / step
            if np.all(np.abs(ratios - np.round(ratios)) * step <= tolerance) and np.all(
                np.round(ratios) >= 2
            ):
                gaps = int(np.sum(np.round(ratios) - 1))
                raise MissingSlicesError(
                    f"{label}: {gaps} slice(s) missing (gaps of {steps[irregular].max():.3g} mm "
                    f"in a {step:.3g} mm stack); resend the complete series"
                )
            raise InconsistentSpacingError(
                f"{label}: irregular slice spacing ({steps.min():.3g}..{steps.max():.3g} mm); "
                "cannot form a regular volume"
            )
        z_spacing = float((distance[-1] - distance[0]) / (len(distance) - 1))
    else:
        z_spacing = _single_slice_thickness(headers if headers is not None else Dataset())
    direction = np.stack([row, col, normal], axis=1)  # columns: x, y, z axes
    return StackGeometry(
        order=tuple(int(i) for i in order),
        spacing=(float(spacings[0][1]), float(spacings[0][0]), z_spacing),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=tuple(float(v) for v in direction.reshape(-1)),
    )


def expected_slice_count(headers: Dataset) -> int | None:
    """ImagesInAcquisition (0020,1002) where present and positive."""
    try:
        value = int(headers.get("ImagesInAcquisition") or 0)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def check_slice_count(series: SeriesInfo, geometry: StackGeometry) -> None:
    """Raise MissingSlicesError when ImagesInAcquisition says more slices than we have."""
    expected = expected_slice_count(series.headers)
    if series.b_value is None and expected is not None and geometry.n_slices < expected:
        raise MissingSlicesError(
            f"{_label(series)}: {geometry.n_slices} slices but ImagesInAcquisition is "
            f"{expected}; wait for or resend the missing instances"
        )


def series_geometry(series: SeriesInfo) -> StackGeometry:
    """Geometry of a series from its headers alone (no pixel data is read)."""
    geometry = stack_geometry(series.frames, label=_label(series), headers=series.headers)
    check_slice_count(series, geometry)
    return geometry


def _rescale(ds: Dataset, frame_index: int) -> tuple[float, float]:
    """(slope, intercept) of a frame: per-frame/shared Pixel Value Transformation, else classic."""
    holders: list[Dataset] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        holders.append(per_frame[frame_index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        holders.append(shared[0])
    for holder in holders:
        seq = holder.get("PixelValueTransformationSequence")
        if seq:
            item = seq[0]
            slope = float(item.get("RescaleSlope") or 1.0)
            return slope, float(item.get("RescaleIntercept") or 0.0)
    return float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0)


def _decode(ds: Dataset, inst: InstanceInfo) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UndecodablePixelDataError(f"{inst.path}: no pixel data in the instance")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise UndecodablePixelDataError(
            f"{inst.path}: colour pixel data (SamplesPerPixel={ds.SamplesPerPixel}) cannot be "
            "used as an MR volume"
        )
    try:
        array = ds.pixel_array
    except Exception as exc:
        raise UndecodablePixelDataError(
            f"{inst.path}: pixel data in transfer syntax {inst.transfer_syntax_uid or '?'} cannot "
            f"be decoded ({type(exc).__name__}: {exc}); send it uncompressed or in a syntax the "
            "installed pylibjpeg plugins support"
        ) from exc
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.shape != (inst.number_of_frames, inst.rows, inst.columns):
        raise UndecodablePixelDataError(
            f"{inst.path}: decoded pixel data has shape {array.shape}, expected "
            f"{(inst.number_of_frames, inst.rows, inst.columns)}"
        )
    return array


def load_volume_with_headers(series: SeriesInfo) -> tuple[Volume, list[Dataset]]:
    """Like `load_volume`, also returning the instances' datasets without their pixel data."""
    label = _label(series)
    if series.modality.upper() != "MR":
        raise NotMRError(
            f"{label}: Modality is '{series.modality}', not MR; radtriage analyses prostate MRI"
        )
    frames = series.frames
    geometry = stack_geometry(frames, label=label, headers=series.headers)
    check_slice_count(series, geometry)

    slices: dict[int, np.ndarray] = {}
    rescales: dict[int, tuple[float, float]] = {}
    headers: list[Dataset] = []
    wanted: dict[str, list[int]] = {}
    for k, (inst, _frame) in enumerate(frames):
        wanted.setdefault(inst.sop_instance_uid, []).append(k)
    for inst in series.instances:
        ks = wanted.get(inst.sop_instance_uid)
        if not ks:
            continue
        ds = read_header(inst.path, stop_before_pixels=False)
        array = _decode(ds, inst)
        for k in ks:
            frame = frames[k][1]
            slices[k] = array[frame.index]
            rescales[k] = _rescale(ds, frame.index)
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                delattr(ds, keyword)
        headers.append(ds)
    stack = np.stack([slices[k] for k in geometry.order])
    transforms = [rescales[k] for k in geometry.order]
    if any(t != (1.0, 0.0) for t in transforms):
        slope = np.array([t[0] for t in transforms], dtype=np.float32)[:, None, None]
        intercept = np.array([t[1] for t in transforms], dtype=np.float32)[:, None, None]
        stack = stack.astype(np.float32) * slope + intercept
    try:
        volume = Volume(
            stack,
            geometry.spacing,
            geometry.origin,
            geometry.direction,
            series_instance_uid=series.series_instance_uid,
            frame_of_reference_uid=str(series.headers.get("FrameOfReferenceUID") or ""),
        )
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{label}: {exc}") from exc
    return volume, headers


def load_volume(series: SeriesInfo) -> Volume:
    """The series as one 3D volume (array [z, y, x], LPS geometry), rescaled to stored units.

    Raises NotMRError, GeometryError subclasses, UndecodablePixelDataError or MalformedDicomError.
    """
    try:
        return load_volume_with_headers(series)[0]
    except RadtriageError:
        raise
    except Exception as exc:  # a reader bug must still surface as a clean, typed error
        raise MalformedDicomError(
            f"{_label(series)}: cannot build a volume ({type(exc).__name__}: {exc})"
        ) from exc
