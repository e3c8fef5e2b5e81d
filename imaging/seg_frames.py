"""Placing Segmentation frames on the series they were made on: which slice of a volume each
source image (or Enhanced MR frame) shows, and a SEG's segments as masks on that volume's grid.
Shared by SEG writing (`dicom_node.seg`), the key images and the feedback dataset."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from core.domain import Volume
from core.errors import GeometryError

GLAND_LABEL = "Prostate gland"
_POSITION_TOLERANCE = 0.25  # voxels


def _frame_positions(source_images: Sequence[Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """(IPP per frame (n, 3), IOP per frame (n, 6)) of a single-frame series or one
    multi-frame (Enhanced MR) image."""
    if len(source_images) == 1 and int(source_images[0].get("NumberOfFrames", 1) or 1) > 1:
        ds = source_images[0]
        shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        ipps, iops = [], []
        for frame in ds.PerFrameFunctionalGroupsSequence:
            pos = frame.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
            ori = frame.get("PlaneOrientationSequence") or shared.get("PlaneOrientationSequence")
            if not pos or not ori:
                raise GeometryError(
                    "multi-frame source image lacks Plane Position/Orientation per frame; "
                    "cannot place SEG frames"
                )
            ipps.append([float(v) for v in pos[0].ImagePositionPatient])
            iops.append([float(v) for v in ori[0].ImageOrientationPatient])
        return np.asarray(ipps), np.asarray(iops)
    try:
        ipps = [[float(v) for v in ds.ImagePositionPatient] for ds in source_images]
        iops = [[float(v) for v in ds.ImageOrientationPatient] for ds in source_images]
    except AttributeError as exc:
        raise GeometryError(
            f"source image lacks {exc.name or 'geometry'}; pass the T2W series datasets with "
            "ImagePositionPatient and ImageOrientationPatient"
        ) from exc
    return np.asarray(ipps), np.asarray(iops)


def segment_masks(
    seg: Dataset, source_images: Sequence[Dataset], grid: Volume, *, strict: bool
) -> dict[int, np.ndarray]:
    """{segment number: bool mask on `grid`} of a SEG whose frames reference `source_images`
    (the series `grid` was read from). A frame referencing another image is skipped, or, when
    `strict`, a GeometryError (the SEG was made on other images)."""
    z_of_sop = dict(
        zip(
            (str(ds.SOPInstanceUID) for ds in source_images),
            frame_slice_indices(source_images, grid),
            strict=True,
        )
    )
    shape = grid.array.shape
    masks = {int(s.SegmentNumber): np.zeros(shape, dtype=bool) for s in seg.SegmentSequence}
    frames = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        z = z_of_sop.get(str(source.ReferencedSOPInstanceUID))
        if z is None:
            if strict:
                raise GeometryError("the SEG references images outside the series given")
            continue
        if number in masks:
            masks[number][z] |= frames[i].astype(bool)
    return masks


def frame_slice_indices(source_images: Sequence[Dataset], grid: Volume) -> list[int]:
    """For each source frame, the z index of `grid` it shows.

    Raises GeometryError when the source frames do not lie on the grid (other orientation,
    other in-plane size, or positions between slices).
    """
    rows = {int(ds.Rows) for ds in source_images}
    cols = {int(ds.Columns) for ds in source_images}
    nx, ny, nz = grid.size
    if rows != {ny} or cols != {nx}:
        raise GeometryError(
            f"source images are {sorted(rows)}x{sorted(cols)} (rows x columns) but the masks are "
            f"{ny}x{nx}; masks must be on the T2W grid"
        )
    ipps, iops = _frame_positions(source_images)
    d = grid.direction_matrix
    expected_iop = np.concatenate([d[:, 0], d[:, 1]])
    if not np.allclose(iops, expected_iop[None, :], atol=1e-3):
        raise GeometryError(
            "source image orientation differs from the mask grid direction; masks must be on "
            "the T2W grid"
        )
    to_index = np.linalg.inv(d @ np.diag(grid.spacing))
    idx = (ipps - np.asarray(grid.origin)) @ to_index.T  # (n, 3) continuous (x, y, z)
    z = np.rint(idx[:, 2]).astype(int)
    off = np.abs(idx - np.stack([np.zeros_like(z), np.zeros_like(z), z], axis=1))
    if (off > _POSITION_TOLERANCE).any() or (z < 0).any() or (z >= nz).any():
        raise GeometryError(
            "source image positions do not coincide with the mask grid's slices; masks must be "
            "on the T2W grid of these source images"
        )
    return [int(v) for v in z]
