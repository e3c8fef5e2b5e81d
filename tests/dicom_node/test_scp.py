"""The Storage SCP against real DCMTK peers (echoscu, storescu), in-process on loopback."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from core.settings import DicomSettings
from dicom_node.index import Index
from dicom_node.scp import StorageSCP, StoreHandler
from dicom_node.spool import Spool
from tests.conftest import free_port, require_tool

from .peers import encoded_dataset, make_mr_series, storescu

pytestmark = pytest.mark.integration


@dataclass
class Running:
    scp: StorageSCP
    spool: Spool
    index: Index
    port: int


@pytest.fixture
def make_scp(tmp_path: Path) -> Iterator[object]:
    started: list[StorageSCP] = []

    def start(**kw: object) -> Running:
        port = free_port()
        settings = DicomSettings(port=port, low_water_mark_mb=0, **kw)  # type: ignore[arg-type]
        spool = Spool(tmp_path / "var", settings.low_water_mark_mb)
        index = Index(f"sqlite:///{tmp_path}/var/index.db")
        scp = StorageSCP(settings, StoreHandler(spool, index))
        scp.start()
        started.append(scp)
        return Running(scp, spool, index, port)

    yield start
    for scp in started:
        scp.stop()


def _echo(port: int, calling: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    exe = require_tool("echoscu")
    cmd = [exe, "-v", "-aet", calling, "-aec", "RADTRIAGE", "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_echo(make_scp: object) -> None:
    node = make_scp()  # type: ignore[operator]
    result = _echo(node.port)
    assert result.returncode == 0, result.stderr


def test_unknown_calling_ae_is_rejected(make_scp: object) -> None:
    node = make_scp(allowed_calling_aets=["PACS"])  # type: ignore[operator]
    assert _echo(node.port, "PACS").returncode == 0
    refused = _echo(node.port, "INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout


def test_peer_address_outside_allowlist_is_rejected(make_scp: object) -> None:
    node = make_scp(allowed_hosts=["192.0.2.7"])  # type: ignore[operator]
    refused = _echo(node.port)
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stderr + refused.stdout


def test_store_series_in_parallel_associations(make_scp: object, tmp_path: Path) -> None:
    require_tool("storescu")
    node = make_scp()  # type: ignore[operator]
    files = make_mr_series(tmp_path / "src", 40)
    chunks = [files[i::4] for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: storescu(c, node.port), chunks))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    study = node.index.get_study(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert study["instances"] == 40
    sent = {pydicom.dcmread(f).SOPInstanceUID: f for f in files}
    for path in node.spool.spool_dir.rglob("*.dcm"):
        back = pydicom.dcmread(path)
        assert back.PixelData == pydicom.dcmread(sent[back.SOPInstanceUID]).PixelData
    # resending is idempotent
    assert storescu(files[:5], node.port).returncode == 0
    assert node.index.counts()["instances"] == 40
    assert node.scp.handler.stats.duplicates == 5


def test_transfer_syntaxes_and_non_image_classes(
    make_scp: object, shared_data: Path, tmp_path: Path
) -> None:
    require_tool("storescu")
    node = make_scp()  # type: ignore[operator]
    ts_dir = shared_data / "dicom" / "dcm_qa_ts_siemens_transfer_syntaxes"
    files = sorted(ts_dir.glob("*.dcm"))
    files += [
        shared_data / "dicom" / "pypi_pydicom_data" / name
        for name in ("emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm")
    ]
    files += sorted((shared_data / "reference" / "tid1500_sr_example").glob("*.dcm"))
    deflated = tmp_path / "deflated.dcm"
    dcmconv = shutil.which("dcmconv")
    if dcmconv:
        subprocess.run([dcmconv, "+td", str(files[0]), str(deflated)], check=True)
        files.append(deflated)
    for f in files:
        sent = pydicom.dcmread(f, stop_before_pixels=True)
        ts = sent.file_meta.TransferSyntaxUID
        option = STORESCU_PROPOSE.get(str(ts), "")  # propose the file's own syntax first
        result = storescu([f], node.port, extra=["-R", *([option] if option else [])])
        assert result.returncode == 0, (f.name, result.stderr)
        stored = node.spool.instance_path(
            sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID
        )
        back = pydicom.dcmread(stored)
        if ts.is_compressed:  # stored exactly as sent, never re-encoded
            assert back.file_meta.TransferSyntaxUID == ts, f.name
        assert back.SOPInstanceUID == sent.SOPInstanceUID
        if "PixelData" in back:
            assert (back.pixel_array == pydicom.dcmread(f).pixel_array).all(), f.name
    modalities = {s["modality"] for st in node.index.list_studies() for s in _series(node, st)}
    assert {"MR", "SR", "SEG"} <= modalities
    if dcmconv:
        assert any(
            pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
            == "1.2.840.10008.1.2.1.99"
            for p in node.spool.spool_dir.rglob("*.dcm")
        )


def _series(node: Running, study: dict[str, object]) -> list[dict[str, object]]:
    full = node.index.get_study(str(study["study_instance_uid"]))
    return full["series"] if full else []


STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
}


def test_low_water_mark_returns_a700_and_keeps_acknowledged(
    make_scp: object, tmp_path: Path
) -> None:
    require_tool("storescu")
    node = make_scp()  # type: ignore[operator]
    files = make_mr_series(tmp_path / "src", 6)
    assert storescu(files[:3], node.port).returncode == 0
    node.spool.low_water_mark_mb = 10**9  # "disk full" from now on
    refused = storescu(files[3:], node.port, extra=["-v"])
    assert "Refused: OutOfResources" in refused.stderr  # DCMTK's name for 0xA700
    assert node.index.counts()["instances"] == 3
    assert len(list(node.spool.spool_dir.rglob("*.dcm"))) == 3
    assert node.scp.handler.stats.refused == {0xA700: 1}  # storescu stops at the first


def test_handler_statuses_for_bad_data_sets(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "var")
    handler = StoreHandler(spool, Index(f"sqlite:///{tmp_path}/index.db"))
    src = make_mr_series(tmp_path / "src", 1)[0]
    ds = pydicom.dcmread(src)
    data = encoded_dataset(src)
    common = dict(sop_class_uid=ds.SOPClassUID, transfer_syntax_uid="1.2.840.10008.1.2.1")
    assert handler.store(io.BytesIO(data), sop_instance_uid="1.2.999", **common) == 0xA900
    garbage = b"\x08\x00\x18\x00UI\xff\xff" + b"\x00" * 7
    assert handler.store(io.BytesIO(garbage), sop_instance_uid="1.2.998", **common) == 0xC210
    assert handler.store(io.BytesIO(data), sop_instance_uid=ds.SOPInstanceUID, **common) == 0
    reasons = sorted(p.read_text() for p in spool.quarantine_dir.glob("*.reason.txt"))
    assert len(reasons) == 2
    assert any("0xA900" in r and "SOP Instance UID" in r for r in reasons)
    assert any("0xC210" in r for r in reasons)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    openssl = require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=radtriage-test",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_dicom_tls_with_client_certificates(make_scp: object, tmp_path: Path) -> None:
    from pynetdicom import AE

    from core.settings import Destination, SenderSettings, TlsSettings
    from dicom_node.scp import client_ssl_context
    from dicom_node.sender import Sender

    cert, key = _self_signed(tmp_path)
    tls = TlsSettings(certfile=cert, keyfile=key, cafile=cert)  # mutual TLS
    node = make_scp(tls=tls)  # type: ignore[operator]

    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(
        "127.0.0.1",
        node.port,
        ae_title="RADTRIAGE",
        tls_args=(client_ssl_context(tls), "127.0.0.1"),
    )
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()

    plain = _echo(node.port)  # no TLS: the handshake fails, nothing is accepted
    assert plain.returncode != 0

    anonymous = AE(ae_title="ANON")
    anonymous.add_requested_context("1.2.840.10008.1.1")
    no_cert = client_ssl_context(None)
    no_cert.load_verify_locations(cafile=str(cert))
    refused = anonymous.associate(
        "127.0.0.1", node.port, ae_title="RADTRIAGE", tls_args=(no_cert, "127.0.0.1")
    )
    assert not refused.is_established  # a client without a certificate is refused

    # the sender speaks TLS to a TLS destination
    from core.domain import StudyStatus
    from dicom_node.jobs import JobWorker, transition

    from .peers import RecordingAnalyser, index_series

    index = Index(f"sqlite:///{tmp_path}/sender.db")
    uid = index_series(index, make_mr_series(tmp_path / "src", 1), 1.0)
    transition(index, uid, StudyStatus.COMPLETE)
    JobWorker(
        index, Spool(tmp_path / "out"), RecordingAnalyser(tmp_path / "sr"), ["tls"]
    ).run_once()
    dest = Destination(name="tls", ae_title="RADTRIAGE", host="127.0.0.1", port=node.port, tls=True)
    assert Sender(index, [dest], SenderSettings(), "RADTRIAGE", tls=tls).run_once() == 1
    assert node.index.counts()["instances"] == 1
