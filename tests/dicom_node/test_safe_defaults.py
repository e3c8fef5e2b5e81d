"""Safe defaults of the DICOM node: loopback-only peers unless an allowlist opens the port, a
maximum PDU size and association count, TLS hostname checks on the sending side, no database
password in errors, patient identity keyed by Patient ID + Issuer of Patient ID."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from core.errors import ConfigError
from core.redact import redact
from core.settings import Destination, DicomSettings, SenderSettings, TlsSettings, load_settings
from dicom_node.scp import StorageSCP, StoreHandler, client_ssl_context, peer_refusal
from store.index import MIGRATIONS, Index, InstanceRecord
from store.spool import Spool
from tests.campaigns import dicom_wire as wire
from tests.conftest import free_port, require_tool

# --- the policy as data -------------------------------------------------------------------------


def test_defaults_are_loopback_only_with_limits() -> None:
    d = DicomSettings()
    assert d.bind_address == "127.0.0.1"
    assert not d.open_beyond_loopback
    assert d.max_pdu_size == 131072 and d.max_associations == 16
    assert TlsSettings(certfile=Path("c"), keyfile=Path("k")).check_hostname is True
    for address in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert peer_refusal(d, address) is None, address
    for address in ("192.0.2.2", "10.0.0.1", "fd00::2", "::ffff:10.0.0.1", "pacs.example"):
        assert peer_refusal(d, address) is not None, address


def test_allowlists_open_the_port() -> None:
    hosts = DicomSettings(allowed_hosts=["10.1.0.0/16", "192.0.2.7"])
    assert hosts.open_beyond_loopback
    assert peer_refusal(hosts, "10.1.200.3") is None
    assert peer_refusal(hosts, "192.0.2.7") is None
    assert peer_refusal(hosts, "192.0.2.8") is not None
    assert peer_refusal(hosts, "127.0.0.1") is not None  # an allowlist replaces loopback
    aets = DicomSettings(allowed_calling_aets=["PACS"])
    assert not aets.open_beyond_loopback  # a calling AE title never opens the port
    assert peer_refusal(aets, "203.0.113.9") is not None


def test_limits_and_allowlist_entries_are_validated() -> None:
    for bad in ({"max_pdu_size": 0}, {"max_pdu_size": 1 << 30}, {"max_associations": 0}):
        with pytest.raises(ValueError):
            DicomSettings(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not an IP address or network"):
        load_settings(environ={"RADTRIAGE_DICOM__ALLOWED_HOSTS": '["pacs.example"]'})


# --- against the real SCP -----------------------------------------------------------------------


def _non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (the 'unknown host' of the tests)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
        address = str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator[object]:
    started: list[StorageSCP] = []

    def start(**kw: object) -> StorageSCP:
        settings = DicomSettings(port=free_port(), low_water_mark_mb=0, **kw)  # type: ignore[arg-type]
        root = tmp_path / f"scp{len(started)}"
        handler = StoreHandler(Spool(root / "var"), Index(f"sqlite:///{root}/index.db"))
        scp = StorageSCP(settings, handler)
        scp.start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def _associate_from(source: str, port: int, target: str) -> int:
    """A-ASSOCIATE-RQ from `source` to `target`: the answer's PDU type (2 AC, 3 RJ)."""
    with wire.RawAssociation(target, port, source=source) as assoc:
        answer = assoc.associate()
        if answer == 0x02:
            assoc.release()
        return answer


@pytest.mark.integration
def test_unknown_host_is_refused_by_default(scp_factory: object) -> None:
    other = _non_loopback_address()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    scp = scp_factory(bind_address="0.0.0.0")  # type: ignore[operator]
    assert _associate_from("127.0.0.1", scp.port, "127.0.0.1") == 0x02
    assert _associate_from(other, scp.port, other) == 0x03  # A-ASSOCIATE-RJ
    opened = scp_factory(bind_address="0.0.0.0", allowed_hosts=[f"{other}/32"])  # type: ignore[operator]
    assert _associate_from(other, opened.port, other) == 0x02


@pytest.mark.integration
def test_echoscu_from_loopback_and_start_up_log(
    scp_factory: object, caplog: pytest.LogCaptureFixture
) -> None:
    echoscu = require_tool("echoscu")
    with caplog.at_level(logging.INFO, logger="dicom_node.scp"):
        scp = scp_factory()  # type: ignore[operator]
    assert "loopback peers only" in caplog.text and "max PDU 131072 bytes" in caplog.text
    cmd = [echoscu, "-aet", "ANY", "-aec", "RADTRIAGE", "127.0.0.1", str(scp.port)]
    assert subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dicom_node.scp"):
        scp_factory(allowed_calling_aets=["PACS"])  # type: ignore[operator]
    assert "loopback peers only" in caplog.text  # a title never opens the port
    assert "calling AE titles PACS" in caplog.text


@pytest.mark.integration
def test_oversized_pdu_is_aborted_and_the_scp_keeps_serving(scp_factory: object) -> None:
    scp = scp_factory(max_pdu_size=16384)  # type: ignore[operator]
    with wire.RawAssociation("127.0.0.1", scp.port) as assoc:
        assert assoc.associate() == 0x02
        assert assoc.peer_max_length == 16384  # what we announce
        assoc.send(wire.pdu(0x04, b"\x00" * 64, length=16385))  # one byte over, body unsent
        pdu_type, body = assoc.read_pdu()
        assert pdu_type == 0x07 and body[2:4] == b"\x02\x06"  # A-ABORT, invalid PDU parameter
    with wire.RawAssociation("127.0.0.1", scp.port) as assoc:
        assert assoc.associate() == 0x02
        assoc.send(wire.pdu(0x04, b"", length=0xFFFFFFFF))  # 4 GiB claimed: nothing allocated
        assert assoc.read_pdu()[0] == 0x07
    with wire.RawAssociation("127.0.0.1", scp.port) as assoc:  # still serving
        assert assoc.associate() == 0x02 and assoc.c_echo() == 0x0000


@pytest.mark.integration
def test_garbage_connections_do_not_hold_association_slots(scp_factory: object) -> None:
    scp = scp_factory(max_associations=2)  # type: ignore[operator]
    garbage = [b"\x01\x00\x00\x00\x00\x08garbage", wire.associate_rq()[:40], b"\x09junk"]
    for data in garbage * 2:  # each would hold a slot for the 10 s ACSE timeout otherwise
        wire.send_and_wait_close("127.0.0.1", scp.port, data, 5)
    deadline = time.monotonic() + 3
    while scp._ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not scp._ae.active_associations
    with wire.RawAssociation("127.0.0.1", scp.port) as assoc:
        assert assoc.associate() == 0x02 and assoc.c_echo() == 0x0000


# --- TLS: the sender checks the destination's host name -----------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True)


def _ca_and_server_cert(tmp: Path, san: str) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate it signed for `san` (openssl)."""
    ca_key, ca, key, csr, cert = (tmp / n for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem"))
    tmp.mkdir(parents=True, exist_ok=True)
    ext = tmp / "ext.cnf"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=radtriage test CA", "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=pacs", "-keyout", str(key),
             "-out", str(csr))  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return ca, cert, key


def _echo_over_tls(port: int, tls: TlsSettings, host: str = "127.0.0.1") -> bool:
    from pynetdicom import AE

    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(host, port, ae_title="RADTRIAGE", tls_args=(client_ssl_context(tls), host))
    ok = bool(assoc.is_established)
    if ok:
        assoc.release()
    return ok


@pytest.mark.integration
def test_tls_hostname_mismatch_fails_unless_configured_off(
    scp_factory: object, tmp_path: Path
) -> None:
    ca, cert, key = _ca_and_server_cert(tmp_path / "wrong", "DNS:pacs.other.example")
    ca2, cert2, key2 = _ca_and_server_cert(tmp_path / "right", "IP:127.0.0.1")
    wrong = scp_factory(tls=TlsSettings(certfile=cert, keyfile=key))  # type: ignore[operator]
    right = scp_factory(tls=TlsSettings(certfile=cert2, keyfile=key2))  # type: ignore[operator]

    client = TlsSettings(certfile=cert, keyfile=key, cafile=ca)
    assert not _echo_over_tls(wrong.port, client)  # signed by our CA, but for another host
    lax = TlsSettings(certfile=cert, keyfile=key, cafile=ca, check_hostname=False)
    assert _echo_over_tls(wrong.port, lax)
    assert _echo_over_tls(right.port, TlsSettings(certfile=cert2, keyfile=key2, cafile=ca2))

    # the sender passes the destination host, so its check is the same
    from core.domain import StudyStatus
    from dicom_node.jobs import JobWorker, transition
    from dicom_node.sender import Sender

    from .peers import RecordingAnalyser, index_series, make_mr_series

    index = Index(f"sqlite:///{tmp_path}/sender.db")
    uid = index_series(index, make_mr_series(tmp_path / "src", 1), 1.0)
    transition(index, uid, StudyStatus.COMPLETE)
    JobWorker(
        index, Spool(tmp_path / "out"), RecordingAnalyser(tmp_path / "sr"), ["pacs"]
    ).run_once()
    dest = Destination(
        name="pacs", ae_title="RADTRIAGE", host="127.0.0.1", port=wrong.port, tls=True
    )
    assert Sender(index, [dest], SenderSettings(), "RADTRIAGE", tls=client).run_once() == 0
    assert index.outbox()[0]["state"] == "pending" and wrong.handler.stats.stored == 0
    later = lambda: time.time() + 3600  # noqa: E731 - past the retry backoff
    sender = Sender(index, [dest], SenderSettings(), "RADTRIAGE", tls=lax, clock=later)
    assert sender.run_once() == 1 and wrong.handler.stats.stored == 1


# --- no database password in errors ------------------------------------------------------------


def test_database_password_never_in_errors() -> None:
    secret = "s3cr3t-pw"
    for url in (
        f"postgresql://radtriage:{secret}@127.0.0.1:1/radtriage",
        f"postgresql://radtriage:{secret}@@bad url",
        f"nosuchdialect://u:{secret}@h/db",
    ):
        with pytest.raises(ConfigError) as info:
            Index(url)
        assert secret not in info.value.message and secret not in str(info.value)
        assert info.value.__cause__ is None  # the driver's exception (with the URL) is dropped
    settings = load_settings(
        environ={"RADTRIAGE_STORAGE__DATABASE_URL": f"postgresql://u:{secret}@h/db"}
    )
    assert secret not in repr(settings) and secret not in str(settings)
    assert settings.storage.redacted_database_url == "postgresql://u:***@h/db"
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"RADTRIAGE_STORAGE__OTHER": f"postgresql://u:{secret}@h/db"})
    assert secret not in info.value.message
    assert redact(f"host=h password={secret} user=u") == "host=h password=*** user=u"


# --- patient identity --------------------------------------------------------------------------


def _rec(sop: str, study: str, patient_id: str, issuer: str) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        series_instance_uid=f"{study}.1",
        study_instance_uid=study,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=Path(f"/x/{sop}.dcm"),
        size_bytes=1,
        patient_id=patient_id,
        issuer_of_patient_id=issuer,
        modality="MR",
    )


def test_same_mrn_from_two_hospitals_is_two_patients(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    index.add_instance(_rec("1.1.1", "1.1", "12345", "HOSPITAL-A"), 1.0)
    index.add_instance(_rec("1.2.1", "1.2", "12345", "HOSPITAL-B"), 1.0)
    index.add_instance(_rec("1.3.1", "1.3", "12345", "HOSPITAL-A"), 1.0)
    with index.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT patient_id, issuer_of_patient_id FROM patients ORDER BY id")
        ).all()
    assert [tuple(r) for r in rows] == [("12345", "HOSPITAL-A"), ("12345", "HOSPITAL-B")]
    a, b = index.get_study("1.1"), index.get_study("1.2")
    assert a is not None and b is not None
    assert (a["issuer_of_patient_id"], b["issuer_of_patient_id"]) == ("HOSPITAL-A", "HOSPITAL-B")


def test_migration_0004_keeps_existing_patients_and_studies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    engine = create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
        conn.execute(
            text("INSERT INTO patients (id, patient_id, patient_name) VALUES (7, 'P', 'N')")
        )
        conn.execute(
            text(
                "INSERT INTO studies (id, study_instance_uid, patient_fk, accession_number, "
                "study_date, study_description, referral_urgency, urgency_rank, status, "
                "status_changed_at, first_received_at, last_received_at, instance_count, "
                "checked_instance_count, analysed_instance_count, attempts) VALUES "
                "(1, '1.2.3', 7, '', '', '', 'routine', 2, 'received', 0, 0, 0, 0, 0, 0, 0)"
            )
        )
    engine.dispose()
    index = Index(url)  # upgrades to head through 0004 with foreign keys on
    study = index.get_study("1.2.3")
    assert study is not None and study["patient_id"] == "P"
    assert study["issuer_of_patient_id"] == ""
    index.add_instance(_rec("9.1.1", "9.1", "P", "OTHER"), 1.0)  # same ID, other issuer: allowed
    with index.engine.connect() as conn:
        assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
        assert conn.execute(text("SELECT count(*) FROM patients")).scalar() == 2
