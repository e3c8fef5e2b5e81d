"""No path from a header: hostile UIDs, names and lengths against the real node.

Every UID is checked (DICOM UID syntax, at most 64 characters) before it names a file; an
invalid one gets 0xA900 and the instance is quarantined under a generated name with the
reason. The node runs as ``python -m dicom_node.node`` (what ``radtriage serve`` runs for
DICOM); senders are a raw-socket SCU (to send what proper SCUs refuse to), pynetdicom and DCMTK
storescu. The file system under the test folder is walked before and after."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import MalformedDicomError
from core.uids import InvalidUIDError, is_valid_uid, require_uid
from store.spool import Spool
from tests.campaigns import dicom_wire as wire
from tests.campaigns.fuzz_scp import HOSTILE_UIDS, LiveNode, mr_elements
from tests.conftest import require_tool

from .peers import make_mr_series, storescu

VALID = ["0", "1.2", "1.2.840.10008.5.1.4.1.1.4", "2.25.0", "1." + "2" * 62, "1.2.3\x00"]
INVALID = [
    "",
    "../../x",
    "/abs/1.2",
    "1.2/../3",
    "1..2",
    ".1",
    "1.",
    "01.2",
    "1.02",
    "1.2 ",
    " 1.2",
    "1.2\x00\x00",
    "1.\x002",
    "1." + "2" * 63,
    "1.2.\u0663",
    "1.2\n",
    "1_2",
]


@pytest.mark.parametrize("uid", VALID)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)
    assert require_uid(uid, "StudyInstanceUID") == uid.rstrip("\x00")


@pytest.mark.parametrize("uid", INVALID)
def test_invalid_uids_are_refused_by_name(uid: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError, match="SeriesInstanceUID") as info:
        require_uid(uid, "SeriesInstanceUID")
    assert info.value.dimse_status == 0xA900
    assert isinstance(info.value, MalformedDicomError)
    assert "\x00" not in info.value.message and "\n" not in info.value.message


@given(st.text(max_size=80))
def test_a_valid_uid_names_one_file_inside_the_spool(text: str) -> None:
    spool = Spool.__new__(Spool)  # only the path logic; nothing is written
    spool.spool_dir = Path("/spool")
    if not is_valid_uid(text):
        with pytest.raises(InvalidUIDError):
            spool.instance_path(text, "1.2", "1.2.3")
        return
    path = spool.instance_path(text, "1.2", "1.2.3")
    assert path.parent.parent == Path("/spool") / text.rstrip("\x00")
    assert ".." not in path.parts and path.resolve().is_relative_to("/spool")


def test_two_malformed_uids_never_share_a_file(tmp_path: Path) -> None:
    """The old name cleaner mapped both to ``1.2.3_4`` and overwrote the first."""
    spool = Spool(tmp_path / "var")
    for uid in ("1.2.3/4", "1.2.3\\4"):
        with pytest.raises(InvalidUIDError):
            spool.store("1.2", "1.2.1", uid, b"meta", b"data")
    assert not list(spool.spool_dir.rglob("*"))


def test_quarantine_names_are_generated_and_the_claim_is_escaped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "var")
    paths = [spool.quarantine("../../x\x00\n", b"data", "0xA900 bad UID") for _ in range(2)]
    assert paths[0] != paths[1]
    for path in paths:
        assert path.parent == spool.quarantine_dir and ".." not in path.name
        sidecar = path.with_name(path.name.replace(".dcm", ".reason.txt")).read_text()
        assert "reason: 0xA900 bad UID" in sidecar
        assert "claimed SOP Instance UID: '../../x\\x00\\n'" in sidecar


# --- against the running node -------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Iterator[LiveNode]:
    root = tmp_path / "node"
    root.mkdir()
    live = LiveNode(root)
    yield live
    live.stop()


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def _indexed(node: LiveNode) -> set[str]:
    db = sqlite3.connect(node.root / "var" / "index.db")
    try:
        return {row[0] for row in db.execute("SELECT sop_instance_uid FROM instances")}
    finally:
        db.close()


def _outside_storage(node: LiveNode, before: set[Path]) -> set[Path]:
    var = node.root / "var"
    allowed = {node.root / "node.toml", node.root / "node.log", var, *var.rglob("*")}
    return _tree(node.root.parent) - before - allowed


ABSOLUTE_PROBES = [Path("/x"), Path("/tmp/x"), Path("/etc/passwd.dcm"), Path("/abs")]


@pytest.mark.integration
def test_hostile_uids_are_refused_quarantined_and_nothing_escapes(
    node: LiveNode, tmp_path: Path
) -> None:
    before = _tree(tmp_path)
    absolute_before = {p: p.exists() for p in ABSOLUTE_PROBES}
    acknowledged: list[str] = []
    refused = aborted = 0
    for i, bad in enumerate(HOSTILE_UIDS):
        if is_valid_uid(bad.rstrip(b"\x00 ").decode("utf-8", "replace")):
            continue  # only padded (trailing NULs/spaces): read tolerantly, not hostile
        for where in ("study", "series", "sop"):
            study, series, sop = b"2.25.7", b"2.25.8", f"2.25.9{i}{len(where)}".encode()
            if where == "study":
                study = bad
            elif where == "series":
                series = bad
            else:
                sop = bad
            dataset = b"".join(mr_elements(study, series, sop))
            with wire.RawAssociation("127.0.0.1", node.port) as assoc:
                assert assoc.associate() == 0x02
                try:
                    status = assoc.c_store(wire.MR_IMAGE_STORAGE, sop, dataset)
                except wire.PeerClosed:  # a request pynetdicom cannot decode: A-ABORT
                    assert where == "sop", bad
                    aborted += 1
                    continue
                assert status in (0xA900, 0xC210), (where, bad, status)  # never success
                refused += 1
                good = f"2.25.{10**20 + i * 3 + len(where)}".encode()  # interleaved: stored
                dataset = b"".join(mr_elements(b"2.25.7", b"2.25.8", good))
                assert assoc.c_store(wire.MR_IMAGE_STORAGE, good, dataset) == 0x0000
                acknowledged.append(good.decode())
                assert assoc.release()
    assert refused > 3 * aborted
    reasons = sorted(node.quarantine.glob("*.reason.txt"))
    assert len(reasons) == refused
    assert all("reason: 0x" in p.read_text() for p in reasons)
    assert all(p.name[:8].isdigit() for p in node.quarantine.iterdir())  # generated names
    assert set(acknowledged) <= _indexed(node)  # nothing acknowledged is lost
    spooled = {p.stem for p in node.spool.rglob("*.dcm")}
    assert spooled == set(acknowledged)
    assert not _outside_storage(node, before)
    assert {p: p.exists() for p in ABSOLUTE_PROBES} == absolute_before


@pytest.mark.integration
def test_undecodable_request_uids_abort_without_storing(node: LiveNode) -> None:
    for sop_class, sop in ((wire.MR_IMAGE_STORAGE, b""), (b"", b"2.25.1")):
        with wire.RawAssociation("127.0.0.1", node.port) as assoc:
            assert assoc.associate() == 0x02
            with pytest.raises(wire.PeerClosed, match="0x07"):  # A-ABORT, not silence
                assoc.c_store(sop_class, sop, b"".join(mr_elements(b"2.25.1", b"2.25.2", sop)))
    assert not list(node.spool.rglob("*.dcm"))
    with wire.RawAssociation("127.0.0.1", node.port) as assoc:  # still serving
        assert assoc.associate() == 0x02 and assoc.c_echo() == 0x0000


@pytest.mark.integration
def test_hostile_header_from_pynetdicom_and_storescu(node: LiveNode, tmp_path: Path) -> None:
    from pynetdicom import AE

    files = make_mr_series(tmp_path / "src", 3, patient_id="../../etc")
    hostile = []
    for path, uid in zip(files[:2], ("../../x", "/tmp/x"), strict=True):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = uid
        ds.SeriesDescription = "../" * 18 + "\x00\x00"
        ds.save_as(path)
        hostile.append(ds)

    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(pydicom.uid.MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RADTRIAGE")
    assert assoc.is_established
    assert assoc.send_c_store(hostile[0]).Status == 0xA900
    assert assoc.send_c_store(pydicom.dcmread(files[2])).Status == 0x0000  # header text is data
    assoc.release()

    require_tool("storescu")
    result = storescu([files[1]], node.port, extra=["-v"])
    assert "Received Store Response (Success)" not in result.stderr
    assert "Error: DataSetDoesNotMatchSOPClass" in result.stderr  # DCMTK name for 0xA900
    stored = str(pydicom.dcmread(files[2]).SOPInstanceUID)
    assert _indexed(node) == {stored}
    assert {p.stem for p in node.spool.rglob("*.dcm")} == {stored}
    assert not (tmp_path / "x").exists() and not (node.root / "x").exists()


def test_part10_ingest_for_stow(tmp_path: Path) -> None:
    """`Ingest.receive_part10` (the STOW-RS entry) takes UIDs from the File Meta Information
    and applies the same checks."""
    from dicom_node.ingest import Ingest
    from store.index import Index

    spool = Spool(tmp_path / "var")
    ingest = Ingest(spool, Index(f"sqlite:///{tmp_path}/index.db"))
    good, bad = make_mr_series(tmp_path / "src", 2)
    outcome = ingest.receive_part10(good.read_bytes(), source="stow:alice")
    assert outcome.ok and outcome.http_status == 200 and not outcome.duplicate
    assert ingest.receive_part10(good.read_bytes()).duplicate
    ds = pydicom.dcmread(bad)
    ds.StudyInstanceUID = "../../x"
    ds.save_as(bad)
    refused = ingest.receive_part10(bad.read_bytes())
    assert refused.status == 0xA900 and refused.http_status == 409
    assert refused.reason is not None and "StudyInstanceUID" in refused.reason
    assert refused.quarantined is not None and refused.quarantined.is_file()
    not_part10 = ingest.receive_part10(b"\x00" * 200)
    assert not_part10.status == 0xC210 and not_part10.quarantined is not None
    assert [p.stem for p in spool.spool_dir.rglob("*.dcm")] == [
        str(pydicom.dcmread(good).SOPInstanceUID)
    ]
