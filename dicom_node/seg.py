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
from imaging.seg_frames import GLAND_LABEL, frame_slice_indices

MANUFACTURER = "radtriage"
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


def _algorithm(model: ModelRef) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=dc.ARTIFICIAL_INTELLIGENCE,
        version=model.version,
        source=MANUFACTURER,
        parameters={"sha256": model.sha256}
        | ({"version_digest": model.digest} if model.digest else {}),
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
