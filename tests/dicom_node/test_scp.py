"""The Storage SCP against real DCMTK peers (echoscu, storescu), in-process on loopback."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from core.settings import DicomSettings
from dicom_node.scp import StorageSCP, StoreHandler
from store.index import Index
from store.spool import Spool
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


def test_store_requests_are_served_in_the_dul_thread(make_scp: object, tmp_path: Path) -> None:
    """`dimse_fastpath` stores each C-STORE in the thread that assembled it and answers from
    there; an exception in the handler answers 0xC211 (as pynetdicom does) and the
    association goes on."""
    from pynetdicom.dul import DULServiceProvider

    require_tool("storescu")
    node = make_scp()  # type: ignore[operator]
    handler = node.scp.handler
    serve, threads = handler.serve, []

    def recording(req: object, transfer_syntax_uid: str, calling_ae_title: str) -> int:
        threads.append(threading.current_thread())
        if len(threads) == 2:
            raise RuntimeError("handler failure")
        return serve(req, transfer_syntax_uid, calling_ae_title)

    handler.serve = recording  # type: ignore[method-assign]
    files = make_mr_series(tmp_path / "src", 4)
    result = storescu(files, node.port, extra=["-v", "--no-halt"])
    assert len(threads) == 4
    assert all(isinstance(t, DULServiceProvider) for t in threads)
    responses = [ln for ln in result.stderr.splitlines() if "Received Store Response" in ln]
    assert len(responses) == 4  # 0xC211 is "Cannot understand" to DCMTK (class 0xCxxx)
    assert "(Error: CannotUnderstand)" in responses[1]
    assert all("(Success)" in r for r in responses[:1] + responses[2:]), responses
    assert node.index.counts()["instances"] == 3  # the other three were stored


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


def test_instance_over_max_instance_bytes_is_refused_a700(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "var")
    handler = StoreHandler(spool, Index(f"sqlite:///{tmp_path}/index.db"), max_instance_bytes=4096)
    src = make_mr_series(tmp_path / "src", 1)[0]  # 64 x 64 x 16 bit: 8 KB of pixels
    ds = pydicom.dcmread(src)

    class Request:
        DataSet = io.BytesIO(encoded_dataset(src))
        AffectedSOPClassUID = ds.SOPClassUID
        AffectedSOPInstanceUID = ds.SOPInstanceUID

    assert handler.serve(Request(), "1.2.840.10008.1.2.1", "STORESCU") == 0xA700
    assert handler.stats.refused == {0xA700: 1}
    assert not list(spool.spool_dir.rglob("*.dcm"))  # nothing kept, nothing quarantined
    assert not list(spool.quarantine_dir.iterdir())


# --- several receiver processes on one port (dicom.workers) ----------------------------------


def _node_settings(tmp_path: Path, **dicom: object) -> object:
    from core.settings import Settings

    return Settings.model_validate(
        {
            "dicom": {"port": free_port(), "stable_age_s": 3600, "low_water_mark_mb": 0, **dicom},
            "storage": {
                "root": str(tmp_path / "var"),
                "database_url": f"sqlite:///{tmp_path}/var/index.db",
            },
        }
    )


def test_two_receiver_processes_share_the_port_and_the_index(tmp_path: Path) -> None:
    require_tool("storescu")
    from dicom_node.node import DicomNode

    from .peers import RecordingAnalyser

    settings = _node_settings(tmp_path, workers=2)
    files = make_mr_series(tmp_path / "src", 48)
    with DicomNode(settings, RecordingAnalyser(tmp_path / "sr")) as node:  # type: ignore[arg-type]
        assert node.pool is not None and len(node.pool.pids()) == 2
        chunks = [files[i::6] for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda c: storescu(c, node.port), chunks))
        assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results]
        study = node.index.get_study(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert study is not None and study["instances"] == 48
        assert storescu(files[:4], node.port).returncode == 0  # resends are idempotent
        counts = node.counts()
        assert counts["instances"] == 48
        assert counts["ingest"]["stored"] == 48 and counts["ingest"]["duplicates"] == 4
        assert len(list(node.spool.spool_dir.rglob("*.dcm"))) == 48


def test_association_cap_holds_across_receiver_processes(tmp_path: Path) -> None:
    from pynetdicom import AE

    from dicom_node.node import DicomNode

    from .peers import RecordingAnalyser

    settings = _node_settings(tmp_path, workers=2, max_associations=2)
    with DicomNode(settings, RecordingAnalyser(tmp_path / "sr")) as node:  # type: ignore[arg-type]
        ae = AE(ae_title="CAPSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = [ae.associate("127.0.0.1", node.port, ae_title="RADTRIAGE") for _ in range(2)]
        assert all(a.is_established for a in held)
        # whichever process the kernel hands it to, a third one is over the shared cap
        for _ in range(4):
            extra = ae.associate("127.0.0.1", node.port, ae_title="RADTRIAGE")
            assert extra.is_rejected
            assert (extra.acceptor.primitive.result, extra.acceptor.primitive.diagnostic) == (
                0x02,
                0x02,
            )
        held[0].release()
        deadline = time.monotonic() + 10
        again = None
        while time.monotonic() < deadline:
            again = ae.associate("127.0.0.1", node.port, ae_title="RADTRIAGE")
            if again.is_established:
                break
            time.sleep(0.1)
        assert again is not None and again.is_established  # the released slot is free again
        again.release()
        held[1].release()


def test_a_killed_receiver_process_is_restarted_and_nothing_acknowledged_is_lost(
    tmp_path: Path,
) -> None:
    require_tool("storescu")
    from dicom_node.node import DicomNode

    from .peers import RecordingAnalyser

    settings = _node_settings(tmp_path, workers=2)
    files = make_mr_series(tmp_path / "src", 80, rows=128, columns=128)
    with DicomNode(settings, RecordingAnalyser(tmp_path / "sr")) as node:  # type: ignore[arg-type]
        assert node.pool is not None
        victims = node.pool.pids()
        senders = [
            subprocess.Popen(
                [require_tool("storescu"), "-v", "-aec", "RADTRIAGE", "127.0.0.1", str(node.port)]
                + [str(f) for f in chunk],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for chunk in (files[0::2], files[1::2])
        ]
        deadline = time.monotonic() + 30
        while node.counts()["ingest"]["stored"] < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in victims:  # both processes, mid-association
            os.kill(pid, signal.SIGKILL)
        logs = [s.communicate(timeout=60)[0] for s in senders]
        deadline = time.monotonic() + 60
        while node.pool.restarts < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.pool.restarts == 2 and not set(node.pool.pids()) & set(victims)
        acked = {
            pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            for log in logs
            for f in _acknowledged(log)
        }
        indexed = {
            row["sop_instance_uid"]
            for st in node.index.list_studies()
            for row in _instances(node.index, str(st["study_instance_uid"]))
        }
        assert acked <= indexed  # every acknowledged instance is indexed (and on disk)
        assert len(acked) < len(files)  # the kill did land mid-transfer
        # the restarted processes receive again; the rest of the series arrives
        assert storescu(files, node.port).returncode == 0
        assert node.index.counts()["instances"] == 80


def _acknowledged(log: str) -> list[Path]:
    """Files storescu -v reports a Success response for."""
    out, current = [], None
    for line in log.splitlines():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            out.append(current)
            current = None
    return out


def _instances(index: Index, study_uid: str) -> list[dict[str, object]]:
    from sqlalchemy import select

    from store.index import Instance, Study

    with index.read() as s:
        rows = s.execute(
            select(Instance.sop_instance_uid, Instance.path)
            .join(Study, Study.id == Instance.study_fk)
            .where(Study.study_instance_uid == study_uid)
        ).all()
    for _, path in rows:
        assert Path(path).is_file()
    return [{"sop_instance_uid": sop} for sop, _ in rows]


def test_worker_board_counts_associations_across_processes(tmp_path: Path) -> None:
    from dicom_node.workers import WorkerBoard

    parent = WorkerBoard(tmp_path / "run", 2, create=True)
    worker0 = WorkerBoard(tmp_path / "run", 2, create=False)  # another process's mapping
    worker1 = WorkerBoard(tmp_path / "run", 2, create=False)
    assert worker0.take_slot(0, limit=2) and worker1.take_slot(1, limit=2)
    assert not worker0.take_slot(0, limit=2)  # the other process's slot counts too
    assert parent.open_associations() == 2
    worker1.free_slot(1)
    assert worker0.take_slot(0, limit=2) and parent.row(0)["associations"] == 2
    worker0.set(0, stored=7)
    assert parent.row(0)["stored"] == 7
    assert parent.row(0)["associations"] == 2  # writing a counter leaves the gauges alone
    # the least busy worker by open connections (counted from accept) is chosen to accept
    worker0.add(0, "connections", 1)
    assert worker0.busier_than_least(0) and not worker1.busier_than_least(1)
    worker1.add(1, "connections", 1)
    assert not worker0.busier_than_least(0)
    worker1.add(1, "connections", -5)
    assert parent.row(1)["connections"] == 0  # never below 0
    for board in (parent, worker0, worker1):
        board.close()


def test_an_accepted_connection_counts_before_its_association(tmp_path: Path) -> None:
    """A connection counts on the board (what `busier_than_least` compares) from its accept,
    before it has sent an A-ASSOCIATE-RQ, and uncounts when it ends."""
    import socket

    from dicom_node.node import DicomNode

    from .peers import RecordingAnalyser

    settings = _node_settings(tmp_path, workers=2)
    with DicomNode(settings, RecordingAnalyser(tmp_path / "sr")) as node:  # type: ignore[arg-type]
        board = node.pool.board  # type: ignore[union-attr]

        def connections() -> list[int]:
            return [board.row(i)["connections"] for i in range(2)]

        deadline = time.monotonic() + 10

        def wait_for(total: int) -> int:
            while sum(connections()) != total and time.monotonic() < deadline:
                time.sleep(0.02)
            return sum(connections())

        first = socket.create_connection(("127.0.0.1", node.port))
        assert wait_for(1) == 1  # counted although no A-ASSOCIATE-RQ was sent
        second = socket.create_connection(("127.0.0.1", node.port))
        assert wait_for(2) == 2
        first.close()
        second.close()
        assert wait_for(0) == 0
        assert connections() == [0, 0]
        assert connections() == [0, 0]


def test_reactor_clock_sleeps_normally_outside_reactor_threads() -> None:
    from pynetdicom import association, dul

    from dicom_node import reactor_wakeup

    reactor_wakeup.install()
    assert isinstance(association.time, reactor_wakeup.ReactorClock)
    assert isinstance(dul.time, reactor_wakeup.ReactorClock)
    clock = reactor_wakeup.ReactorClock()
    started = time.monotonic()
    clock.sleep(0.05)  # this thread has no waiter: a real sleep
    assert time.monotonic() - started >= 0.05
    assert clock.monotonic() > 0  # everything else is the time module's
