"""HL7 v2 orders in: a real MLLP client on loopback against the node's listener."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import select

from core.domain import ReferralUrgency
from core.settings import Hl7Settings
from ris.hl7 import Hl7Error
from ris.hl7_listener import Hl7Listener, parse_order_message
from ris.orders import ORDER_CANCELLED, Order, match_orders, order_for_study
from store.index import Index, Study

from .hl7_peers import index_study, omi_o23, orm_o01, segment, send


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(f"sqlite:///{tmp_path}/index.db")


@pytest.fixture
def listener(index: Index) -> Iterator[Hl7Listener]:
    with Hl7Listener(index, Hl7Settings(), port=0) as server:
        yield server


def _orders(index: Index) -> list[Order]:
    with index.read() as s:
        return list(s.scalars(select(Order).order_by(Order.id)))


def test_parse_orm_o01_v23_fields() -> None:
    msg = parse_order_message(
        orm_o01("M1", "PLC1", priority="S", reason="2WW", psa="7.2", request_date="20261110")
    )
    (u,) = msg.updates
    assert (msg.version, msg.message_type, msg.control_id) == ("2.3", "ORM^O01", "M1")
    assert u.referral_urgency is ReferralUrgency.URGENT
    assert u.request_date == date(2026, 11, 10)
    assert (u.accession_number, u.patient_id, u.issuer_of_patient_id) == (
        "ACC001",
        "PAT001",
        "HOSP",
    )
    assert u.suspected_cancer_pathway is True
    assert u.psa_ng_ml == pytest.approx(7.2)
    assert u.clinical_details == "Raised PSA & LUTS"  # HL7 escape \T\ decoded


def test_parse_omi_o23_v251_fields() -> None:
    (u,) = parse_order_message(omi_o23("M2", "PLC2", priority="A", study_uid="1.2.3.4")).updates
    assert u.referral_urgency is ReferralUrgency.SOON
    assert (u.accession_number, u.study_instance_uid) == ("ACC002", "1.2.3.4")
    assert u.request_date == date(2026, 11, 18)


@pytest.mark.parametrize(
    ("text", "ack", "code"),
    [
        ("not hl7 at all", "AR", 100),
        (orm_o01("M3", "P3", version="2.7"), "AR", 203),
        (orm_o01("M3", "P3").replace("ORM^O01", "ADT^A01"), "AR", 200),
        (orm_o01("M3", "P3", control="ZZ"), "AE", 103),
        (orm_o01("M3", "P3", priority="X"), "AE", 103),
        (orm_o01("M3", "P3", psa="abc"), "AE", 102),
        (orm_o01("M3", "P3", psa="4.0", psa_unit="mmol/L"), "AE", 102),
        (orm_o01("M3", ""), "AE", 101),
        (orm_o01("M3", "P3", request_date="2026-11-20"), "AE", 102),
    ],
)
def test_malformed_messages_say_what_is_wrong(text: str, ack: str, code: int) -> None:
    with pytest.raises(Hl7Error) as err:
        parse_order_message(text)
    assert (err.value.ack, err.value.code) == (ack, code)


@pytest.mark.integration
def test_order_then_images(index: Index, listener: Hl7Listener, tmp_path: Path) -> None:
    (ack,) = send(listener.port, orm_o01("M10", "PLC10", priority="S", accession="ACC10"))
    assert segment(ack, "MSA")[1:3] == ["AA", "M10"]
    assert segment(ack, "MSH")[8] == "ACK^O01"
    (order,) = _orders(index)
    assert order.study_instance_uid is None  # no images yet
    uid = index_study(index, tmp_path / "s", patient_id="PAT001", accession="ACC10")
    assert match_orders(index) == 1
    with index.read() as s:
        view = order_for_study(s, uid)
        study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
    assert view is not None and view.referral_urgency is ReferralUrgency.URGENT
    assert study.referral_urgency == "urgent"  # the order orders the analysis queue too


@pytest.mark.integration
def test_images_then_order_by_patient_id_and_issuer(
    index: Index, listener: Hl7Listener, tmp_path: Path
) -> None:
    other = index_study(index, tmp_path / "o", patient_id="PAT002", issuer="OTHER", seed=1)
    uid = index_study(index, tmp_path / "s", patient_id="PAT002", issuer="HOSP", seed=2)
    (ack,) = send(listener.port, omi_o23("M20", "PLC20", accession="NOT-IN-PACS", psa="5.0"))
    assert segment(ack, "MSA")[1] == "AA"
    assert segment(ack, "MSH")[8] == "ACK^O23^ACK"
    (order,) = _orders(index)
    assert order.study_instance_uid == uid != other  # same MRN, other issuer: not matched
    assert order.psa_ng_ml == pytest.approx(5.0)


@pytest.mark.integration
def test_change_then_cancel(index: Index, listener: Hl7Listener, tmp_path: Path) -> None:
    uid = index_study(index, tmp_path / "s", patient_id="PAT001", accession="ACC30")
    acks = send(
        listener.port,
        orm_o01("M30", "PLC30", accession="ACC30", priority="R"),
        orm_o01("M31", "PLC30", control="XO", accession="ACC30", priority="S"),
    )
    assert [segment(a, "MSA")[1] for a in acks] == ["AA", "AA"]
    with index.read() as s:
        view = order_for_study(s, uid)
    assert view is not None and view.referral_urgency is ReferralUrgency.URGENT
    (ack,) = send(listener.port, orm_o01("M32", "PLC30", control="CA", accession="ACC30"))
    assert segment(ack, "MSA")[1] == "AA"
    (order,) = _orders(index)
    assert order.state == ORDER_CANCELLED and order.changes == 2
    with index.read() as s:
        assert order_for_study(s, uid) is None


@pytest.mark.integration
def test_malformed_message_is_refused_and_nothing_applied(
    index: Index, listener: Hl7Listener
) -> None:
    good = orm_o01("M40", "PLC40")
    bad_second_order = good + "ORC|ZZ|PLC41\rOBR|1|PLC41\r"  # two order groups, one bad
    acks = send(
        listener.port,
        bad_second_order,
        "MSH|^~\\&|RIS|HOSP|RADTRIAGE|HOSP|20261201||ORM^O01|M41|P|2.9\r",
        orm_o01("M42", "UNKNOWN", control="CA"),
    )
    msa = [segment(a, "MSA") for a in acks]
    assert [m[1] for m in msa] == ["AE", "AR", "AE"]
    assert "ORC-1" in msa[0][3]  # v2.3: MSA-3 and ERR-1 carry the reason
    assert segment(acks[0], "ERR")[1].endswith("103&Table value not found&HL70357")
    assert "UNKNOWN" in msa[2][3]
    assert _orders(index) == []  # the good first order of the bad message was not applied
    (ack,) = send(listener.port, good)  # the connection and the listener carry on
    assert segment(ack, "MSA")[1] == "AA"


@pytest.mark.integration
def test_peer_outside_the_allowlist_is_disconnected(index: Index) -> None:
    settings = Hl7Settings(allowed_hosts=["10.9.9.9"])
    with (
        Hl7Listener(index, settings, port=0) as server,
        pytest.raises((asyncio.IncompleteReadError, ConnectionError)),
    ):
        send(server.port, orm_o01("M50", "PLC50"))
    assert _orders(index) == []


def test_demo_orders_are_valid_omi_o23_and_its_ris_summary_reads_oru(tmp_path: Path) -> None:
    from cli.demo import DEMO_ORDERS, DemoStudy, format_oru, order_message
    from core.domain import ModelInfo, Priority, StudyStatus, TriageResult
    from core.settings import Hl7Destination
    from ris.hl7_results import ResultReport, build_oru

    from .peers import make_mr_series

    make_mr_series(tmp_path / "s", 1, patient_id="PHANTOM-1")
    study = DemoStudy(tmp_path, "1.2.826.0.1.3680043.8.498.7", "csPCa", "siemens")
    for number, (_, priority, psa, _late) in enumerate(DEMO_ORDERS, start=1):
        (u,) = parse_order_message(order_message(study, number, priority, psa)).updates
        assert u.study_instance_uid == study.study_instance_uid
        assert u.referral_urgency is ReferralUrgency.from_hl7(priority)
        assert u.psa_ng_ml == psa
    result = TriageResult(
        study_instance_uid=study.study_instance_uid,
        status=StudyStatus.REPORTED,
        priority=Priority.URGENT,
        case_likelihood=0.7,
        psa_density=0.21,
        model=ModelInfo(name="m", version="1", sha256="0"),
    )
    dest = Hl7Destination(name="ris", host="127.0.0.1", port=1)
    oru = build_oru(
        ResultReport(result, accession_number="PH1", placer_order_number="DEMO0001"),
        dest,
        Hl7Settings(),
        "RT1",
    )
    line = format_oru([oru])
    assert "PH1" in line and "DEMO0001" in line and "preliminary" in line
    assert "Urgent" in line and "0.210" in line


def test_hl7_settings_loopback_by_default_and_allowlist_validated() -> None:
    from core.errors import ConfigError
    from core.settings import load_settings

    default = load_settings(environ={}).hl7
    assert default.listen_port is None and default.bind_address == "127.0.0.1"
    assert default.allowed_hosts == []  # empty = loopback only (core/peers.py)
    with pytest.raises(ConfigError, match="allowed_hosts"):
        load_settings(environ={"RADTRIAGE_HL7__ALLOWED_HOSTS": '["ris.example"]'})
    hl7 = load_settings(
        environ={
            "RADTRIAGE_HL7__LISTEN_PORT": "2575",
            "RADTRIAGE_HL7__DESTINATIONS": '[{"name": "ris", "host": "10.0.0.5", "port": 2576, '
            '"receiving_facility": "HOSP"}]',
        }
    ).hl7
    assert hl7.listen_port == 2575 and hl7.destinations[0].receiving_facility == "HOSP"


def test_demo_skips_its_orders_when_the_listener_is_down(tmp_path: Path) -> None:
    import socket

    from cli.demo import DemoStudy, send_orders

    from .peers import make_mr_series

    make_mr_series(tmp_path / "s", 1)
    studies = [DemoStudy(tmp_path, f"1.2.3.{i}", "x", "ge") for i in range(4)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert send_orders(studies, port, after_images=False) is False


@pytest.mark.integration
def test_demo_orders_reach_a_listener(index: Index, listener: Hl7Listener, tmp_path: Path) -> None:
    from cli.demo import DemoStudy, send_orders

    from .peers import make_mr_series

    make_mr_series(tmp_path / "s", 1)
    studies = [DemoStudy(tmp_path, f"1.2.3.{i}", "x", "ge") for i in range(4)]
    assert send_orders(studies, listener.port, after_images=False) is True
    assert send_orders(studies, listener.port, after_images=True) is True
    assert len(_orders(index)) == 3
