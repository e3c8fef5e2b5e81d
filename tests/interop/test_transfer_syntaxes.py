"""Every transfer syntax docs/conformance.md lists is decoded from a real file through the
product's volume path (scan -> series -> `load_volume`); lossless ones give the reference
pixels exactly, lossy ones nearly. A file without MR geometry (pydicom's NM/plain images) gets
MR headers grafted on; its encoded pixel data is never touched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, generate_uid

from imaging.study_reader import scan_study
from imaging.volumes import load_volume
from tests.conftest import require_tool
from tests.interop.transfer_syntax_files import INBOUND

pytestmark = pytest.mark.integration  # DCMTK encodes the syntaxes no real file here has


def _as_mr_slice(ds: pydicom.Dataset) -> None:
    """Give a single image the MR headers our reader needs, keeping its pixel data."""
    ds.Modality = "MR"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.4")
    for keyword, value in (
        ("StudyInstanceUID", generate_uid()),
        ("SeriesInstanceUID", generate_uid()),
        ("FrameOfReferenceUID", generate_uid()),
        ("ImagePositionPatient", [0.0, 0.0, 0.0]),
        ("ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
        ("PixelSpacing", [1.0, 1.0]),
        ("SliceThickness", 1.0),
    ):
        if keyword not in ds:
            setattr(ds, keyword, value)
    if int(ds.get("NumberOfFrames") or 1) > 1:  # keep one frame's worth of geometry simple
        pytest.skip("multi-frame source")


def _decoded(path: Path, folder: Path) -> np.ndarray:
    folder.mkdir()
    ds = pydicom.dcmread(path)
    _as_mr_slice(ds)
    ds.save_as(folder / "1.dcm", enforce_file_format=True)
    (series,) = scan_study(folder).series
    return load_volume(series).array[0]


@pytest.mark.parametrize("uid", sorted(INBOUND))
def test_listed_syntax_decodes_from_a_real_file(
    shared_data: Path, uid: str, tmp_path: Path
) -> None:
    source, reference, min_corr, encoder = INBOUND[uid]
    path = shared_data / "dicom" / source
    if encoder is not None:
        require_tool(encoder[0])
        encoded = tmp_path / "encoded.dcm"
        subprocess.run([*encoder, str(path), str(encoded)], check=True, capture_output=True)
        path = encoded
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == uid
    array = _decoded(path, tmp_path / "study")
    assert array.size > 0 and np.isfinite(array).all() and array.max() > array.min()
    if reference is None:
        return
    expected = _decoded(shared_data / "dicom" / reference, tmp_path / "reference")
    assert array.shape == expected.shape
    if min_corr == 1.0:
        np.testing.assert_array_equal(array, expected)
    else:
        corr = np.corrcoef(array.ravel().astype(float), expected.ravel().astype(float))[0, 1]
        assert corr >= min_corr
