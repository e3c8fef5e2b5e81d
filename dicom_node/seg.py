"""DICOM Segmentation (SEG) of the AI's gland and lesion masks, built with highdicom.

Segments, in this order, each with a deterministic Tracking UID that the SR's measurement
groups reuse (`segment_tracking_uid`):

1. ``Prostate gland`` (Anatomical Structure / Prostate), when `Prediction.gland_mask` has voxels;
2. ``AI lesion N`` (Morphologically Abnormal Structure / Lesion) for the N-th lesion of
   `Prediction.lesions` whose label is present in `Prediction.lesion_labels`.

The masks must lie on the T2W grid (`core.domain.Volume` geometry); each SEG frame references
the T2W source image at the same position, so viewers overlay it on the T2W series.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from core.domain import ModelRef, Prediction, Volume
from core.errors import GeometryError, InputError
from dicom_node import dicom_codes as dc

MANUFACTURER = "radtriage"
GLAND_LABEL = "Prostate gland"
_POSITION_TOLERANCE = 0.25  # voxels
# Recommended Display CIELab Value: viewers (OHIF/cornerstone, dcmqi) colour segments by it
GLAND_COLOR = hd.color.CIELabColor(70.0, -35.0, 25.0)  # green
LESION_COLOR = hd.color.CIELabColor(55.0, 70.0, 50.0)  # red


@contextmanager
def copying_source_names() -> Iterator[None]:
    """Silence highdicom's person-name style warning for names we copy verbatim from the
    source images (e.g. ``ProstateX-0001``): not ours to fix, and PACS accept them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
        yield


def stable_uid(*parts: str) -> str:
    """A deterministic UID (``2.25.<int>``) from `parts`: same parts, same UID.

    Used for every UID radtriage writes so that re-sending the same result is idempotent.
    """
    if not parts:
        raise ValueError("stable_uid needs at least one part")
    return str(hd.UID.from_uuid(_uuid_for(parts)))


def _uuid_for(parts: Sequence[str]) -> str:
    import hashlib
    import uuid

    digest = hashlib.sha256("\x1f".join(("radtriage", *parts)).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def segment_tracking_uid(
    study_instance_uid: str, model: ModelRef, kind: str, index: int = 0
) -> str:
    """Tracking UID shared by a SEG segment and its SR measurement group.

    `kind` is ``"gland"`` or ``"lesion"``; `index` is the lesion's position in
    `Prediction.lesions` / `TriageResult.lesions`.
    """
    return stable_uid("tracking", study_instance_uid, model.sha256, kind, str(index))


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


def _algorithm(model: ModelRef) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=dc.ARTIFICIAL_INTELLIGENCE,
        version=model.version,
        source=MANUFACTURER,
        parameters={"sha256": model.sha256},
    )


def build_seg(
    source_images: Sequence[Dataset],
    prediction: Prediction,
    model: ModelRef,
    *,
    series_number: int = 9901,
) -> hd.seg.Segmentation | None:
    """SEG with the gland and each lesion as binary segments on the T2W frame of reference.

    `source_images`: the T2W series (single-frame datasets, or one multi-frame image), with
    pixel data or at least full geometry. Returns None when the prediction has no non-empty
    mask. UIDs are deterministic in (study, model, masks): rebuilding gives the same SEG.
    """
    if not source_images:
        raise InputError("build_seg needs the T2W source images; got none")
    masks: list[tuple[np.ndarray, hd.seg.SegmentDescription]] = []
    study_uid = str(source_images[0].StudyInstanceUID)
    algorithm = _algorithm(model)
    grid: Volume | None = None

    if prediction.gland_mask is not None and prediction.gland_mask.array.any():
        grid = prediction.gland_mask
        masks.append(
            (
                prediction.gland_mask.array > 0,
                hd.seg.SegmentDescription(
                    segment_number=len(masks) + 1,
                    segment_label=GLAND_LABEL,
                    segmented_property_category=dc.ANATOMICAL_STRUCTURE,
                    segmented_property_type=dc.PROSTATE,
                    algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                    algorithm_identification=algorithm,
                    tracking_uid=segment_tracking_uid(study_uid, model, "gland"),
                    tracking_id="prostate gland",
                    display_color=GLAND_COLOR,
                ),
            )
        )
    if prediction.lesion_labels is not None:
        labels = prediction.lesion_labels.array
        if grid is not None and (
            labels.shape != grid.array.shape
            or not np.allclose(prediction.lesion_labels.affine(), grid.affine(), atol=1e-3)
        ):
            raise GeometryError("gland mask and lesion labels are on different grids")
        for i, lesion in enumerate(prediction.lesions):
            mask = labels == lesion.label
            if lesion.label == 0 or not mask.any():
                continue
            grid = prediction.lesion_labels
            masks.append(
                (
                    mask,
                    hd.seg.SegmentDescription(
                        segment_number=len(masks) + 1,
                        segment_label=f"AI lesion {i + 1}",
                        segmented_property_category=dc.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
                        segmented_property_type=dc.LESION,
                        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                        algorithm_identification=algorithm,
                        tracking_uid=segment_tracking_uid(study_uid, model, "lesion", i),
                        tracking_id=f"AI lesion {i + 1}",
                        anatomic_regions=[dc.PROSTATE],
                        display_color=LESION_COLOR,
                    ),
                )
            )
    if grid is None or not masks:
        return None

    z_of_frame = frame_slice_indices(source_images, grid)
    stack = np.stack([m for m, _ in masks], axis=-1)  # (z, y, x, segments)
    pixel_array = stack[z_of_frame].astype(np.uint8)  # (frames, rows, cols, segments)
    if len(source_images) == 1 and pixel_array.shape[0] == 1:
        pixel_array = pixel_array[0]

    import hashlib

    fingerprint = hashlib.sha256(np.ascontiguousarray(pixel_array).tobytes()).hexdigest()
    series_uid = stable_uid("seg-series", study_uid, model.sha256, fingerprint)
    disclaimer = " NOT FOR CLINICAL USE" if not model.clinical_use else ""
    with copying_source_names():
        return hd.seg.Segmentation(
            source_images=list(source_images),
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[d for _, d in masks],
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=stable_uid("seg", series_uid),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=model.name[:64],
            software_versions=model.version[:64],
            device_serial_number=(model.sha256 or "unknown")[:64],
            content_label="AI_CSPCA",
            content_description=f"AI csPCa lesions and gland.{disclaimer}"[:64],
            series_description=f"AI csPCa segmentation{disclaimer}"[:64],
            content_creator_name=None,
        )
