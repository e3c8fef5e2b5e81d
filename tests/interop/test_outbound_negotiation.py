"""Our sender's negotiation (`dicom_node.sender.requested_contexts` and `Sender.negotiated`)
against DCMTK storescp configured to accept one transfer syntax only: implicit VR (``+xi``),
deflate (a config-file profile) and JPEG-LS (a profile). SR and SEG reach the first two
unchanged; with the JPEG-LS-only peer nothing is sent and the reason says why."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from dicom_node.sender import DestinationError, Sender, requested_contexts
from tests.conftest import free_port, require_tool
from tests.dicom_node.peers import wait_port
from tests.interop.conftest import Sample

pytestmark = pytest.mark.integration

_PROFILE = """[[TransferSyntaxes]]
[Only]
TransferSyntax1 = {syntax}
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[Results]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = Comprehensive3DSRStorage\\Only
PresentationContext3 = SegmentationStorage\\Only
[[Profiles]]
[Only]
PresentationContexts = Results
"""


@contextlib.contextmanager
def _storescp(out: Path, port: int, *args: str) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    exe = require_tool("storescp")
    proc = subprocess.Popen(
        [exe, "-aet", "STORESCP", "-od", str(out), *args, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _send(port: int, paths: list[Path]) -> list[str]:
    """Associate as the sender does, send each document; the outcome per document."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title="RADTRIAGE")
    for sop_class, syntaxes in requested_contexts(datasets).items():
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    if not assoc.is_established:
        return ["association not established"] * len(datasets)
    outcomes = []
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(Sender.negotiated(assoc, ds))
                outcomes.append(f"0x{int(status.Status):04X}")
            except DestinationError as exc:
                outcomes.append(f"DestinationError: {exc}")
    finally:
        assoc.release()
    return outcomes


def _documents(samples: dict[str, Sample]) -> list[Path]:
    sample = samples["multi_lesion"]
    assert sample.seg is not None
    return [sample.sr, sample.seg]


@pytest.mark.parametrize(
    ("name", "args_of", "syntax"),
    [
        ("implicit", lambda cfg: ["+xi"], "1.2.840.10008.1.2"),
        ("deflate", lambda cfg: ["-xf", str(cfg), "Only"], "1.2.840.10008.1.2.1.99"),
    ],
)
def test_sr_and_seg_reach_a_peer_that_accepts_one_uncompressed_syntax(
    samples: dict[str, Sample], tmp_path: Path, name: str, args_of, syntax: str
) -> None:
    cfg = tmp_path / "storescp.cfg"
    cfg.write_text(_PROFILE.format(syntax="DeflatedLittleEndianExplicit"))
    port = free_port()
    documents = _documents(samples)
    with _storescp(tmp_path / "in", port, *args_of(cfg)):
        assert _send(port, documents) == ["0x0000", "0x0000"]
    received = {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p) for p in sorted((tmp_path / "in").iterdir()))
    }
    for path in documents:
        sent = pydicom.dcmread(path)
        got = received[str(sent.SOPInstanceUID)]
        assert str(got.file_meta.TransferSyntaxUID) == syntax  # storescp keeps the network TS
        if "ContentSequence" in sent:
            assert got.ContentSequence == sent.ContentSequence
        if "PixelData" in sent:
            assert got.PixelData == sent.PixelData


def test_a_jpeg_ls_only_peer_gets_nothing_and_the_reason_is_clear(
    samples: dict[str, Sample], tmp_path: Path
) -> None:
    cfg = tmp_path / "storescp.cfg"
    cfg.write_text(_PROFILE.format(syntax="JPEGLSLossless"))
    port = free_port()
    with _storescp(tmp_path / "in", port, "-xf", str(cfg), "Only"):
        outcomes = _send(port, _documents(samples))
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert outcome == "association not established" or "accepts no context" in outcome
    assert not any((tmp_path / "in").iterdir())


def test_proposals_carry_the_fallback_syntaxes(samples: dict[str, Sample]) -> None:
    contexts = requested_contexts(pydicom.dcmread(p) for p in _documents(samples))
    for syntaxes in contexts.values():
        assert syntaxes[0] == "1.2.840.10008.1.2.1"  # what we write
        assert set(syntaxes) == {
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1.99",
        }
    assert set(contexts) == {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4"}
