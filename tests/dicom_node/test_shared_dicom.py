"""Every file of ../shared/data/dicom gives a volume or a clean, specific core.errors error."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from core.errors import GeometryError, InputError, RadtriageError
from imaging.study_reader import scan_study
from imaging.study_volumes import inspect_study
from imaging.volumes import load_volume

GENERIC = (RadtriageError, InputError)


def test_every_shared_file_gives_a_volume_or_a_specific_error(shared_data: Path) -> None:
    root = shared_data / "dicom"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) > 100
    outcomes: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # real-world files warn; we assert on outcomes
        for path in files:
            scan = scan_study([path])  # must never raise for a single bad file
            for _, reason in scan.skipped:
                code = reason.split(":")[0]
                assert code in {"not_dicom", "malformed_dicom"}, (path, reason)
                outcomes[code] = outcomes.get(code, 0) + 1
            for series in scan.series:
                try:
                    volume = load_volume(series)
                except RadtriageError as exc:
                    assert type(exc) not in GENERIC, (path, exc)
                    assert isinstance(exc, InputError), (path, exc)
                    assert exc.message, path
                    outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                else:
                    assert volume.array.ndim == 3 and volume.array.size > 0
                    outcomes["volume"] = outcomes.get("volume", 0) + 1
    # The corpus holds decodable MR in many syntaxes, non-MR objects and broken files.
    assert outcomes["volume"] >= 30
    assert outcomes["NotMRError"] > 0
    assert outcomes["not_dicom"] > 0 and outcomes["malformed_dicom"] > 0
    assert outcomes.get("UndecodablePixelDataError", 0) >= 1  # MR_truncated.dcm


@pytest.mark.parametrize(
    "folder",
    [
        "dcm_qa_nih_ge_siemens/20180918GE/mr_0004",
        "dcm_qa_nih_ge_siemens/20180918Si/mr_0003",
        "dcm_qa_enh_enhanced_mr/Philips",
    ],
)
def test_4d_series_are_geometry_errors(shared_data: Path, folder: str) -> None:
    series = scan_study(shared_data / "dicom" / folder).series[0]
    with pytest.raises(GeometryError):
        load_volume(series)


def test_inspect_never_raises_on_shared_folders(shared_data: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for folder in sorted((shared_data / "dicom").iterdir()):
            if folder.is_dir():
                report = inspect_study(folder)
                assert report["error"] is None or report["error"]["code"]
