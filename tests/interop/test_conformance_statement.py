"""docs/conformance.md is checked against the code: its tables are parsed and compared with
the SOP classes we write and accept, the C-STORE statuses the handler can return, the sender's
proposals and success statuses, the transfer syntaxes that have a real-file decode test, and
the validator warnings the interop tests keep."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom.uid import UID, Comprehensive3DSRStorage, SegmentationStorage

STATEMENT = Path(__file__).parents[2] / "docs" / "conformance.md"
_UID = re.compile(r"^\d+(\.\d+)+$")


def _section(title_prefix: str) -> str:
    text = STATEMENT.read_text()
    match = re.search(rf"^#+ {re.escape(title_prefix)}.*?$(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert match, f"no section {title_prefix!r} in {STATEMENT}"
    return match.group(1)


def _tables(section: str) -> list[list[list[str]]]:
    """Markdown tables of a section: rows of cells, header row included, rule rows dropped."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*section.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r"-+", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _column(table: list[list[str]], name: str) -> list[str]:
    index = table[0].index(name)
    return [row[index] for row in table[1:]]


def _uids(cells: list[str]) -> list[str]:
    return [c for c in cells if _UID.match(c)]


def test_sop_classes_and_roles_match_the_code() -> None:
    from dicom_node.scp import VERIFICATION_SOP_CLASS

    (table,) = _tables(_section("1. Overview"))
    rows = {row[2]: row for row in table[1:] if _UID.match(row[2])}
    for uid, row in rows.items():
        name = UID(uid).name.removesuffix(" SOP Class")
        assert name == row[1], f"{uid} is {name!r}, the statement says {row[1]!r}"
    assert rows[VERIFICATION_SOP_CLASS][4] == "Yes"
    for written in (Comprehensive3DSRStorage, SegmentationStorage):
        assert rows[str(written)][3].startswith("Yes"), f"we send {written.name} (SCU)"


@pytest.mark.slow  # seconds of training/evaluation: `make test`, not test-fast
def test_sr_and_seg_we_write_have_the_listed_classes_and_syntax(samples: dict) -> None:
    import pydicom

    section = _section("3. Transfer syntaxes")
    assert "Objects we create (SR, SEG) are written in Explicit VR Little Endian" in section
    sample = samples["positive"]
    assert sample.seg is not None
    for path, sop_class in (
        (sample.sr, Comprehensive3DSRStorage),
        (sample.seg, SegmentationStorage),
    ):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPClassUID == sop_class
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_c_store_statuses_are_those_the_handler_returns() -> None:
    from dicom_node.ingest import HTTP_FOR_STATUS

    table = next(t for t in _tables(_section("2.2")) if t[0][0] == "status")
    assert {int(c, 16) for c in _column(table, "status")} == set(HTTP_FOR_STATUS)


def test_sender_proposals_and_success_statuses() -> None:
    from dicom_node.sender import FALLBACK_SYNTAXES, SUCCESS_STATUSES

    tables = _tables(_section("2.3"))
    proposed = next(t for t in tables if t[0][0] == "proposed transfer syntax")
    assert _column(proposed, "UID") == [str(s) for s in FALLBACK_SYNTAXES]
    success = next(t for t in tables if t[0][0] == "success status")
    assert {int(c, 16) for c in _column(success, "success status")} == SUCCESS_STATUSES


def test_every_listed_transfer_syntax_has_a_real_file_test() -> None:
    from tests.interop.transfer_syntax_files import INBOUND

    (table,) = _tables(_section("3. Transfer syntaxes"))
    listed = _uids(_column(table, "UID"))
    assert len(listed) == len(set(listed))
    assert set(listed) == set(INBOUND)
    for uid in listed:
        assert UID(uid).is_transfer_syntax, uid


@pytest.mark.parametrize("tool", ["PIXELMED", "DCIODVFY", "DCENTVFY"])
def test_kept_validator_warnings_are_listed_with_a_reason(tool: str) -> None:
    from tests.interop import test_validators

    tables = _tables(_section("7. Validation"))
    table = next(t for t in tables if t[0] == ["tool", "warning", "why we keep it"])
    rows = table[1:]
    kept = getattr(test_validators, f"{tool}_KEPT")
    for pattern in kept:
        hits = [r for r in rows if re.search(pattern, r[1].strip("`"))]
        assert hits and all(len(r[2]) > 20 for r in hits), f"{pattern!r} not listed with a reason"


def test_dicomweb_routes_exist() -> None:
    from dicom_node.dicomweb import StowLimits, create_dicomweb_router

    (table,) = _tables(_section("2.4 DICOMweb"))
    stow = StowLimits(max_bytes=1 << 20, concurrency=1)  # STOW-RS exists only when configured
    routes = {
        (method, route.path)
        for route in create_dicomweb_router(object(), stow=stow).routes
        for method in getattr(route, "methods", ())
    }
    for cell in _column(table, "route"):
        method, path = cell.split(" ", 1)
        assert (method, path) in routes, cell
