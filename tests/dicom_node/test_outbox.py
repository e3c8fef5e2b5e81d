"""The one outbox's state machine: backoff, dead letters, latest wins (withdrawal) and delivery
order, node scoping, the API's listing, and migration 0007 (hl7_outbox folded in)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from store import outbox
from store.index import MIGRATIONS, Index, make_engine
from store.outbox import (
    DEAD,
    PENDING,
    SENT,
    WITHDRAWN,
    Channel,
    DeliveryRound,
    Kind,
    Message,
    RetryPolicy,
)

from .pg import postgresql_server  # noqa: F401  (the postgresql_url fixture)

STUDY = "1.2.826.0.1.3680043.8.498.1"
OTHER = "1.2.826.0.1.3680043.8.498.2"


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(f"sqlite:///{tmp_path}/i.db")


def _message(
    uid: str,
    *,
    kind: Kind = Kind.ORU,
    channel: Channel = Channel.HL7,
    study: str = STUDY,
    destination: str = "ris",
    node_id: str = "",
) -> Message:
    return Message(channel, kind, study, destination, uid, node_id, payload=f"message {uid}")


def _queue(index: Index, message: Message, now: float = 0.0) -> int:
    with index.write() as s:
        return outbox.enqueue(s, message, now)


def _state(index: Index, item_id: int) -> dict:
    return next(r for r in index.outbox() if r["id"] == item_id)


def _fail(index: Index, item_id: int, now: float, policy: RetryPolicy, **kw: bool) -> str:
    with index.write() as s:
        return outbox.record_failure(s, item_id, "peer down", now, policy, **kw)


def test_backoff_doubles_up_to_the_maximum() -> None:
    policy = RetryPolicy(max_attempts=8, initial_backoff_s=2, max_backoff_s=10)
    assert [policy.backoff_s(n) for n in range(1, 6)] == [2, 4, 8, 10, 10]


def test_failures_back_off_then_become_a_dead_letter(index: Index) -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=10, max_backoff_s=60)
    item = _queue(index, _message("A"))
    assert _fail(index, item, 1.0, policy) == PENDING
    assert _state(index, item)["next_attempt_at"] == 11.0
    assert outbox.due(index, Channel.HL7, 10.9) == []  # not due before its retry
    assert [d.id for d in outbox.due(index, Channel.HL7, 11.0)] == [item]
    assert _fail(index, item, 11.0, policy) == PENDING
    assert _state(index, item)["next_attempt_at"] == 31.0  # 10 s, then 20 s
    assert _fail(index, item, 31.0, policy) == DEAD
    row = _state(index, item)
    assert (row["attempts"], row["closed_at"]) == (3, 31.0)
    assert row["last_error"] == "gave up after 3 attempts: peer down"
    assert outbox.due(index, Channel.HL7, 1e9) == []
    assert [r["id"] for r in index.dead_letters()] == [item]


def test_a_permanent_failure_is_a_dead_letter_at_once(index: Index) -> None:
    item = _queue(index, _message("A"))
    assert _fail(index, item, 1.0, RetryPolicy(), permanent=True) == DEAD
    assert _state(index, item)["last_error"] == "peer down"


def test_a_newer_item_of_the_same_kind_withdraws_the_older_pending_one(index: Index) -> None:
    routine = _queue(index, _message("A"), now=1.0)
    urgent = _queue(index, _message("B"), now=2.0)
    old = _state(index, routine)
    assert (old["state"], old["superseded_by"], old["closed_at"]) == (WITHDRAWN, urgent, 2.0)
    assert [d.item_uid for d in outbox.due(index, Channel.HL7, 5.0)] == ["B"]
    # a withdrawn item stays withdrawn: failures of a racing send do not revive it
    assert _fail(index, routine, 3.0, RetryPolicy()) == WITHDRAWN


def test_withdrawal_is_per_study_channel_destination_and_kind(index: Index) -> None:
    sr = _queue(index, _message("SR1", kind=Kind.TRIAGE_SR, channel=Channel.DICOM))
    seg = _queue(index, _message("SEG1", kind=Kind.SEG, channel=Channel.DICOM))
    oru = _queue(index, _message("ORU1"))
    other_study = _queue(index, _message("ORU2", study=OTHER))
    other_dest = _queue(index, _message("ORU3", destination="ris2"))
    sent = _queue(index, _message("ORU4", destination="ris3"))
    with index.write() as s:
        assert outbox.record_sent(s, sent, 1.0)
    # the superseding SR: withdraws the SR, never the SEG (another kind) nor other channels
    _queue(index, _message("SR2", kind=Kind.TRIAGE_SR, channel=Channel.DICOM), now=2.0)
    _queue(index, _message("ORU5", destination="ris3"), now=2.0)
    states = {r["id"]: r["state"] for r in index.outbox()}
    assert states[sr] == WITHDRAWN
    assert [states[i] for i in (seg, oru, other_study, other_dest)] == [PENDING] * 4
    assert states[sent] == SENT  # what was delivered stays delivered


def test_queuing_the_same_item_again_changes_nothing(index: Index) -> None:
    first = _queue(index, _message("A"))
    _queue(index, _message("B"))
    assert _queue(index, _message("B")) != first
    assert [r["state"] for r in index.outbox()] == [WITHDRAWN, PENDING]
    assert len(index.outbox()) == 2


def test_an_item_never_overtakes_an_older_pending_one_of_its_study(index: Index) -> None:
    policy = RetryPolicy(initial_backoff_s=10)
    sr = _queue(index, _message("SR", kind=Kind.TRIAGE_SR, channel=Channel.DICOM))
    seg = _queue(index, _message("SEG", kind=Kind.SEG, channel=Channel.DICOM))
    other = _queue(index, _message("SR9", kind=Kind.TRIAGE_SR, channel=Channel.DICOM, study=OTHER))
    assert [d.id for d in outbox.due(index, Channel.DICOM, 0.0)] == [sr, seg, other]
    _fail(index, sr, 0.0, policy)  # the SR waits for its retry at 10 s: the SEG waits too
    assert [d.id for d in outbox.due(index, Channel.DICOM, 5.0)] == [other]
    assert [d.id for d in outbox.due(index, Channel.DICOM, 10.0)] == [sr, seg, other]
    _fail(index, sr, 10.0, policy, permanent=True)  # a dead letter no longer holds it back
    assert [d.id for d in outbox.due(index, Channel.DICOM, 10.0)] == [seg, other]


def test_a_round_stops_a_group_at_its_first_failure(index: Index) -> None:
    sr = _queue(index, _message("SR", kind=Kind.TRIAGE_SR, channel=Channel.DICOM))
    _queue(index, _message("SEG", kind=Kind.SEG, channel=Channel.DICOM))
    other = _queue(index, _message("SR9", kind=Kind.TRIAGE_SR, channel=Channel.DICOM, study=OTHER))
    round_ = DeliveryRound()
    sendable = []
    for item in outbox.due(index, Channel.DICOM, 0.0):
        if round_.may_send(item):
            sendable.append(item.id)
            if item.id == sr:
                round_.failed(item)
    assert sendable == [sr, other]


def test_a_node_sees_only_its_own_items(index: Index, tmp_path: Path) -> None:
    _queue(index, _message("A", node_id="HOSP_A"))
    _queue(index, _message("B", node_id="HOSP_B", study=OTHER))
    a = Index(f"sqlite:///{tmp_path}/i.db", node_id="HOSP_A")
    assert [d.item_uid for d in outbox.due(a, Channel.HL7, 1.0)] == ["A"]
    assert [r["item_uid"] for r in a.outbox()] == ["A"]
    assert len(index.outbox()) == 2  # an index without node id: every row


def test_the_listing_shows_file_names_never_paths_or_payloads(index: Index) -> None:
    path = "/var/radtriage/outbox/1.2.3/1.2.3.4.dcm"
    message = Message(
        Channel.DICOM, Kind.TRIAGE_SR, STUDY, "pacs", "1.2.3.4", "", path=path, sop_class_uid="1.2"
    )
    _queue(index, message)
    _queue(index, _message("RT1"))
    rows = outbox.listing(index, state=PENDING)
    assert [(r["channel"], r["file"]) for r in rows] == [("dicom", "1.2.3.4.dcm"), ("hl7", None)]
    assert all("path" not in r and "payload" not in r for r in rows)
    assert "/var/" not in repr(rows)


def test_summary_counts_by_channel_and_state_with_dead_and_stuck(index: Index) -> None:
    old = _queue(index, _message("A"), now=0.0)
    _queue(index, _message("B", channel=Channel.FHIR, kind=Kind.FHIR_REPORT), now=0.0)
    _fail(index, old, 1.0, RetryPolicy(), permanent=True)
    _queue(index, _message("C", study=OTHER), now=5000.0)
    view = outbox.summary(index, now=5000.0, stuck_after_s=3600.0)
    assert view["counts"]["hl7"] == {"pending": 1, "sent": 0, "dead": 1, "withdrawn": 0}
    assert view["counts"]["fhir"]["pending"] == 1 and view["counts"]["dicom"]["pending"] == 0
    assert [r["item_uid"] for r in view["dead_letters"]] == ["A"]
    assert [r["item_uid"] for r in view["stuck"]] == ["B"]  # C is young


def test_migration_0007_folds_the_hl7_outbox_into_the_one_outbox(tmp_path: Path) -> None:
    _migrate_0006_rows_up_and_down(f"sqlite:///{tmp_path}/index.db")


@pytest.mark.integration
def test_migration_0007_on_postgresql(postgresql_url: str) -> None:
    _migrate_0006_rows_up_and_down(postgresql_url)


def _migrate_0006_rows_up_and_down(url: str) -> None:
    from alembic import command
    from alembic.config import Config

    engine = make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0006")
        connection.execute(
            text(
                "INSERT INTO outbox (id, study_instance_uid, destination, sop_instance_uid, "
                "sop_class_uid, path, state, attempts, next_attempt_at, created_at, sent_at, "
                "node_id) VALUES "
                "(7, '1.2.3', 'pacs', '1.2.3.4', '1.2.840.10008.5.1.4.1.1.88.34', '/o/a.dcm', "
                "'sent', 1, 1, 1, 2, 'N1'), "
                "(8, '1.2.3', 'pacs', '1.2.3.5', '1.2.840.10008.5.1.4.1.1.66.4', '/o/b.dcm', "
                "'pending', 0, 1, 1, NULL, 'N1')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO hl7_outbox (study_instance_uid, node_id, destination, "
                "message_control_id, message, state, attempts, next_attempt_at, last_error, "
                "created_at) VALUES ('1.2.3', 'N1', 'ris', 'RT42', 'MSH|...', 'dead', 8, 9, "
                "'gave up', 3)"
            )
        )
    engine.dispose()
    index = Index(url)  # upgrades to head
    rows = index.outbox()
    assert [(r["id"], r["channel"], r["kind"], r["item_uid"], r["state"]) for r in rows] == [
        (7, "dicom", "triage_sr", "1.2.3.4", "sent"),
        (8, "dicom", "seg", "1.2.3.5", "pending"),
        (9, "hl7", "oru", "RT42", "dead"),
    ]
    assert rows[1]["path"] == "/o/b.dcm" and rows[2]["payload"] == "MSH|..."
    assert rows[2]["last_error"] == "gave up" and {r["node_id"] for r in rows} == {"N1"}
    tables = set(inspect(index.engine).get_table_names())
    assert "hl7_outbox" not in tables and "outbox_0007" not in tables
    new = _queue(index, _message("RT43"))  # ids continue after the copied rows
    assert new == 10 and _state(index, 9)["state"] == DEAD
    index.close()
    engine = make_engine(url)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0006")
        hl7 = connection.execute(text("SELECT message_control_id, state FROM hl7_outbox")).all()
        dicom = connection.execute(text("SELECT id, sop_instance_uid FROM outbox")).all()
    engine.dispose()
    assert [tuple(r) for r in hl7] == [("RT42", "dead"), ("RT43", "pending")]
    assert [tuple(r) for r in dicom] == [(7, "1.2.3.4"), (8, "1.2.3.5")]


def test_an_item_withdrawn_after_its_round_began_is_not_sent(index: Index) -> None:
    _queue(index, _message("A"))
    (item,) = outbox.due(index, Channel.HL7, 0.0)  # a transport's round takes it ...
    urgent = _queue(index, _message("B"), now=1.0)  # ... and a newer decision lands meanwhile
    assert not outbox.still_pending(index, item.id)  # the transport skips it
    assert outbox.still_pending(index, urgent)
