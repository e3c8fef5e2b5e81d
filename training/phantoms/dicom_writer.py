"""Write a `PhantomCase` as a vendor-flavoured DICOM study with its ground truth.

Layout of a study folder::

    <out_dir>/<case_id>/
        <SeriesNumber>_<key>/IM0001.dcm ...   classic MR: one file per slice
        <SeriesNumber>_<key>/IM0001.dcm       Enhanced MR: one multi-frame file per series
        ground_truth.json
        masks/gland.mha, masks/zones.mha, masks/lesions.mha   (T2W grid, SimpleITK)

The phantoms are *input* data (what a scanner would send), so they are written with pydicom like a
scanner would; radtriage's own outputs (SR, SEG) are built with highdicom elsewhere.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import DSfloat

from core.domain import Volume
from core.progress import progress
from training.phantoms.anatomy import (
    HIGH_B_VALUE,
    Grid,
    PhantomCase,
    _rng,
    render_t2w,
    synthesize_case,
)
from training.phantoms.vendors import FLAVOURS, Flavour, SeriesStyle


@dataclass(frozen=True)
class Frame:
    """One 2D image of a series with its position in the patient."""

    pixels: np.ndarray  # [rows, columns] uint16
    position: tuple[float, float, float]  # ImagePositionPatient, LPS mm
    row_dir: tuple[float, float, float]  # first triplet of ImageOrientationPatient
    col_dir: tuple[float, float, float]
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    thickness: float
    b_value: float | None = None
    temporal_position: int | None = None  # 1-based phase of a dynamic series


@dataclass(frozen=True)
class SeriesData:
    key: str
    style: SeriesStyle
    series_instance_uid: str
    frames: list[Frame]
    kind: str  # "t2" | "dwi" | "adc" | "loc" | "dce": sets sequence parameters
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImagingRequest:
    """The order behind the exam, as the RIS puts it into the images."""

    issued: dt.date  # Issue Date of Imaging Service Request (0040,2004): the waiting-list clock
    priority: str = "ROUTINE"  # Requested Procedure Priority (0040,1003): STAT|HIGH|MEDIUM|...


# Acquisition parameters per kind: ScanningSequence, SequenceVariant, TR, TE, ETL, flip angle.
_SEQUENCE: dict[str, tuple[list[str], list[str], float, float, int, float]] = {
    "t2": (["SE"], ["SK", "SP", "OSP"], 5660.0, 104.0, 25, 160.0),
    "dwi": (["EP"], ["SK", "SP"], 2700.0, 63.0, 48, 90.0),
    "adc": (["EP"], ["SK", "SP"], 2700.0, 63.0, 48, 90.0),
    "loc": (["GR"], ["SP"], 8.6, 4.0, 1, 20.0),
    "dce": (["GR"], ["SP", "SS"], 4.5, 1.6, 1, 12.0),
}

# Dynamic contrast-enhanced T1 (a distractor: never an input of the models).
DCE_PHASES = 6
DCE_PHASE_S = 12.0  # temporal resolution
DCE_AGENT = "Gadobutrol"


def ds_list(values: Sequence[float]) -> list[DSfloat]:
    return [DSfloat(float(v), auto_format=True) for v in values]


def volume_frames(vol: Volume, b_value: float | None = None) -> list[Frame]:
    """Slices of a volume as frames, in slice order (ITK z index)."""
    d = vol.direction_matrix
    sx, sy, sz = vol.spacing
    origin = np.asarray(vol.origin)
    frames = []
    for k in range(vol.array.shape[0]):
        pos = origin + d[:, 2] * sz * k
        frames.append(
            Frame(
                pixels=np.clip(np.round(vol.array[k]), 0, 65535).astype(np.uint16),
                position=(float(pos[0]), float(pos[1]), float(pos[2])),
                row_dir=tuple(float(v) for v in d[:, 0]),  # type: ignore[arg-type]
                col_dir=tuple(float(v) for v in d[:, 1]),  # type: ignore[arg-type]
                pixel_spacing=(sy, sx),
                thickness=sz,
                b_value=b_value,
            )
        )
    return frames


def _view(
    case: PhantomCase, axes: np.ndarray, size: tuple[int, int, int], spacing: tuple, key: str
) -> Volume:
    """Render the anatomy on a grid with the given (un-tilted) axes, tilted like the exam."""
    tilt = case.t2w.direction_matrix
    centre = case.t2w.index_to_lps((np.asarray(case.t2w.size) - 1) / 2)
    grid = Grid.centred(centre, size, spacing, tilt @ axes)
    rng = _rng("view", case.seed, case.vendor, key)
    return grid.volume(render_t2w(case, grid, rng))


_SAG = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # cols: +P, -S(down), -L
_COR = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # cols: +L, -S(down), +P
_AX = np.eye(3)


def _dce_frames(case: PhantomCase) -> list[Frame]:
    """A low-resolution axial T1 dynamic: every slice at each of `DCE_PHASES` time points, the
    gland enhancing after the bolus (wash-in), with fresh noise per phase."""
    base = _view(case, _AX, (128, 128, 16), (1.5, 1.5, 3.0), "dce")
    rng = _rng("dce", case.seed, case.vendor)
    frames = []
    for phase in range(1, DCE_PHASES + 1):
        uptake = 1.0 + 0.9 * (1.0 - np.exp(-max(phase - 2, 0) / 1.5))  # bolus after phase 2
        noise = rng.normal(0, 6.0, base.array.shape).astype(np.float32)
        vol = base.with_array(np.clip(0.5 * base.array * uptake + noise, 0, 4095))
        frames += [replace(f, temporal_position=phase) for f in volume_frames(vol)]
    return frames


def plan_series(
    case: PhantomCase, *, distractors: bool = True, dce: bool = False
) -> list[SeriesData]:
    """Every series of the exam as frames, in acquisition order (`dce`: add a DCE series)."""
    flavour = FLAVOURS[case.vendor]
    st = flavour.series
    out: list[SeriesData] = []
    if distractors:
        loc = [
            volume_frames(_view(case, axes, (256, 256, 1), (1.2, 1.2, 8.0), f"loc{i}"))[0]
            for i, axes in enumerate((_AX, _SAG, _COR))
        ]
        out.append(SeriesData("localizer", st["localizer"], case.uid("localizer"), loc, "loc"))
        n = 320 if case.t2w.spacing[0] < 0.6 else 288
        sp = (0.6, 0.6, 3.6)
        for key, axes in (("t2w_sag", _SAG), ("t2w_cor", _COR)):
            vol = _view(case, axes, (n, n, 19), sp, key)
            out.append(SeriesData(key, st[key], case.uid(key), volume_frames(vol), "t2"))
    out.append(
        SeriesData("t2w", st["t2w"], case.t2w.series_instance_uid, volume_frames(case.t2w), "t2")
    )
    dwi_frames = [f for b, vol in sorted(case.dwi.items()) for f in volume_frames(vol, b)]
    dwi_uid = next(iter(case.dwi.values())).series_instance_uid
    out.append(SeriesData("dwi", st["dwi"], dwi_uid, dwi_frames, "dwi"))
    out.append(
        SeriesData("adc", st["adc"], case.adc.series_instance_uid, volume_frames(case.adc), "adc")
    )
    out.append(
        SeriesData(
            "hbv",
            st["hbv"],
            case.hbv.series_instance_uid,
            volume_frames(case.hbv, HIGH_B_VALUE),
            "adc",
        )
    )
    if distractors:
        rng = _rng("repeat", case.seed, case.vendor)
        noise = rng.normal(0, 8.0, case.t2w.array.shape).astype(np.float32)
        repeat = case.t2w.with_array(np.clip(case.t2w.array + noise, 0, 4095))
        out.append(
            SeriesData(
                "t2w_repeat", st["t2w_repeat"], case.uid("t2w_repeat"), volume_frames(repeat), "t2"
            )
        )
    if dce:
        out.append(SeriesData("dce", st["dce"], case.uid("dce"), _dce_frames(case), "dce"))
    return out


# --- common attributes ---------------------------------------------------------------------


def study_datetime(case: PhantomCase) -> dt.datetime:
    day = dt.date(2019, 1, 7) + dt.timedelta(days=abs(case.seed) % 1500)
    return dt.datetime.combine(day, dt.time(8, 0)) + dt.timedelta(minutes=abs(case.seed) % 540)


def base_dataset(case: PhantomCase, flavour: Flavour, series: SeriesData) -> Dataset:
    """Patient, study, series, frame-of-reference and equipment attributes shared by a series."""
    when = study_datetime(case)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = (when + dt.timedelta(minutes=2 * series.style.number % 60)).strftime("%H%M%S")
    ds.AccessionNumber = f"PH{abs(case.seed):08d}"
    ds.Modality = "MR"
    ds.Manufacturer = flavour.manufacturer
    ds.InstitutionName = "radtriage synthetic phantoms"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MRI PROSTATE bpMRI (synthetic)"
    ds.SeriesDescription = series.style.description
    ds.ManufacturerModelName = flavour.model
    ds.PatientName = f"PHANTOM^{case.case_id.upper()}"
    ds.PatientID = case.case_id.upper()
    birth = when.date().replace(year=when.year - case.age, day=1)
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = "M"
    ds.PatientAge = f"{case.age:03d}Y"
    ds.BodyPartExamined = "PROSTATE"
    ds.DeviceSerialNumber = "PHANTOM01"
    ds.SoftwareVersions = flavour.software
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = case.study_instance_uid
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.StudyID = f"{abs(case.seed) % 100000}"
    ds.SeriesNumber = series.style.number
    ds.FrameOfReferenceUID = case.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.MagneticFieldStrength = flavour.field_strength
    request = series.params.get("request")
    if isinstance(request, ImagingRequest):
        ds.IssueDateOfImagingServiceRequest = request.issued.strftime("%Y%m%d")
        ds.RequestedProcedurePriority = request.priority
    return ds


def window(pixels: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(pixels, [1, 99.5])
    return float(round((lo + hi) / 2)), float(max(1.0, round(hi - lo)))


# --- classic MR Image Storage --------------------------------------------------------------


def _classic_instance(
    case: PhantomCase, flavour: Flavour, series: SeriesData, index: int, frame: Frame
) -> Dataset:
    ds = base_dataset(case, flavour, series)
    seq = _SEQUENCE[series.kind]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = case.uid(f"{series.key}|{index}")
    ds.ImageType = list(series.style.image_type)
    ds.ContentDate = ds.SeriesDate
    ds.ContentTime = ds.SeriesTime
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.ScanningSequence = seq[0]
    ds.SequenceVariant = seq[1]
    ds.ScanOptions = "PFP" if series.kind in ("dwi", "adc") else ""
    ds.MRAcquisitionType = "3D" if series.kind == "dce" else "2D"
    name = series.style.sequence_name
    if name:
        ds.SequenceName = name.format(b=int(frame.b_value or 0))
    ds.SliceThickness = DSfloat(frame.thickness, auto_format=True)
    ds.RepetitionTime = seq[2]
    ds.EchoTime = seq[3]
    ds.NumberOfAverages = 1
    ds.ImagingFrequency = 123.2
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    ds.SpacingBetweenSlices = DSfloat(frame.thickness, auto_format=True)
    ds.EchoTrainLength = seq[4]
    ds.FlipAngle = seq[5]
    ds.ImagePositionPatient = ds_list(frame.position)
    ds.ImageOrientationPatient = ds_list(frame.row_dir + frame.col_dir)
    ds.SliceLocation = DSfloat(
        float(np.dot(frame.position, np.cross(frame.row_dir, frame.col_dir))), auto_format=True
    )
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = frame.pixels.shape
    ds.PixelSpacing = ds_list(frame.pixel_spacing)
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    wc, ww = window(frame.pixels)
    ds.WindowCenter = DSfloat(wc, auto_format=True)
    ds.WindowWidth = DSfloat(ww, auto_format=True)
    if flavour.manufacturer.startswith("Philips"):
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
    if frame.b_value is not None:
        flavour.tag_b_value(ds, frame.b_value)
    elif series.kind == "adc":  # ADC maps carry the highest b used for the fit
        flavour.tag_b_value(ds, max(case.dwi))
    if frame.temporal_position is not None:
        _tag_dynamic(ds, series, frame.temporal_position)
    ds.PixelData = np.ascontiguousarray(np.minimum(frame.pixels, 4095)).tobytes()
    return ds


def _tag_dynamic(ds: Dataset, series: SeriesData, phase: int) -> None:
    """Contrast/Bolus and temporal attributes of one phase of a dynamic series."""
    ds.ContrastBolusAgent = DCE_AGENT
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusVolume = 7.5
    ds.TemporalPositionIdentifier = phase
    ds.NumberOfTemporalPositions = max(f.temporal_position or 1 for f in series.frames)
    ds.TemporalResolution = DCE_PHASE_S * 1000.0
    start = dt.datetime.strptime(ds.SeriesTime, "%H%M%S")
    ds.AcquisitionTime = (start + dt.timedelta(seconds=DCE_PHASE_S * (phase - 1))).strftime(
        "%H%M%S"
    )
    ds.ContentTime = ds.AcquisitionTime


def save(ds: Dataset, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_classic_series(case: PhantomCase, series: SeriesData, folder: Path) -> list[Path]:
    flavour = FLAVOURS[case.vendor]
    paths = []
    for i, frame in enumerate(series.frames):
        path = folder / f"IM{i + 1:04d}.dcm"
        save(_classic_instance(case, flavour, series, i, frame), path)
        paths.append(path)
    return paths


# --- ground truth --------------------------------------------------------------------------


def to_sitk(vol: Volume) -> sitk.Image:
    img = sitk.GetImageFromArray(vol.array)
    img.SetSpacing(vol.spacing)
    img.SetOrigin(vol.origin)
    img.SetDirection(vol.direction)
    return img


def ground_truth(case: PhantomCase, series: list[SeriesData], enhanced: bool) -> dict[str, Any]:
    uids = {s.key: s.series_instance_uid for s in series}
    return {
        "study_instance_uid": case.study_instance_uid,
        "case_id": case.case_id,
        "seed": case.seed,
        "vendor": case.vendor,
        "enhanced": enhanced,
        "label": int(case.is_cspca),
        "lesions": [
            {
                "label": les.label,
                "isup": les.isup,
                "cspca": les.is_cspca,
                "zone": les.zone,
                "centroid_mm": list(les.centroid_mm),
                "volume_ml": les.volume_ml,
            }
            for les in case.lesions
        ],
        "gland_volume_ml": case.gland_volume_ml,
        "age": case.age,
        "psa": case.psa,
        "series": {k: uids[k] for k in ("t2w", "adc", "hbv", "dwi")},
        # Same-role look-alikes: a repeated axial T2W (same geometry) is an acceptable T2W.
        "series_alternatives": {"t2w": [uids["t2w_repeat"]] if "t2w_repeat" in uids else []},
        "series_numbers": {s.key: s.style.number for s in series},
    }


# --- public --------------------------------------------------------------------------------


def write_study(
    case: PhantomCase,
    out_dir: Path,
    *,
    enhanced: bool = False,
    distractors: bool = True,
    dce: bool = False,
    request: ImagingRequest | None = None,
) -> Path:
    """Write `case` as a DICOM study under `out_dir/<case_id>/`; return that folder.

    `dce` adds a dynamic contrast-enhanced series, always as classic MR images (also with
    `enhanced`: the Enhanced writer has no temporal dimension). `request` puts the order's
    issue date and priority into every image.
    """
    study_dir = Path(out_dir) / case.case_id
    series = plan_series(case, distractors=distractors, dce=dce)
    for s in series:
        if request is not None:
            s.params["request"] = request
        folder = study_dir / f"{s.style.number:03d}_{s.key}"
        if enhanced and s.kind != "dce":
            from training.phantoms.enhanced import write_enhanced_series

            write_enhanced_series(case, s, folder)
        else:
            write_classic_series(case, s, folder)
    masks = study_dir / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    for name, vol in (
        ("gland", case.gland_mask),
        ("zones", case.zone_mask),
        ("lesions", case.lesion_mask),
    ):
        sitk.WriteImage(to_sitk(vol), str(masks / f"{name}.mha"), useCompression=True)
    truth = ground_truth(case, series, enhanced)
    (study_dir / "ground_truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return study_dir


def generate_studies(
    out_dir: Path,
    n: int,
    seed: int,
    *,
    vendor: str = "siemens",
    enhanced: bool = False,
    cspca: bool | None = None,
    dce: bool = False,
    request: ImagingRequest | None = None,
) -> list[Path]:
    """`n` studies with seeds `seed, seed+1, ...`; returns their folders."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [
        write_study(
            synthesize_case(seed + i, vendor=vendor, cspca=cspca),
            out_dir,
            enhanced=enhanced,
            dce=dce,
            request=request,
        )
        for i in progress(range(n), "phantom studies", n)
    ]
