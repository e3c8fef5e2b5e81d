"""The one outbox: every message on its way out (DICOM C-STORE, HL7 ORU^R01, FHIR PUT), one state
machine, one retry rule, latest wins.

::

    pending --(transport: delivered)--------------------------> sent
    pending --(failure; attempts < max_attempts)--------------> pending, next try after backoff
    pending --(failure at max_attempts, or a permanent one)---> dead      (a dead letter)
    pending --(a newer item of the same study, channel,
               destination and kind is enqueued)--------------> withdrawn (never sent later)

Retry: the delay before attempt ``n + 1`` after ``n`` failures is ``initial_backoff_s * 2**(n-1)``
capped at ``max_backoff_s`` (`RetryPolicy`); DICOM takes it from ``[sender]``, HL7 and FHIR from
``[hl7]``.

Latest wins: `enqueue` withdraws the older pending items with the same (study, channel,
destination, kind): a routine ORU still waiting for a RIS that is down is withdrawn by the
urgent correction queued after it. Different kinds never withdraw each other (a superseding SR
leaves the analysis's SEG to be sent).

Order: per (study, channel, destination), items are delivered in the order they were queued.
`due` returns, for each such group, the pending items from the oldest on while they are due
(``next_attempt_at`` reached), so an item never overtakes an older pending one; a transport
sends a group's items in that order and stops the group at its first failure
(`DeliveryRound`). After an outage, the last message a destination receives for a study is the
current one.

The channels are only transports over this module: `dicom_node.sender.Sender` (DICOM),
`ris.hl7_results.Hl7Sender` (HL7 over MLLP), `ris.fhir.FhirSender` (FHIR PUT). Every read and
claim is scoped to the node (`Index.mine`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import PurePath
from typing import Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store.index import (
    OUTBOX_DEAD,
    OUTBOX_PENDING,
    OUTBOX_SENT,
    OUTBOX_STATES,
    OUTBOX_WITHDRAWN,
    Index,
    OutboxItem,
)

log = logging.getLogger(__name__)

PENDING = OUTBOX_PENDING
SENT = OUTBOX_SENT
DEAD = OUTBOX_DEAD
WITHDRAWN = OUTBOX_WITHDRAWN
STATES = OUTBOX_STATES

#: A pending item older than this is reported as stuck by `summary` (the doctor view).
STUCK_AFTER_S = 3600.0

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


class Channel(StrEnum):
    """The ways out."""

    DICOM = "dicom"
    HL7 = "hl7"
    FHIR = "fhir"


class Kind(StrEnum):
    """What an item is; latest wins within one kind."""

    TRIAGE_SR = "triage_sr"
    SEG = "seg"
    ORU = "oru"
    FHIR_REPORT = "fhir_report"


def dicom_kind(sop_class_uid: str) -> Kind:
    """The kind of a DICOM document by its SOP Class: a Segmentation or the triage SR."""
    return Kind.SEG if sop_class_uid == SEGMENTATION_STORAGE else Kind.TRIAGE_SR


class RetrySettings(Protocol):
    """The retry keys of a settings section (``[sender]``, ``[hl7]``)."""

    max_attempts: int
    initial_backoff_s: float
    max_backoff_s: float


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a channel tries before an item becomes a dead letter."""

    max_attempts: int = 8
    initial_backoff_s: float = 2.0
    max_backoff_s: float = 300.0

    @classmethod
    def of(cls, settings: RetrySettings) -> RetryPolicy:
        return cls(settings.max_attempts, settings.initial_backoff_s, settings.max_backoff_s)

    def backoff_s(self, attempts: int) -> float:
        """Delay before attempt ``attempts + 1`` (``attempts`` >= 1 failed so far)."""
        return float(min(self.max_backoff_s, self.initial_backoff_s * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Message:
    """What a caller queues: one item for one destination of one channel."""

    channel: Channel
    kind: Kind
    study_instance_uid: str
    destination: str
    item_uid: str
    node_id: str
    path: str | None = None
    sop_class_uid: str | None = None
    payload: str | None = None


@dataclass(frozen=True)
class DueItem:
    """A pending item a transport may send now."""

    id: int
    channel: str
    kind: str
    study_instance_uid: str
    destination: str
    item_uid: str
    attempts: int
    path: str | None
    sop_class_uid: str | None
    payload: str | None

    @property
    def group(self) -> tuple[str, str]:
        """The delivery-order group within a channel: (study, destination)."""
        return self.study_instance_uid, self.destination


def enqueue(s: Session, message: Message, now: float) -> int:
    """Queue `message` in the caller's transaction and withdraw the older pending items of the
    same study, channel, destination and kind; returns the item's id. Queuing the same item
    (channel, destination, item_uid) again changes nothing (a resend reuses the row)."""
    existing = s.scalar(
        select(OutboxItem.id).where(
            OutboxItem.channel == message.channel.value,
            OutboxItem.destination == message.destination,
            OutboxItem.item_uid == message.item_uid,
        )
    )
    if existing is not None:
        return int(existing)
    row = OutboxItem(
        channel=message.channel.value,
        kind=message.kind.value,
        study_instance_uid=message.study_instance_uid,
        destination=message.destination,
        item_uid=message.item_uid,
        sop_class_uid=message.sop_class_uid,
        path=message.path,
        payload=message.payload,
        node_id=message.node_id,
        state=PENDING,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    s.add(row)
    s.flush()
    res = s.execute(
        update(OutboxItem)
        .where(
            OutboxItem.study_instance_uid == message.study_instance_uid,
            OutboxItem.channel == message.channel.value,
            OutboxItem.destination == message.destination,
            OutboxItem.kind == message.kind.value,
            OutboxItem.state == PENDING,
            OutboxItem.id < row.id,
        )
        .values(
            state=WITHDRAWN,
            superseded_by=row.id,
            closed_at=now,
            last_error=f"withdrawn: superseded by item {row.id}",
        )
    )
    withdrawn = int(getattr(res, "rowcount", 0) or 0)
    if withdrawn:
        log.info(
            "study %s: %d pending %s %s item(s) for %s withdrawn by item %d",
            message.study_instance_uid,
            withdrawn,
            message.channel.value,
            message.kind.value,
            message.destination,
            row.id,
        )
    return int(row.id)


def due(index: Index, channel: Channel, now: float, limit: int = 500) -> list[DueItem]:
    """This node's items of `channel` that may be sent now, oldest first: per (study,
    destination), the pending items from the oldest on while each is due."""
    with index.read() as s:
        rows = s.scalars(
            select(OutboxItem)
            .where(
                OutboxItem.channel == channel.value,
                OutboxItem.state == PENDING,
                index.mine(OutboxItem.node_id),
            )
            .order_by(OutboxItem.id)
        ).all()
    blocked: set[tuple[str, str]] = set()
    out: list[DueItem] = []
    for r in rows:
        group = (r.study_instance_uid, r.destination)
        if group in blocked:
            continue
        if r.next_attempt_at > now:
            blocked.add(group)  # waiting for its retry: nothing younger may overtake it
            continue
        out.append(
            DueItem(
                r.id,
                r.channel,
                r.kind,
                r.study_instance_uid,
                r.destination,
                r.item_uid,
                r.attempts,
                r.path,
                r.sop_class_uid,
                r.payload,
            )
        )
        if len(out) >= limit:
            break
    return out


def still_pending(index: Index, item_id: int) -> bool:
    """Whether an item is still to be sent: a transport asks just before sending, so an item
    withdrawn since its round began is not sent."""
    with index.read() as s:
        return s.scalar(select(OutboxItem.state).where(OutboxItem.id == item_id)) == PENDING


@dataclass
class DeliveryRound:
    """One transport round: skips the items behind a group's first failure, so order holds."""

    failed_groups: set[tuple[str, str]] = field(default_factory=set)

    def may_send(self, item: DueItem) -> bool:
        return item.group not in self.failed_groups

    def failed(self, item: DueItem) -> None:
        self.failed_groups.add(item.group)


def record_sent(s: Session, item_id: int, now: float) -> bool:
    """Mark an item delivered in the caller's transaction; False if it was not pending or
    withdrawn (a withdrawal that raced the send keeps the truth: it was delivered)."""
    row = s.get(OutboxItem, item_id)
    if row is None or row.state not in (PENDING, WITHDRAWN):
        return False
    row.state = SENT
    row.attempts += 1
    row.sent_at = now
    row.closed_at = now
    row.last_error = None
    return True


def record_failure(
    s: Session,
    item_id: int,
    error: str,
    now: float,
    policy: RetryPolicy,
    *,
    permanent: bool = False,
) -> str:
    """Count a failed attempt in the caller's transaction: another try after the backoff, or a
    dead letter at ``max_attempts`` or when `permanent`; returns the item's new state."""
    row = s.get(OutboxItem, item_id)
    if row is None:
        return DEAD
    row.attempts += 1
    row.last_error = error
    if row.state != PENDING:  # withdrawn while it was being tried
        return row.state
    if permanent or row.attempts >= policy.max_attempts:
        if not permanent:
            row.last_error = f"gave up after {row.attempts} attempts: {error}"
        row.state = DEAD
        row.closed_at = now
        log.error("outbox item %d (%s) is a dead letter: %s", row.id, row.channel, error)
    else:
        row.next_attempt_at = now + policy.backoff_s(row.attempts)
        log.warning(
            "outbox item %d (%s) not delivered (attempt %d): %s",
            row.id,
            row.channel,
            row.attempts,
            error,
        )
    return row.state


def undelivered(s: Session, study_instance_uid: str, channel: Channel) -> int:
    """Items of a study and channel not delivered and not withdrawn (pending or dead)."""
    return int(
        s.scalar(
            select(func.count())
            .select_from(OutboxItem)
            .where(
                OutboxItem.study_instance_uid == study_instance_uid,
                OutboxItem.channel == channel.value,
                OutboxItem.state.in_((PENDING, DEAD)),
            )
        )
        or 0
    )


def may_have_reached(
    s: Session, study_instance_uid: str, channel: Channel, destination: str, kind: Kind
) -> bool:
    """Whether the destination may already hold an item of this kind for the study: one was
    delivered, or tried (a peer may have taken a message whose answer was lost)."""
    return (
        s.scalar(
            select(OutboxItem.id)
            .where(
                OutboxItem.study_instance_uid == study_instance_uid,
                OutboxItem.channel == channel.value,
                OutboxItem.destination == destination,
                OutboxItem.kind == kind.value,
                (OutboxItem.state == SENT) | (OutboxItem.attempts > 0),
            )
            .limit(1)
        )
        is not None
    )


_PUBLIC = (
    "id",
    "channel",
    "kind",
    "study_instance_uid",
    "destination",
    "item_uid",
    "state",
    "attempts",
    "next_attempt_at",
    "last_error",
    "created_at",
    "sent_at",
    "closed_at",
    "superseded_by",
)


def public_row(row: dict[str, Any]) -> dict[str, Any]:
    """An outbox row for the API: no file path (the file name only) and no payload."""
    out = {k: row.get(k) for k in _PUBLIC}
    out["file"] = PurePath(row["path"]).name if row.get("path") else None
    return out


def listing(index: Index, state: str | None = None) -> list[dict[str, Any]]:
    """This node's items of every channel, oldest first, as the API shows them."""
    return [public_row(r) for r in index.outbox(state=state)]


def summary(index: Index, now: float, stuck_after_s: float = STUCK_AFTER_S) -> dict[str, Any]:
    """The doctor's view: counts by channel and state, the dead letters, and the stuck items
    (pending for longer than `stuck_after_s`: a destination down, or a sender not running)."""
    rows = index.outbox()
    counts: dict[str, dict[str, int]] = {c.value: dict.fromkeys(STATES, 0) for c in Channel}
    tally = Counter((r["channel"], r["state"]) for r in rows)
    for (channel, state), n in tally.items():
        counts.setdefault(channel, dict.fromkeys(STATES, 0))[state] = n
    stuck = [
        public_row(r)
        for r in rows
        if r["state"] == PENDING and now - r["created_at"] > stuck_after_s
    ]
    return {
        "counts": counts,
        "dead_letters": [public_row(r) for r in rows if r["state"] == DEAD],
        "stuck": stuck,
        "stuck_after_s": stuck_after_s,
    }
