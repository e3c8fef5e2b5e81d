"""Results out to the RIS: ORU^R01 content and the HL7 channel of the one outbox against a real
MLLP peer (retries, dead letters, latest wins after an outage)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cli.demo.ris import RecordingRis
from core.domain import LesionResult, ModelInfo, Priority, StudyStatus, TriageResult
from core.settings import Hl7Destination, Hl7Settings
from ris.hl7_results import Hl7Sender, ResultReport, build_oru, enqueue_result
from store.index import Index
from store.outbox import DEAD, PENDING, SENT, WITHDRAWN

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


def _rows(index: Index) -> list[dict]:
    return index.outbox(channel="hl7")


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
    (row,) = _rows(index)
    assert row["state"] == SENT and row["attempts"] == 1
    (received,) = ris.messages
    assert segment(received, "MSH")[9] == row["item_uid"]


@pytest.mark.integration
def test_ris_down_retries_with_backoff_then_dead_letter(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/i.db")
    settings = _settings(_free_port(), max_attempts=3, initial_backoff_s=10.0)
    _queue(index, settings)
    now = [1.0]
    sender = Hl7Sender(index, settings, clock=lambda: now[0])
    assert sender.run_once() == 0
    (row,) = _rows(index)
    assert (row["state"], row["attempts"], row["next_attempt_at"]) == (PENDING, 1, 11.0)
    assert "no ACK" in row["last_error"]
    assert sender.run_once() == 0 and _rows(index)[0]["attempts"] == 1  # not due yet
    now[0] = 11.0
    sender.run_once()
    assert _rows(index)[0]["next_attempt_at"] == 31.0  # 10 s, then 20 s
    now[0] = 31.0
    sender.run_once()
    (row,) = _rows(index)
    assert row["state"] == DEAD and row["attempts"] == 3
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
        (row,) = _rows(index)
        assert (row["state"], row["attempts"]) == (PENDING, 1)
        assert row["last_error"].startswith("AE from ris: test RIS refuses")
        ris.ack_code = "AA"
        now[0] = 100.0
        assert sender.run_once() == 1
        ris.ack_code = "AR"
        _queue(index, settings)
        sender.run_once()
    rows = _rows(index)
    assert [r["state"] for r in rows] == [SENT, DEAD]
    assert rows[1]["attempts"] == 1 and rows[1]["last_error"].startswith("AR from ris")
    assert len(ris.messages) == 3


@pytest.mark.integration
def test_ris_outage_ends_with_the_urgent_correction_only(tmp_path: Path) -> None:
    """The RIS is down while a routine ORU and then an urgent correction are queued; when it
    comes back it receives the urgent one only, and last."""
    from core import codes

    index = Index(f"sqlite:///{tmp_path}/i.db")
    port = _free_port()
    settings = _settings(port, initial_backoff_s=5.0)
    now = [1.0]
    sender = Hl7Sender(index, settings, clock=lambda: now[0])
    routine = RESULT.model_copy(update={"priority": Priority.ROUTINE, "case_likelihood": 0.05})
    with index.write() as s:
        enqueue_result(s, ResultReport(routine, accession_number="ACC001"), settings, now=0.0)
    assert sender.run_once() == 0  # RIS down: attempt 1 failed, retry at 6 s
    (first,) = _rows(index)
    assert (first["state"], first["attempts"]) == (PENDING, 1)
    with index.write() as s:
        enqueue_result(
            s, ResultReport(RESULT, accession_number="ACC001", correction=True), settings, 2.0
        )
    old, new = _rows(index)
    assert (old["state"], old["superseded_by"], new["state"]) == (WITHDRAWN, new["id"], PENDING)
    with RecordingRis(port=port) as ris:
        now[0] = 10.0
        assert sender.run_once() == 1
        assert sender.run_once() == 0  # the withdrawn routine ORU is never sent
    (received,) = ris.messages
    assert segment(received, "MSH")[9] == new["item_uid"]
    assert _obx(received)["RT001"][5].split("^")[0] == codes.PRIORITY_CODES["urgent"].value
    assert segment(received, "OBR")[25] == "C"
    assert [r["state"] for r in _rows(index)] == [WITHDRAWN, SENT]


@pytest.mark.integration
def test_a_ris_down_holds_back_only_its_own_messages(tmp_path: Path) -> None:
    """Order is kept per study and destination: a RIS that is down delays neither the other
    RIS nor, once a message waits for its retry, another study's first try."""
    index = Index(f"sqlite:///{tmp_path}/i.db")
    down = _free_port()
    with RecordingRis() as ris:
        up = Hl7Destination(name="up", host="127.0.0.1", port=ris.port)
        gone = Hl7Destination(name="down", host="127.0.0.1", port=down)
        settings = Hl7Settings(destinations=[up, gone], ack_timeout_s=2.0, initial_backoff_s=5.0)
        now = [1.0]
        sender = Hl7Sender(index, settings, clock=lambda: now[0])
        with index.write() as s:
            enqueue_result(s, ResultReport(RESULT), settings, now=0.0)
        assert sender.run_once() == 1  # "up" took it; "down" failed, retry at 6 s
        other = RESULT.model_copy(update={"study_instance_uid": "1.2.826.0.1.3680043.8.498.9"})
        with index.write() as s:
            enqueue_result(s, ResultReport(other), settings, now=2.0)
        now[0] = 3.0
        # the other study's message to "down" is tried (another study: not held back)
        assert sender.run_once() == 1
        states = {(r["study_instance_uid"][-1], r["destination"]): r for r in _rows(index)}
        assert states[("1", "down")]["attempts"] == 1  # not due: not tried again
        assert states[("9", "down")]["attempts"] == 1
    assert len(ris.messages) == 2


def test_result_status_follows_what_the_ris_may_hold(tmp_path: Path) -> None:
    """OBR-25 is P until a result of the study reached (or was tried at) the RIS, then C; a
    first result withdrawn before it left does not make the next one a correction."""
    from store import outbox

    index = Index(f"sqlite:///{tmp_path}/i.db")
    settings = _settings(1)
    for now in (0.0, 1.0):  # the second withdraws the first: the RIS heard nothing yet
        with index.write() as s:
            enqueue_result(s, ResultReport(RESULT, correction=True), settings, now=now)
    status = [segment(r["payload"], "OBR")[25] for r in _rows(index)]
    assert status == ["P", "P"] and _rows(index)[0]["state"] == WITHDRAWN
    with index.write() as s:
        outbox.record_sent(s, _rows(index)[1]["id"], 2.0)
        enqueue_result(s, ResultReport(RESULT), settings, now=3.0)
    assert segment(_rows(index)[2]["payload"], "OBR")[25] == "C"
