"""Tolerant study scan: grouping, skipped files with reasons, vendor b-value tags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from core.errors import NotDicomError
from imaging.study_reader import b_value_of, read_header, scan_study


def _with_private(group: int, creator: str, offset: int, vr: str, value: object) -> Dataset:
    ds = Dataset()
    ds.private_block(group, creator, create=True).add_new(offset, vr, value)
    return ds


@pytest.mark.parametrize(
    ("ds", "expected"),
    [
        (Dataset(), None),
        (_with_private(0x0019, "SIEMENS MR HEADER", 0x0C, "IS", "1400"), 1400.0),
        (_with_private(0x0019, "SIEMENS MR HEADER", 0x0C, "UN", b"800 "), 800.0),
        (_with_private(0x0043, "GEMS_PARM_01", 0x39, "IS", ["1000001500", "8", "0", "0"]), 1500.0),
        (_with_private(0x0043, "GEMS_PARM_01", 0x39, "IS", ["1000", "8", "0", "0"]), 1000.0),
        (_with_private(0x2001, "Philips Imaging DD 001", 0x03, "FL", 2000.0), 2000.0),
        (_with_private(0x0019, "SOMEONE ELSE", 0x0C, "IS", "1400"), None),
    ],
    ids=[
        "none",
        "siemens IS",
        "siemens UN",
        "ge offset",
        "ge plain",
        "philips FL",
        "wrong creator",
    ],
)
def test_vendor_b_values(ds: Dataset, expected: float | None) -> None:
    assert b_value_of(ds) == expected


def test_standard_b_value_wins() -> None:
    ds = _with_private(0x0019, "SIEMENS MR HEADER", 0x0C, "IS", "50")
    ds.DiffusionBValue = 1400
    assert b_value_of(ds) == 1400.0


def test_non_dicom_and_missing_paths(tmp_path: Path) -> None:
    text = tmp_path / "README.txt"
    text.write_text("hello")
    with pytest.raises(NotDicomError):
        read_header(text)
    scan = scan_study(tmp_path)
    assert scan.series == [] and scan.skipped[0][1].startswith("not_dicom")
    with pytest.raises(NotDicomError):
        scan_study(tmp_path / "absent")


def test_prostatex_scan(prostatex: Path) -> None:
    scan = scan_study(prostatex)
    assert scan.skipped == []
    numbers = [s.series_number for s in scan.series]
    assert numbers == sorted(numbers) and len(numbers) == 11
    dwi = next(s for s in scan.series if s.series_number == 7)
    assert dwi.b_values == [50.0, 400.0, 800.0]
    assert len(dwi.instances) == 57
    high = dwi.with_b_value(800.0)
    assert len(high.instances) == len(high.frames) == 19
    assert all("PixelData" not in s.headers for s in scan.series)
