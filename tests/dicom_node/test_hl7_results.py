"""Results out to the RIS: ORU^R01 content and the durable HL7 outbox against a real MLLP peer."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cli.demo.ris import RecordingRis
from core.domain import LesionResult, ModelInfo, Priority, StudyStatus, TriageResult
from core.settings import Hl7Destination, Hl7Settings
from dicom_node.index import Index
from ris.hl7_results import (
    HL7_DEAD,
    HL7_PENDING,
    HL7_SENT,
    Hl7Sender,
    ResultReport,
    build_oru,
    enqueue_result,
    outbox_rows,
)

from .hl7_peers import segment

RESULT = TriageResult(
    study_instance_uid="1.2.826.0.1.3680043.8.498.1",
    status=StudyStatus.REPORTED,
    priority=Priority.URGENT,
    case_likelihood=0.81,
    gland_volume_ml=42.0,
    psa_density=0.171,
    lesions=(
        LesionResult(likelihood=0.8, volume_ml=1.2, centroid_mm=(1, 2, 3), category="ai_high"),
    ),
    model=ModelInfo(name="cspca_detector", version="0.1.0", sha256="0" * 64),
    disclaimer="NOT FOR CLINICAL USE: demonstration model trained on synthetic data.",
    referral_urgency="soon",
    days_waited=12,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(port: int, **kw: object) -> Hl7Settings:
    dest = Hl7Destination(name="ris", host="127.0.0.1", port=port, receiving_facility="HOSP")
    return Hl7Settings(destinations=[dest], ack_timeout_s=2.0, **kw)  # type: ignore[arg-type]


def _obx(message: str) -> dict[str, list[str]]:
    rows = [line.split("|") for line in message.split("\r") if line.startswith("OBX|")]
    return {r[3].split("^")[0]: r for r in rows}


def test_oru_carries_every_value_coded() -> None:
    report = ResultReport(
        RESULT,
        patient_id="PAT|001",  # hostile: a field separator in a value
        issuer_of_patient_id="HOSP",
        patient_name="Doe^John",
        accession_number="ACC001",
        placer_order_number="PLC1",
        filler_order_number="FIL1",
        sr_sop_instance_uid="1.2.826.0.1.3680043.8.498.2",
    )
    text = build_oru(report, _settings(1).destinations[0], Hl7Settings(), "RT1")
    assert segment(text, "MSH")[8:12] == ["ORU^R01^ORU_R01", "RT1", "P", "2.5.1"]
    assert segment(text, "PID")[3] == "PAT\\F\\001^^^HOSP"
    obr = segment(text, "OBR")
    assert (obr[2], obr[3], obr[18], obr[25]) == ("PLC1", "FIL1", "ACC001", "P")
    obx = _obx(text)
    assert obx["RT001"][5].startswith("RT101^Urgent")
    assert obx["RT002"][5] == "0.810"
    assert obx["RT510"][5:7] == ["42.0", "mL^milliliter^UCUM"]
    assert obx["RT006"][5] == "0.171"
    assert obx["RT511"][5] == "1"
    assert obx["RT512"][5] == "cspca_detector 0.1.0"
    assert obx["RT513"][5].startswith("NOT FOR CLINICAL USE")
    assert obx["110180"][5] == RESULT.study_instance_uid
    assert obx["RT514"][5] == "1.2.826.0.1.3680043.8.498.2"


def test_correction_is_status_c() -> None:
    text = build_oru(
        ResultReport(RESULT, correction=True), _settings(1).destinations[0], Hl7Settings(), "RT2"
    )
    assert segment(text, "OBR")[25] == "C"
    assert all(r[11] == "C" for r in _obx(text).values())


def _queue(index: Index, settings: Hl7Settings) -> None:
    with index.write() as s:
        enqueue_result(s, ResultReport(RESULT, accession_number="ACC001"), settings, now=0.0)


@pytest.mark.integration
def test_ris_receives_and_acks(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/i.db")
    with RecordingRis() as ris:
        settings = _settings(ris.port)
        _queue(index, settings)
        assert Hl7Sender(index, settings, clock=lambda: 1.0).run_once() == 1
    (row,) = outbox_rows(index)
    assert row["state"] == HL7_SENT and row["attempts"] == 1
    (received,) = ris.messages
    assert segment(received, "MSH")[9] == row["message_control_id"]


@pytest.mark.integration
def test_ris_down_retries_with_backoff_then_dead_letter(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/i.db")
    settings = _settings(_free_port(), max_attempts=3, initial_backoff_s=10.0)
    _queue(index, settings)
    now = [1.0]
    sender = Hl7Sender(index, settings, clock=lambda: now[0])
    assert sender.run_once() == 0
    (row,) = outbox_rows(index)
    assert (row["state"], row["attempts"], row["next_attempt_at"]) == (HL7_PENDING, 1, 11.0)
    assert "no ACK" in row["last_error"]
    assert sender.run_once() == 0 and outbox_rows(index)[0]["attempts"] == 1  # not due yet
    now[0] = 11.0
    sender.run_once()
    assert outbox_rows(index)[0]["next_attempt_at"] == 31.0  # 10 s, then 20 s
    now[0] = 31.0
    sender.run_once()
    (row,) = outbox_rows(index)
    assert row["state"] == HL7_DEAD and row["attempts"] == 3
    assert "gave up after 3 attempts" in row["last_error"]


@pytest.mark.integration
def test_ae_is_retried_and_ar_is_a_dead_letter(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/i.db")
    with RecordingRis(ack_code="AE") as ris:
        settings = _settings(ris.port, max_attempts=5)
        _queue(index, settings)
        now = [1.0]
        sender = Hl7Sender(index, settings, clock=lambda: now[0])
        sender.run_once()
        (row,) = outbox_rows(index)
        assert (row["state"], row["attempts"]) == (HL7_PENDING, 1)
        assert row["last_error"].startswith("AE from ris: test RIS refuses")
        ris.ack_code = "AA"
        now[0] = 100.0
        assert sender.run_once() == 1
        ris.ack_code = "AR"
        _queue(index, settings)
        sender.run_once()
    rows = outbox_rows(index)
    assert [r["state"] for r in rows] == [HL7_SENT, HL7_DEAD]
    assert rows[1]["attempts"] == 1 and rows[1]["last_error"].startswith("AR from ris")
    assert len(ris.messages) == 3
