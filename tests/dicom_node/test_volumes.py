"""Volume building: geometry round trip, decoding per transfer syntax, Enhanced MR, errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from core.errors import (
    GeometryError,
    MissingSlicesError,
    MixedOrientationError,
    NotMRError,
    UndecodablePixelDataError,
)
from imaging.study_reader import scan_study
from imaging.volumes import load_volume, load_volume_with_headers


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    """Rotation matrix from three Euler angles (radians)."""
    ca, sa, cb, sb, cc, sc = (
        math.cos(a),
        math.sin(a),
        math.cos(b),
        math.sin(b),
        math.cos(c),
        math.sin(c),
    )
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rx = np.array([[1, 0, 0], [0, cc, -sc], [0, sc, cc]])
    return rz @ ry @ rx


def write_classic_series(
    folder: Path,
    array: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: np.ndarray,
    *,
    shuffle_seed: int | None = 0,
    slope: float = 1.0,
    intercept: float = 0.0,
    modality: str = "MR",
    skip: tuple[int, ...] = (),
    orientation_override: dict[int, list[float]] | None = None,
    images_in_acquisition: int | None = None,
) -> list[Path]:
    """Write `array` [z, y, x] as classic MR Image Storage files, one per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    nz = array.shape[0]
    order = list(range(nz))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    paths = []
    for n, z in enumerate(order):
        if z in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{n}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = modality
        ds.SeriesNumber = 1
        ds.InstanceNumber = n + 1
        position = np.asarray(origin) + direction[:, 2] * spacing[2] * z
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        iop = list(direction[:, 0]) + list(direction[:, 1])
        if orientation_override and z in orientation_override:
            iop = orientation_override[z]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
        ds.SliceThickness = "99"  # deliberately wrong: spacing must come from positions
        if images_in_acquisition:
            ds.ImagesInAcquisition = images_in_acquisition
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if (slope, intercept) != (1.0, 0.0):
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = array[z].astype(np.int16).tobytes()
        path = folder / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _only_series(folder: Path):  # type: ignore[no-untyped-def]
    scan = scan_study(folder)
    assert len(scan.series) == 1, scan.skipped
    return scan.series[0]


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    angles=st.tuples(*[st.floats(-math.pi, math.pi, allow_nan=False)] * 3),
    spacing=st.tuples(st.floats(0.3, 3.0), st.floats(0.3, 3.0), st.floats(0.5, 6.0)),
    origin=st.tuples(*[st.floats(-300, 300, allow_nan=False)] * 3),
    shape=st.tuples(st.integers(2, 9), st.integers(3, 12), st.integers(3, 12)),
    seed=st.integers(0, 2**16),
)
def test_classic_series_round_trip_keeps_affine(
    tmp_path_factory: pytest.TempPathFactory,
    angles: tuple[float, float, float],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    shape: tuple[int, int, int],
    seed: int,
) -> None:
    direction = _rotation(*angles)
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 3000, size=shape).astype(np.int16)
    folder = tmp_path_factory.mktemp("series")
    write_classic_series(folder, array, spacing, origin, direction, shuffle_seed=seed)
    volume = load_volume(_only_series(folder))
    expected = np.eye(4)
    expected[:3, :3] = direction @ np.diag(spacing)
    expected[:3, 3] = origin
    np.testing.assert_allclose(volume.affine(), expected, atol=1e-4)
    np.testing.assert_array_equal(volume.array, array)


def test_rescale_slope_intercept_applied(tmp_path: Path) -> None:
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    write_classic_series(tmp_path, array, (1, 1, 2), (0, 0, 0), np.eye(3), slope=0.5, intercept=-10)
    volume = load_volume(_only_series(tmp_path))
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, array * 0.5 - 10)


def test_headers_come_back_without_pixels(tmp_path: Path) -> None:
    array = np.ones((3, 4, 4), np.int16)
    write_classic_series(tmp_path, array, (1, 1, 1), (0, 0, 0), np.eye(3))
    _, headers = load_volume_with_headers(_only_series(tmp_path))
    assert len(headers) == 3
    assert all("PixelData" not in ds and "SOPInstanceUID" in ds for ds in headers)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"skip": (3,)}, MissingSlicesError),
        ({"images_in_acquisition": 9}, MissingSlicesError),
        ({"orientation_override": {2: [0, 1, 0, 0, 0, -1]}}, MixedOrientationError),
        ({"modality": "CT"}, NotMRError),
    ],
    ids=["gap", "fewer than ImagesInAcquisition", "mixed orientation", "not MR"],
)
def test_bad_series_raise_specific_errors(tmp_path: Path, kwargs: dict, error: type) -> None:
    array = np.zeros((7, 4, 4), np.int16)
    write_classic_series(tmp_path, array, (1, 1, 2.5), (0, 0, 0), np.eye(3), **kwargs)
    with pytest.raises(error) as excinfo:
        load_volume(_only_series(tmp_path))
    assert excinfo.value.message


def test_irregular_spacing_is_an_error(tmp_path: Path) -> None:
    array = np.zeros((5, 4, 4), np.int16)
    paths = write_classic_series(tmp_path, array, (1, 1, 2.0), (0, 0, 0), np.eye(3))
    ds = pydicom.dcmread(paths[0])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.7
    ds.save_as(paths[0])
    with pytest.raises(GeometryError, match=r"spacing|missing"):
        load_volume(_only_series(tmp_path))


def test_truncated_pixel_data_is_undecodable(tmp_path: Path) -> None:
    array = np.zeros((2, 8, 8), np.int16)
    paths = write_classic_series(tmp_path, array, (1, 1, 1), (0, 0, 0), np.eye(3))
    ds = pydicom.dcmread(paths[0])
    ds.PixelData = ds.PixelData[:10]
    ds.save_as(paths[0])
    with pytest.raises(UndecodablePixelDataError):
        load_volume(_only_series(tmp_path))


# --- real files ---------------------------------------------------------------------------------

MR_SMALL_SYNTAXES = [
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
]


@pytest.mark.parametrize("name", MR_SMALL_SYNTAXES)
def test_pydicom_mr_small_syntaxes_decode_identically(shared_data: Path, name: str) -> None:
    folder = shared_data / "dicom" / "pypi_pydicom_test_files"
    reference = load_volume(scan_study([folder / "MR_small.dcm"]).series[0])
    volume = load_volume(scan_study([folder / name]).series[0])
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine(), reference.affine(), atol=1e-6)


def test_siemens_transfer_syntaxes_decode_identically(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "dcm_qa_ts_siemens_transfer_syntaxes"
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 9
    syntaxes = set()
    volumes = []
    for path in files:
        series = scan_study([path]).series[0]
        syntaxes.add(series.instances[0].transfer_syntax_uid)
        volumes.append(load_volume(series))
    assert len(syntaxes) >= 7  # some syntaxes appear twice (e.g. JPEG 2000 variants)
    reference = next(
        v
        for v, p in zip(volumes, files, strict=True)
        if pydicom.dcmread(p).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    )
    for volume in volumes:
        np.testing.assert_array_equal(volume.array, reference.array)


def test_enhanced_mr_frames_match_pixel_array(shared_data: Path) -> None:
    path = shared_data / "dicom" / "dcm_qa_enh_enhanced_mr" / "Siemens" / "XA10" / "6_1.dcm"
    series = scan_study([path]).series[0]
    assert series.instances[0].is_enhanced
    volume = load_volume(series)
    ds = pydicom.dcmread(path)
    assert volume.size == (ds.Columns, ds.Rows, ds.NumberOfFrames)
    # Every decoded frame lands at the slice its PlanePositionSequence says.
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        position = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        index = np.linalg.solve(volume.affine()[:3, :3], position - np.array(volume.origin))
        np.testing.assert_allclose(index[:2], 0, atol=1e-3)
        z = round(index[2])
        raw = ds.pixel_array[k]
        slope = (
            float(item.PixelValueTransformationSequence[0].RescaleSlope)
            if "PixelValueTransformationSequence" in item
            else 1.0
        )
        np.testing.assert_allclose(volume.array[z], raw * slope, rtol=1e-5)


def test_legacy_converted_enhanced_equals_classic(prostatex: Path, tmp_path: Path) -> None:
    """The same T2W series as classic MR and as a highdicom Legacy Converted Enhanced MR."""
    highdicom = pytest.importorskip("highdicom")
    classic_dir = next(prostatex.glob("*/10.*"))
    classic = scan_study(classic_dir).series[0]
    datasets = [pydicom.dcmread(i.path) for i in classic.instances]
    enhanced = highdicom.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets,
        series_instance_uid=generate_uid(),
        series_number=110,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    enhanced.save_as(tmp_path / "enhanced.dcm")
    series = scan_study(tmp_path).series[0]
    assert series.instances[0].is_enhanced
    a, b = load_volume(classic), load_volume(series)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine(), b.affine(), atol=1e-6)
