"""The HL7 listener's bounds (issue 23, finding 7 and "smaller"): processing ID P only unless
configured, field lengths refused with a clear AE (never 207), no exception text in ACKs, a
connection cap, an idle timeout, MLLP over TLS with client certificates. A real MLLP client on
loopback against the listener; a real SQLite index."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from hl7.mllp import open_hl7_connection
from sqlalchemy import select, text

from core.settings import Hl7Settings, TlsSettings
from ris.hl7_listener import Hl7Listener, handle_message
from ris.orders import FieldTooLong, Order, OrderControl, OrderUpdate
from store.index import Index
from tests.conftest import require_tool

from .hl7_peers import orm_o01, segment, send


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(f"sqlite:///{tmp_path}/index.db")


def _orders(index: Index) -> list[Order]:
    with index.read() as s:
        return list(s.scalars(select(Order)))


def _ack(index: Index, message: str, settings: Hl7Settings | None = None) -> list[str]:
    return segment(handle_message(index, message, settings or Hl7Settings(), 0.0), "MSA")


@pytest.mark.parametrize("processing", ["T", "D", "X", ""])
def test_training_and_debug_messages_are_refused_by_default(index: Index, processing: str) -> None:
    message = orm_o01("M1", "PLC1").replace("|ORM^O01|M1|P|", f"|ORM^O01|M1|{processing}|")
    answer = handle_message(index, message, Hl7Settings(), 0.0)
    assert segment(answer, "MSA")[1] == "AR"
    err = segment(answer, "ERR")
    assert "202" in "|".join(err) and "refused: only P may change orders" in answer
    assert _orders(index) == []


def test_processing_id_t_only_when_configured(index: Index) -> None:
    message = orm_o01("M1", "PLC1").replace("|ORM^O01|M1|P|", "|ORM^O01|M1|T|")
    assert _ack(index, message, Hl7Settings(processing_ids=["P", "T"]))[1] == "AA"
    assert _ack(index, orm_o01("M2", "PLC2"))[1] == "AA"


@pytest.mark.parametrize(
    ("field", "value"),
    [("placer", "P" * 65), ("accession", "A" * 65), ("patient", "X" * 65)],
)
def test_field_longer_than_its_column_is_a_clear_ae(index: Index, field: str, value: str) -> None:
    kwargs = {"placer": "PLC1", "accession": "ACC1", "patient": "PAT1"}
    kwargs[field] = value
    message = orm_o01("M1", kwargs["placer"], accession=kwargs["accession"])
    message = message.replace("PAT001", kwargs["patient"])
    answer = handle_message(index, message, Hl7Settings(), 0.0)
    msa, err = segment(answer, "MSA"), "|".join(segment(answer, "ERR"))
    assert msa[1] == "AE" and "102" in err and "longer than 64 characters" in answer
    assert "207" not in err
    assert _orders(index) == []


def test_field_lengths_come_from_the_order_table() -> None:
    with pytest.raises(FieldTooLong, match="placer_namespace is longer than 64"):
        OrderUpdate(OrderControl.NEW, "PLC", placer_namespace="urn:" + "s" * 61, patient_id="P")
    OrderUpdate(OrderControl.NEW, "PLC", placer_namespace="urn:" + "s" * 60, patient_id="P")


def test_internal_errors_carry_no_exception_text(index: Index) -> None:
    with index.write() as s:
        s.execute(text("DROP TABLE orders"))
    answer = handle_message(index, orm_o01("M1", "PLC1"), Hl7Settings(), 0.0)
    assert segment(answer, "MSA")[1] == "AE"
    assert "207" in answer
    for leak in ("orders", "OperationalError", "sqlite", "Traceback", "no such table"):
        assert leak not in answer, leak


async def _hold(port: int, n: int) -> list[bool]:
    """Open `n` connections at once and send an order on each: which got an ACK."""
    conns = [await open_hl7_connection("127.0.0.1", port) for _ in range(n)]
    await asyncio.sleep(0.2)
    ok = []
    for i, (reader, writer) in enumerate(conns):
        try:
            writer.writeblock(orm_o01(f"C{i}", f"PLC{i}").encode())
            await writer.drain()
            ok.append(bool(await asyncio.wait_for(reader.readblock(), 5)))
        except (asyncio.IncompleteReadError, ConnectionError):
            ok.append(False)
    for _, writer in conns:
        writer.close()
    return ok


@pytest.mark.integration
def test_connections_beyond_the_cap_are_closed(index: Index) -> None:
    with Hl7Listener(index, Hl7Settings(max_connections=2), port=0) as server:
        assert asyncio.run(_hold(server.port, 4)) == [True, True, False, False]
        assert server.refused_connections == 2
        (ack,) = send(server.port, orm_o01("M9", "PLC9"))  # slots are given back
        assert segment(ack, "MSA")[1] == "AA"


@pytest.mark.integration
def test_idle_connection_is_closed(index: Index) -> None:
    async def idle(port: int) -> bytes:
        reader, writer = await open_hl7_connection("127.0.0.1", port)
        writer.write(b"\x0bMSH|^~\\&|half a message")  # never finished
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(100), 5)  # b"": the server closed
        finally:
            writer.close()

    with Hl7Listener(index, Hl7Settings(idle_timeout_s=0.5), port=0) as server:
        assert asyncio.run(idle(server.port)) == b""
        assert server.connections == 0


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True)


def _pki(tmp: Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    p = {n: tmp / n for n in ("ca.key", "ca.pem", "s.key", "s.pem", "c.key", "c.pem", "x.csr")}
    ext = tmp / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=test CA", "-keyout", str(p["ca.key"]), "-out", str(p["ca.pem"]))  # fmt: skip
    for who in ("s", "c"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout",
                 str(p[f"{who}.key"]), "-out", str(p["x.csr"]))  # fmt: skip
        _openssl("x509", "-req", "-in", str(p["x.csr"]), "-CA", str(p["ca.pem"]), "-CAkey",
                 str(p["ca.key"]), "-CAcreateserial", "-days", "1", "-extfile", str(ext),
                 "-out", str(p[f"{who}.pem"]))  # fmt: skip
    return p


def _send_tls(port: int, ctx: ssl.SSLContext, message: str) -> str:
    async def go() -> str:
        reader, writer = await open_hl7_connection("127.0.0.1", port, ssl=ctx)
        try:
            writer.writeblock(message.encode())
            await writer.drain()
            return bytes(await asyncio.wait_for(reader.readblock(), 10)).decode()
        finally:
            writer.close()

    return asyncio.run(go())


@pytest.mark.integration
def test_mllp_over_tls_with_client_certificates(index: Index, tmp_path: Path) -> None:
    p = _pki(tmp_path)
    tls = TlsSettings(certfile=p["s.pem"], keyfile=p["s.key"], cafile=p["ca.pem"])
    with Hl7Listener(index, Hl7Settings(tls=tls, idle_timeout_s=5), port=0) as server:
        client = ssl.create_default_context(cafile=str(p["ca.pem"]))
        client.load_cert_chain(str(p["c.pem"]), str(p["c.key"]))
        ack = _send_tls(server.port, client, orm_o01("M1", "PLC1"))
        assert segment(ack, "MSA")[1] == "AA"
        anonymous = ssl.create_default_context(cafile=str(p["ca.pem"]))  # no client cert
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            _send_tls(server.port, anonymous, orm_o01("M2", "PLC2"))
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError, OSError)):
            send(server.port, orm_o01("M3", "PLC3"))  # plain MLLP on a TLS port
    assert [o.placer_order_number for o in _orders(index)] == ["PLC1"]


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        ("~A&C" * 20000, "more than 500 repetitions"),  # ~A^B&C took 26 s in hl7apy
        ("^A" * 100000, "more than 2000 components"),  # 35 s, then an internal error
        ("|X" * 4900, "more than 1000 fields"),
        ("&" * 20000, "more than 500 subcomponents"),
        ("\rNTE|1" * 600, "more than 500 segments"),
    ],
)
def test_messages_too_complex_to_parse_are_refused_at_once(
    index: Index, tail: str, why: str
) -> None:
    started = time.monotonic()
    answer = handle_message(index, orm_o01("M1", "PLC1").rstrip("\r") + tail, Hl7Settings(), 0)
    assert time.monotonic() - started < 1.0
    assert segment(answer, "MSA")[1:3] == ["AR", "M1"] and why in answer


def test_components_beyond_the_data_type_are_ignored(index: Index) -> None:
    message = orm_o01("M1", "PLC1").replace("PAT001", "PAT001" + "^X" * 30)
    assert _ack(index, message)[1] == "AA"  # was an internal error (AE 207)


@pytest.mark.integration
def test_plain_tcp_beyond_loopback_is_warned_about(
    index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ris.hl7_listener"):
        with Hl7Listener(index, Hl7Settings(), port=0):
            pass
        assert "loopback peers only" in caplog.text and "plain TCP" not in caplog.text
        with Hl7Listener(index, Hl7Settings(allowed_hosts=["10.0.0.0/8"]), port=0):
            pass
    assert "open beyond loopback (10.0.0.0/8) over plain TCP" in caplog.text
