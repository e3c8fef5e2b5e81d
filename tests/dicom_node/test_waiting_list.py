"""The live waiting list: priorities recomputed as days pass, superseding SRs and HL7 updates,
with orders from a real MLLP client and results to a real MLLP RIS on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, text

from cli.demo.ris import RecordingRis
from core.domain import ModelRef, Priority, ReferralUrgency, StudyStatus, TriageResult
from core.priority import Thresholds, decide_priority
from core.settings import Hl7Destination, Hl7Settings, Settings, TriageSettings
from dicom_node.evidence import scan_evidence
from dicom_node.sr import build_triage_sr
from dicom_node.sr_reader import read_triage_sr
from evaluation.simulate import queue_rank
from imaging.study_reader import scan_study
from ris.hl7_listener import Hl7Listener
from ris.hl7_results import Hl7Sender
from ris.node import RisNode
from ris.orders import OrderControl, OrderUpdate, apply_order
from store.index import Index, Instance, OutboxItem
from store.outbox import PENDING, SENT, WITHDRAWN
from store.spool import Spool
from triage.waiting_list import LiveWaitingList, WaitingInputs, WaitingList, decide_today

from .hl7_peers import MODEL, index_study, mark_reported, orm_o01, segment, send
from .pg import postgresql_server  # noqa: F401  (the postgresql_url fixture)

THRESHOLDS = Thresholds(urgent=0.6, soon=0.3)
ANALYSED_ON = date(2026, 11, 24)
REPORTED_AT = datetime(2026, 11, 24, 9, tzinfo=UTC).timestamp()


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(f"sqlite:///{tmp_path}/index.db")


@pytest.fixture
def ris() -> Iterator[RecordingRis]:
    with RecordingRis() as peer:
        yield peer


def _first_sr(index: Index, uid: str, result: TriageResult, folder: Path) -> Path:
    """The SR the analysis sent (built by the product's SR builder)."""
    with index.read() as s:
        paths = [Path(p) for p in s.scalars(select(Instance.path))]
    evidence = scan_evidence(scan_study(paths))
    series = str(evidence[0].SeriesInstanceUID)
    result = result.model_copy(update={"series_used": {"t2w": series}})
    model = ModelRef(MODEL.name, MODEL.version, MODEL.sha256)
    sr = build_triage_sr(result, evidence={"t2w": evidence}, model=model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "first_sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def _waiting_list(
    index: Index, tmp_path: Path, ris_port: int | None, today: str, fhir: str | None = None
) -> WaitingList:
    dests = [Hl7Destination(name="ris", host="127.0.0.1", port=ris_port)] if ris_port else []
    return WaitingList(
        index,
        Spool(tmp_path / "var"),
        TriageSettings(today=date.fromisoformat(today)),
        Hl7Settings(destinations=dests, ack_timeout_s=2.0, fhir_base_url=fhir),
        thresholds=lambda model: THRESHOLDS if model.name == MODEL.name else None,
        dicom_destinations=["pacs"],
    )


def _columns(index: Index, uid: str) -> tuple[str, int, str | None, float | None]:
    with index.read() as s:
        row = s.execute(
            text(
                "SELECT priority, priority_rank, request_date, psa_density FROM studies "
                "WHERE study_instance_uid = :uid"
            ),
            {"uid": uid},
        ).one()
    return row[0], row[1], row[2], row[3]


def _reported(index: Index, tmp_path: Path, *, accession: str, days_waited: int) -> str:
    uid = index_study(index, tmp_path / accession, patient_id="PAT001", accession=accession)
    result = mark_reported(
        index,
        uid,
        likelihood=0.1,
        priority=Priority.ROUTINE,
        days_waited=days_waited,
        reported_at=REPORTED_AT,
    )
    result = result.model_copy(update={"series_used": {"t2w": _series(index, uid)}})
    sr = _first_sr(index, uid, result, tmp_path / "sr" / accession)
    mark_reported(
        index,
        uid,
        likelihood=0.1,
        priority=Priority.ROUTINE,
        days_waited=days_waited,
        reported_at=REPORTED_AT,
        sr_path=sr,
    )
    with index.write() as s:  # keep the series used, as the analysis does
        s.execute(
            text("UPDATE studies SET result_json = :r WHERE study_instance_uid = :uid"),
            {"r": json.dumps(result.to_json_dict()), "uid": uid},
        )
    return uid


def _series(index: Index, uid: str) -> str:
    with index.read() as s:
        return str(
            s.execute(
                text(
                    "SELECT se.series_instance_uid FROM series se JOIN studies st "
                    "ON se.study_fk = st.id WHERE st.study_instance_uid = :uid"
                ),
                {"uid": uid},
            ).scalar_one()
        )


@pytest.mark.integration
def test_study_becomes_urgent_when_today_passes_its_escalation_date(
    index: Index, tmp_path: Path, ris: RecordingRis
) -> None:
    """Routine on day 5; day 25 (28 - 3) is its escalation date: urgent without re-analysis,
    a superseding SR to PACS and a corrected ORU^R01 to the RIS."""
    uid = _reported(index, tmp_path, accession="ACC1", days_waited=5)
    request = ANALYSED_ON - timedelta(days=5)

    day = _waiting_list(index, tmp_path, ris.port, (request + timedelta(days=24)).isoformat())
    report = day.tick()
    assert (report.studies, report.superseding_srs, report.hl7_messages) == (1, 1, 1)
    assert _columns(index, uid)[:3] == ("soon", Priority.SOON.rank, request.strftime("%Y%m%d"))
    sender = Hl7Sender(index, day.hl7)
    assert sender.run_once() == 1  # the RIS hears "soon" before the next day's tick

    later = _waiting_list(index, tmp_path, ris.port, (request + timedelta(days=25)).isoformat())
    report = later.tick()
    assert (report.changed, report.superseding_srs, report.hl7_messages) == (1, 1, 1)
    assert _columns(index, uid)[:2] == ("urgent", Priority.URGENT.rank)
    assert later.tick().superseding_srs == 0  # same day, same flag: nothing re-sent

    with index.read() as s:
        dicom = list(
            s.scalars(
                select(OutboxItem).where(
                    OutboxItem.study_instance_uid == uid, OutboxItem.channel == "dicom"
                )
            )
        )
    assert len(dicom) == 2  # one superseding SR per change, to the PACS destination
    # no DICOM sender ran: the urgent SR withdrew the soon one, which PACS never gets
    assert [o.state for o in dicom] == [WITHDRAWN, PENDING]
    urgent_sr = pydicom.dcmread(dicom[-1].path)
    soon_sr = pydicom.dcmread(dicom[0].path)
    predecessor = urgent_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == soon_sr.SOPInstanceUID
    parsed = read_triage_sr(urgent_sr)
    assert parsed.priority is Priority.URGENT
    assert parsed.days_waited == 25
    assert soon_sr.SOPInstanceUID in parsed.predecessors

    assert sender.run_once() == 1
    assert [r["state"] for r in index.outbox(channel="hl7")] == [SENT, SENT]
    first, second = ris.messages
    assert segment(first, "OBR")[25] == "P" and segment(second, "OBR")[25] == "C"
    obx = [line.split("|") for line in second.split("\r") if line.startswith("OBX|1|")]
    assert obx[0][5].startswith("RT101^Urgent")
    sr_ref = next(line for line in second.split("\r") if "RT514" in line)
    assert sr_ref.split("|")[5] == urgent_sr.SOPInstanceUID


@pytest.mark.integration
def test_ris_down_during_an_escalation_hears_only_the_current_flag(
    index: Index, tmp_path: Path
) -> None:
    """Day 24 queues "soon" while the RIS is down, day 25 "urgent": when the RIS is back its
    only (and so last) message is the urgent one; FHIR and PACS likewise keep only the newest."""
    from core import codes

    uid = _reported(index, tmp_path, accession="ACC9", days_waited=5)
    request = ANALYSED_ON - timedelta(days=5)
    port = _free_port()
    fhir = "http://127.0.0.1:9/fhir"
    day = _waiting_list(index, tmp_path, port, (request + timedelta(days=24)).isoformat(), fhir)
    report = day.tick()
    assert (report.hl7_messages, report.fhir_messages, report.superseding_srs) == (1, 1, 1)
    now = [time.time()]
    sender = Hl7Sender(index, day.hl7, clock=lambda: now[0])
    assert sender.run_once() == 0  # the RIS is down
    later = _waiting_list(index, tmp_path, port, (request + timedelta(days=25)).isoformat(), fhir)
    report = later.tick()
    assert (report.hl7_messages, report.fhir_messages, report.superseding_srs) == (1, 1, 1)
    assert later.tick().fhir_messages == 0  # same decision: nothing queued again
    with RecordingRis(port=port) as ris:
        now[0] += 3600
        assert sender.run_once() == 1
        assert sender.run_once() == 0
    (oru,) = ris.messages
    flag = next(line.split("|") for line in oru.split("\r") if line.startswith("OBX|1|"))
    assert flag[5].split("^")[0] == codes.PRIORITY_CODES["urgent"].value
    assert segment(oru, "OBR")[25] == "C"  # the soon ORU was tried: the RIS may hold it
    for channel in ("hl7", "fhir", "dicom"):
        rows = index.outbox(study_instance_uid=uid, channel=channel)
        assert rows[0]["state"] == WITHDRAWN and rows[0]["superseded_by"] == rows[1]["id"]
    (fhir_item,) = index.outbox(study_instance_uid=uid, channel="fhir", state=PENDING)
    resources = json.loads(fhir_item["payload"])
    assert resources[-1]["resourceType"] == "DiagnosticReport"
    assert resources[-1]["conclusionCode"][0]["coding"][0]["code"] == "RT101"


@pytest.mark.integration
def test_order_after_images_sets_urgency_and_psa_density(
    index: Index, tmp_path: Path, ris: RecordingRis
) -> None:
    uid = _reported(index, tmp_path, accession="ACC2", days_waited=2)
    with Hl7Listener(index, Hl7Settings(), port=0) as listener:
        (ack,) = send(
            listener.port,
            orm_o01(
                "M1", "PLC2", accession="ACC2", priority="S", psa="8.0", request_date="20261122"
            ),
        )
    assert segment(ack, "MSA")[1] == "AA"
    wl = _waiting_list(index, tmp_path, ris.port, "2026-11-25")
    assert wl.tick().superseding_srs == 1
    priority, rank, request, density = _columns(index, uid)
    assert (priority, rank, request) == ("urgent", 0, "20261122")
    assert density == pytest.approx(8.0 / 40.0)
    assert Hl7Sender(index, wl.hl7).run_once() == 1
    (oru,) = ris.messages
    assert segment(oru, "OBR")[2] == "PLC2"  # the RIS's own order number comes back
    psad = next(line.split("|") for line in oru.split("\r") if "RT006" in line)
    assert psad[5] == "0.200"


@pytest.mark.integration
def test_cancelled_order_gets_no_hl7_result(
    index: Index, tmp_path: Path, ris: RecordingRis
) -> None:
    _reported(index, tmp_path, accession="ACC3", days_waited=1)
    with Hl7Listener(index, Hl7Settings(), port=0) as listener:
        send(
            listener.port,
            orm_o01("M1", "PLC3", accession="ACC3"),
            orm_o01("M2", "PLC3", accession="ACC3", control="CA"),
        )
    assert _waiting_list(index, tmp_path, ris.port, "2026-11-25").tick().hl7_messages == 0


def test_stat_study_not_analysed_ranks_with_the_urgent_ones(index: Index, tmp_path: Path) -> None:
    uid = index_study(index, tmp_path / "s", patient_id="PAT009", accession="ACC9")
    mark_reported(
        index,
        uid,
        likelihood=None,
        priority=Priority.NOT_ANALYSED,
        days_waited=None,
        reported_at=REPORTED_AT,
    )
    with index.write() as s:
        s.execute(
            text("UPDATE studies SET status = :st WHERE study_instance_uid = :uid"),
            {"st": StudyStatus.REPORTED.value, "uid": uid},
        )
        apply_order(
            s,
            OrderUpdate(
                OrderControl.NEW,
                "PLC9",
                accession_number="ACC9",
                referral_urgency=ReferralUrgency.URGENT,
            ),
            now=1.0,
        )
    _waiting_list(index, tmp_path, None, "2026-11-25").tick()
    assert _columns(index, uid)[:2] == ("not_analysed", Priority.URGENT.rank)


@pytest.mark.slow  # seconds of phantoms/training: `make test`, not test-fast
def test_many_studies_are_all_recomputed(index: Index, tmp_path: Path) -> None:
    """More than one page (PAGE = 500): no cap."""
    with index.write() as s:
        s.execute(
            text(
                "INSERT INTO patients (patient_id, issuer_of_patient_id, patient_name) "
                "VALUES ('P', '', '')"
            )
        )
        pid = s.execute(text("SELECT id FROM patients")).scalar_one()
        for i in range(520):
            result = TriageResult(
                study_instance_uid=f"1.2.3.{i}",
                status=StudyStatus.REPORTED,
                priority=Priority.ROUTINE,
                case_likelihood=0.1,
                model=MODEL,
                days_waited=i % 30,
            )
            s.execute(
                text(
                    "INSERT INTO studies (study_instance_uid, patient_fk, accession_number, "
                    "study_date, study_description, referral_urgency, urgency_rank, status, "
                    "node_id, status_changed_at, first_received_at, last_received_at, "
                    "instance_count, checked_instance_count, analysed_instance_count, attempts, "
                    "analysis_failures, result_json, reported_at) VALUES (:uid, :p, '', '', '', "
                    "'routine', 2, 'reported', '', 0, 0, 0, 0, 0, 0, 0, 0, :r, :t)"
                ),
                {
                    "uid": f"1.2.3.{i}",
                    "p": pid,
                    "r": json.dumps(result.to_json_dict()),
                    "t": REPORTED_AT,
                },
            )
    report = _waiting_list(index, tmp_path, None, "2026-11-24").tick()
    assert report.studies == 520
    with index.read() as s:
        ranks = dict(s.execute(text("SELECT study_instance_uid, priority_rank FROM studies")).all())
    assert ranks["1.2.3.29"] == Priority.URGENT.rank  # waited 29 days
    assert ranks["1.2.3.22"] == Priority.SOON.rank
    assert ranks["1.2.3.1"] == Priority.ROUTINE.rank

    # the worklist (one SQL query, paginated) lists every study once, in the tick's order
    from workspace.worklist import WorklistQuery, query_worklist

    seen: list[tuple[int, str]] = []
    offset = 0
    while True:
        with index.read() as s:
            page = query_worklist(s, WorklistQuery(offset=offset, limit=200), date(2026, 11, 24))
        assert page.total == 520
        seen += [(r["priority_rank"], r["study_instance_uid"]) for r in page.rows]
        offset += 200
        if offset >= page.total:
            break
    assert len({uid for _, uid in seen}) == 520
    assert [rank for rank, _ in seen] == sorted(rank for rank, _ in seen)
    assert seen[0][0] == Priority.URGENT.rank and seen[-1][0] == Priority.ROUTINE.rank


@pytest.mark.parametrize("referral", list(ReferralUrgency))
@pytest.mark.parametrize("likelihood", [None, 0.05, 0.35, 0.9])
def test_simulate_ranks_with_the_same_function(
    referral: ReferralUrgency, likelihood: float | None
) -> None:
    """`radtriage simulate` and the waiting list: same inputs, same ranks."""
    triage = TriageSettings()
    result = TriageResult(
        study_instance_uid="1.2.3",
        status=StudyStatus.REPORTED,
        priority=Priority.ROUTINE if likelihood is not None else Priority.NOT_ANALYSED,
        case_likelihood=likelihood,
        model=MODEL,
    )
    today = date(2026, 12, 1)
    for waited in range(0, 40, 3):
        inputs = WaitingInputs(referral, today - timedelta(days=waited), False, None)
        live = decide_today(result, inputs, THRESHOLDS, triage, today)
        assert live.rank == queue_rank(
            likelihood, THRESHOLDS, referral, waited, triage.waiting_policy()
        )
        assert live == decide_priority(
            likelihood, THRESHOLDS, referral, waited, triage.waiting_policy()
        )


def test_only_changed_tick_takes_new_reports_and_changed_orders(
    index: Index, tmp_path: Path
) -> None:
    uid = _reported(index, tmp_path, accession="ACC5", days_waited=1)
    wl = _waiting_list(index, tmp_path, None, "2026-11-25")
    assert wl.tick(only_changed=True).studies == 1  # new report
    assert wl.tick(only_changed=True).studies == 0  # nothing changed since
    with index.write() as s:
        apply_order(
            s,
            OrderUpdate(
                OrderControl.NEW,
                "PLC5",
                accession_number="ACC5",
                referral_urgency=ReferralUrgency.URGENT,
            ),
            now=1.0,  # an older clock: the stale mark, not the time, says it changed
        )
    assert wl.tick(only_changed=True).studies == 1  # its order changed
    assert _columns(index, uid)[0] == "urgent"


@pytest.mark.integration
def test_live_waiting_list_listens_ticks_and_sends(
    index: Index, tmp_path: Path, ris: RecordingRis
) -> None:
    """Order in over MLLP after the images, the ORU out to the RIS, all on the node's threads."""
    uid = _reported(index, tmp_path, accession="ACC6", days_waited=1)
    port = _free_port()
    settings = Settings(
        triage=TriageSettings(today=date(2026, 11, 25)),
        hl7=Hl7Settings(
            listen_port=port,
            destinations=[Hl7Destination(name="ris", host="127.0.0.1", port=ris.port)],
        ),
    )
    live = LiveWaitingList(
        index, Spool(tmp_path / "var"), settings, lambda m: THRESHOLDS, poll_s=0.1
    )
    ris_node = RisNode(index, settings.hl7, poll_s=0.1)
    live.start()
    ris_node.start()
    try:
        (ack,) = send(port, orm_o01("M6", "PLC6", accession="ACC6", priority="S"))
        assert segment(ack, "MSA")[1] == "AA"
        deadline = time.time() + 20
        while time.time() < deadline and not any(
            "RT101" in m and "PLC6" in m for m in ris.messages
        ):
            time.sleep(0.1)
    finally:
        ris_node.stop()
        live.stop()
    assert any("RT101" in m and "PLC6" in m for m in ris.messages), ris.messages
    assert _columns(index, uid)[0] == "urgent"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _header(priority: str = "", issued: str = "", in_sequence: bool = False) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    target = ds
    if in_sequence:
        item = pydicom.Dataset()
        ds.RequestAttributesSequence = [item]
        target = item
    if priority:
        target.RequestedProcedurePriority = priority
    if issued:
        target.IssueDateOfImagingServiceRequest = issued
    return ds


def test_request_attributes_one_reader() -> None:
    from imaging.request_attributes import (
        days_since_referral,
        referral_urgency,
        request_date,
        requested_procedure_priority,
    )

    headers = [_header("ROUTINE"), _header("HIGH", in_sequence=True), _header("MEDIUM")]
    assert referral_urgency(headers) is ReferralUrgency.URGENT
    assert requested_procedure_priority(headers[1]) == "HIGH"
    both = _header("LOW")
    both.RequestAttributesSequence = [_header("STAT")]
    assert requested_procedure_priority(both) == "STAT"  # the most urgent, not the first
    assert referral_urgency([]) is ReferralUrgency.ROUTINE
    today = date(2026, 11, 30)
    dated = [
        _header(issued="20261110"),
        _header(issued="20261101", in_sequence=True),
        _header(issued="20261205"),
        _header(issued="garbage"),
    ]
    assert request_date(dated, today) == date(2026, 11, 1)  # earliest, future one skipped
    assert days_since_referral(dated, today) == 29
    assert days_since_referral([_header(issued="20240101")], today) is None  # archive study


def test_analysis_inputs_prefer_the_order(index: Index, tmp_path: Path) -> None:
    from triage.waiting_list import analysis_inputs

    uid = index_study(index, tmp_path / "s", patient_id="PAT001", accession="ACC7")
    headers = [_header("MEDIUM", issued="20261101")]
    today = date(2026, 11, 30)
    before = analysis_inputs(index, uid, headers, today)
    assert (before.referral, before.request_date) == (ReferralUrgency.SOON, date(2026, 11, 1))
    with index.write() as s:
        apply_order(
            s,
            OrderUpdate(
                OrderControl.NEW,
                "PLC7",
                accession_number="ACC7",
                referral_urgency=ReferralUrgency.URGENT,
                request_date=date(2026, 11, 20),
                psa_ng_ml=6.0,
            ),
            now=1.0,
        )
    after = analysis_inputs(index, uid, headers, today)
    assert after == WaitingInputs(
        ReferralUrgency.URGENT,
        date(2026, 11, 20),
        False,
        6.0,
        referral_source="order",
        request_date_source="order",
        image_referral=ReferralUrgency.SOON,
    )


def test_inputs_take_the_higher_urgency_and_never_drop_a_date() -> None:
    """Issue 22 items 6 and 7: the more urgent of order and images counts (an order never
    lowers the images' request); a future date is clamped and named; with no date at all the
    clock starts on the day received."""
    from ris.orders import OrderView
    from triage.waiting_list import image_inputs, resolve_inputs

    today = date(2026, 11, 30)
    routine_order = OrderView(
        placer_order_number="P1",
        referral_urgency=ReferralUrgency.ROUTINE,
        request_date=None,
        suspected_cancer_pathway=False,
        psa_ng_ml=None,
        accession_number="",
        filler_order_number="",
        clinical_details="",
    )
    got = resolve_inputs(
        routine_order,
        ReferralUrgency.URGENT,
        (date(2026, 11, 2), "dicom_request", None),
        None,
        today,
    )
    assert (got.referral, got.referral_source) == (ReferralUrgency.URGENT, "dicom_request")
    assert (got.request_date, got.request_date_source) == (date(2026, 11, 2), "dicom_request")
    future = image_inputs([_header("HIGH", issued="20261215")], today)
    assert future.request_date == today and future.request_date_source == "dicom_request"
    assert future.request_date_note and "clamped" in future.request_date_note
    study_dated = pydicom.Dataset()
    study_dated.StudyDate = "20261105"
    by_study = image_inputs([study_dated], today)
    assert (by_study.request_date, by_study.request_date_source) == (
        date(2026, 11, 5),
        "study_date",
    )
    bare = image_inputs([pydicom.Dataset()], today, received=date(2026, 11, 28))
    assert (bare.request_date, bare.request_date_source) == (date(2026, 11, 28), "received")
    assert (bare.referral, bare.referral_source) == (ReferralUrgency.ROUTINE, "none")


@pytest.mark.integration
def test_waiting_list_on_postgresql(postgresql_url: str, tmp_path: Path) -> None:
    """Migration 0006 and the tick on PostgreSQL: order, escalation, superseding SR, ORU."""
    index = Index(postgresql_url)
    try:
        _escalate_on(index, tmp_path)
    finally:
        index.close()


def _escalate_on(index: Index, tmp_path: Path) -> None:
    uid = _reported(index, tmp_path, accession="ACCPG", days_waited=5)
    with index.write() as s:
        apply_order(
            s,
            OrderUpdate(
                OrderControl.NEW,
                "PLCPG",
                accession_number="ACCPG",
                request_date=ANALYSED_ON - timedelta(days=5),
                psa_ng_ml=6.0,
            ),
            now=1.0,
        )
    wl = _waiting_list(index, tmp_path, 2575, (ANALYSED_ON + timedelta(days=21)).isoformat())
    report = wl.tick()
    assert (report.superseding_srs, report.hl7_messages) == (1, 1)
    assert _columns(index, uid) == ("urgent", 0, "20261119", pytest.approx(0.15))
    (row,) = index.outbox(channel="hl7")
    assert row["state"] == "pending" and "RT101" in row["payload"]


def test_a_new_analysis_resets_what_the_last_sr_said(index: Index, tmp_path: Path) -> None:
    """After a re-analysis the study's own new SR is the one compared (and superseded)."""
    uid = _reported(index, tmp_path, accession="ACC8", days_waited=5)
    request = ANALYSED_ON - timedelta(days=5)
    urgent_day = (request + timedelta(days=26)).isoformat()
    assert _waiting_list(index, tmp_path, None, urgent_day).tick().superseding_srs == 1
    # analysed again; its new SR says routine (the analysis did not know the request date)
    with index.read() as s:
        path = s.scalars(
            select(OutboxItem.path).where(
                OutboxItem.study_instance_uid == uid, OutboxItem.channel == "dicom"
            )
        ).one()
    with index.write() as s:
        s.execute(
            text(
                "UPDATE studies SET reported_at = reported_at + 60, previous_sr_path = :p, "
                "result_json = :r WHERE study_instance_uid = :uid"
            ),
            {
                "p": path,
                "uid": uid,
                "r": json.dumps(
                    TriageResult(
                        study_instance_uid=uid,
                        status=StudyStatus.REPORTED,
                        priority=Priority.ROUTINE,
                        case_likelihood=0.1,
                        model=MODEL,
                        series_used={"t2w": _series(index, uid)},
                    ).to_json_dict()
                ),
            },
        )
    report = _waiting_list(index, tmp_path, None, urgent_day).tick(only_changed=True)
    assert (report.studies, report.superseding_srs) == (1, 1)  # urgent again, over the new SR
