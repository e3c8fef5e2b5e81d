"""Small, real-geometry classic MR studies for SR/SEG tests (built with pydicom, in memory).

A study has three axial series (t2w, adc, hbv) sharing one Frame of Reference, and a
`Prediction` whose masks lie on the T2W grid. The T2W axes are tilted slightly so that geometry
bugs (x/y swaps, LPS signs) show up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from core.domain import Lesion, ModelRef, Prediction, Volume

DEMO_MODEL = ModelRef(name="cspca_detector", version="1.2.0", sha256="ab" * 32)
CLINICAL_MODEL = ModelRef(
    name="cspca_detector", version="2.0.0", sha256="cd" * 32, clinical_use=True
)


@dataclass(frozen=True)
class SeriesGeometry:
    rows: int
    columns: int
    slices: int
    spacing_xyz: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # ITK row-major; columns are the x, y, z axes


def _tilted_direction(degrees: float) -> tuple[float, ...]:
    a = np.deg2rad(degrees)
    x = np.array([np.cos(a), np.sin(a), 0.0])
    y = np.array([-np.sin(a), np.cos(a), 0.0])
    z = np.cross(x, y)
    return tuple(float(v) for v in np.stack([x, y, z], axis=1).ravel())


T2W_GEOMETRY = SeriesGeometry(
    rows=40,
    columns=48,
    slices=8,
    spacing_xyz=(0.8, 0.8, 3.0),
    origin=(-19.2, -16.0, -12.0),
    direction=_tilted_direction(5.0),
)
DWI_GEOMETRY = SeriesGeometry(
    rows=16,
    columns=20,
    slices=6,
    spacing_xyz=(2.0, 2.0, 3.6),
    origin=(-20.0, -16.0, -12.0),
    direction=_tilted_direction(5.0),
)


def _series(
    study: Dataset,
    geometry: SeriesGeometry,
    *,
    series_number: int,
    description: str,
    rng: np.random.Generator,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND"),
) -> list[Dataset]:
    series_uid = generate_uid()
    d = np.asarray(geometry.direction).reshape(3, 3)
    sx, sy, sz = geometry.spacing_xyz
    out = []
    for k in range(geometry.slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
            "StudyID",
            "StudyDate",
            "StudyTime",
            "AccessionNumber",
            "ReferringPhysicianName",
            "FrameOfReferenceUID",
        ):
            setattr(ds, keyword, getattr(study, keyword))
        ds.Modality = "MR"
        ds.Manufacturer = "SIEMENS"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImageType = list(image_type)
        ds.BodyPartExamined = "PROSTATE"
        ds.PositionReferenceIndicator = ""
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTrainLength = 1
        ds.SliceThickness = sz
        ds.SpacingBetweenSlices = sz
        ds.PixelSpacing = [sy, sx]  # row spacing (y), column spacing (x)
        ds.ImageOrientationPatient = [float(v) for v in (*d[:, 0], *d[:, 1])]
        ipp = np.asarray(geometry.origin) + d[:, 2] * sz * k
        ds.ImagePositionPatient = [round(float(v), 6) for v in ipp]
        ds.SliceLocation = round(float(ipp @ d[:, 2]), 6)
        ds.Rows = geometry.rows
        ds.Columns = geometry.columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        pixels = rng.integers(0, 4000, size=(geometry.rows, geometry.columns), dtype=np.uint16)
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


def make_study(seed: int = 0, *, patient_id: str = "RT-TEST-001") -> dict[str, list[Dataset]]:
    """A bpMRI study: role -> the series' datasets (slice order)."""
    rng = np.random.default_rng(seed)
    study = Dataset()
    study.PatientName = "Phantom^Prostate"
    study.PatientID = patient_id
    study.PatientBirthDate = "19570101"
    study.PatientSex = "M"
    study.StudyInstanceUID = generate_uid()
    study.StudyID = "1"
    study.StudyDate = "20240102"
    study.StudyTime = "101500"
    study.AccessionNumber = "ACC0001"
    study.ReferringPhysicianName = "Referrer^Rita"
    study.FrameOfReferenceUID = generate_uid()
    return {
        "t2w": _series(study, T2W_GEOMETRY, series_number=3, description="t2_tse_tra", rng=rng),
        "adc": _series(
            study,
            DWI_GEOMETRY,
            series_number=5,
            description="ep2d_diff_tra_ADC",
            rng=rng,
            image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC"),
        ),
        "hbv": _series(
            study,
            DWI_GEOMETRY,
            series_number=6,
            description="ep2d_diff_tra_CALC_BVAL",
            rng=rng,
            image_type=("DERIVED", "PRIMARY", "DIFFUSION", "CALC_BVALUE", "TRACEW"),
        ),
    }


def t2w_volume(series: list[Dataset], array: np.ndarray) -> Volume:
    """A Volume with the geometry of the T2W fixture series (array indexed [z, y, x])."""
    g = T2W_GEOMETRY
    return Volume(
        array,
        g.spacing_xyz,
        g.origin,
        g.direction,
        series_instance_uid=series[0].SeriesInstanceUID,
        frame_of_reference_uid=series[0].FrameOfReferenceUID,
    )


def _ellipsoid(
    shape: tuple[int, int, int], centre: tuple[float, float, float], radii
) -> np.ndarray:
    z, y, x = np.indices(shape, dtype=float)
    cz, cy, cx = centre
    rz, ry, rx = radii
    return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def make_prediction(
    t2w: list[Dataset], *, positive: bool = True, with_masks: bool = True
) -> Prediction:
    """Gland + (when positive) two lesions on the T2W grid, with volumes and centroids computed
    from the masks exactly as a postprocessor would."""
    g = T2W_GEOMETRY
    shape = (g.slices, g.rows, g.columns)
    gland = _ellipsoid(shape, (3.5, 20, 24), (3.2, 12, 14)).astype(np.uint8)
    base = t2w_volume(t2w, np.zeros(shape, dtype=np.uint8))
    gland_ml = float(gland.sum()) * base.voxel_volume_ml
    if not positive:
        return Prediction(
            case_likelihood=0.07,
            lesions=(),
            gland_volume_ml=gland_ml,
            gland_mask=base.with_array(gland) if with_masks else None,
            lesion_labels=base.with_array(np.zeros(shape, np.uint8)) if with_masks else None,
        )
    labels = np.zeros(shape, dtype=np.uint8)
    labels[_ellipsoid(shape, (2, 25, 18), (1.2, 3, 3))] = 1
    labels[_ellipsoid(shape, (5, 14, 30), (1.0, 2, 2))] = 2
    lesions = []
    spec = {1: (0.91, "PZpl-R-mid", "ai_high"), 2: (0.42, "TZa-L-apex", "ai_low")}
    for label, (likelihood, sector, category) in spec.items():
        idx = np.argwhere(labels == label)  # (z, y, x)
        centroid = base.index_to_lps(idx[:, ::-1].mean(axis=0))
        lesions.append(
            Lesion(
                likelihood=likelihood,
                volume_ml=float(len(idx)) * base.voxel_volume_ml,
                centroid_mm=tuple(float(v) for v in centroid),
                sector=sector,
                category=category,
                label=label,
            )
        )
    return Prediction(
        case_likelihood=0.91,
        lesions=tuple(lesions),
        gland_volume_ml=gland_ml,
        gland_mask=base.with_array(gland) if with_masks else None,
        lesion_labels=base.with_array(labels) if with_masks else None,
    )
