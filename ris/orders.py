"""Imaging orders from the RIS (HL7 v2 ORM^O01/OMI^O23, FHIR ServiceRequest) and their match
to studies.

An order is keyed by its placer order number (ORC-2 / ServiceRequest.identifier, with the
placer's namespace). It is matched to a study by Accession Number first, then by Patient ID +
issuer (the patient's oldest unmatched study received on or after the request date), whichever
arrives first: `apply_order` matches an order to a study already in the index (images before
order); `match_orders` matches waiting orders to studies received since (order before images),
and the waiting list calls it on every tick. New/change/cancel follow ORC-1 (NW, XO, CA).

What an order supplies to the priority policy: the referral urgency, the request date, whether
the patient is on the suspected-cancer pathway, clinical details and a PSA value (ng/mL, for PSA
density = PSA / gland volume). A matched active order's urgency also orders the analysis queue
(``studies.referral_urgency``/``urgency_rank``), as the most urgent of the order and the images.

`apply_order` runs in the caller's transaction (`Index.write`): an order is applied whole or not
at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from functools import cache
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from core.domain import ReferralUrgency
from store.index import URGENCY_RANK, Base, Index, Patient, Study
from store.results import WaitingListEntry

log = logging.getLogger(__name__)

#: LOINC 2857-1 (PSA, serum) and the units read as ng/mL, in HL7 OBX and FHIR Observation alike.
PSA_LOINC = "2857-1"
PSA_UNITS = {"ng/ml", "ug/l", "µg/l"}
#: Reason-for-study codes that put an order on the suspected-cancer pathway (HL7 OBR-31, FHIR
#: ServiceRequest.reasonCode): two-week wait, urgent suspected cancer, suspected cancer pathway.
SUSPECTED_CANCER_CODES = {"2WW", "USC", "SCP"}


class OrderControl(StrEnum):
    """ORC-1 Order Control (HL7 table 0119), the values accepted."""

    NEW = "NW"
    CHANGE = "XO"
    CANCEL = "CA"


# The waiting list's entries (triage.waiting_list): a changed order marks its study's entry
# stale in the order's own transaction, so the next tick decides the study again.
ORDER_ACTIVE = "active"
ORDER_CANCELLED = "cancelled"


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (
        UniqueConstraint(
            "site_id", "placer_namespace", "placer_order_number", name="uq_orders_site_placer"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    placer_order_number: Mapped[str] = mapped_column(String(64))
    placer_namespace: Mapped[str] = mapped_column(String(64), default="")
    filler_order_number: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    state: Mapped[str] = mapped_column(String(16), default=ORDER_ACTIVE)
    referral_urgency: Mapped[str] = mapped_column(String(16), default="routine")
    request_date: Mapped[str | None] = mapped_column(String(10), nullable=True)  # ISO date
    suspected_cancer_pathway: Mapped[bool] = mapped_column(Boolean, default=False)
    clinical_details: Mapped[str] = mapped_column(Text, default="")
    psa_ng_ml: Mapped[float | None] = mapped_column(Float, nullable=True)
    source: Mapped[str] = mapped_column(String(16), default="hl7")
    message_control_id: Mapped[str] = mapped_column(String(64), default="")
    changes: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    #: the site whose listener or route received it (0010); it matches only that site's studies
    site_id: Mapped[str] = mapped_column(String(64), default="", server_default="", index=True)


class FieldTooLong(ValueError):
    """An order field longer than its column (`Order`'s String(N)): refused, never truncated."""

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(f"{name} is longer than {limit} characters")
        self.name, self.limit = name, limit


@cache
def _column_lengths() -> dict[str, int]:
    """The length limit of each String(N) column of `Order` (the one place they are declared)."""
    return {
        c.name: int(c.type.length)
        for c in Order.__table__.columns
        if isinstance(c.type, String) and c.type.length
    }


@dataclass(frozen=True)
class OrderUpdate:
    """One order event, parsed and validated (from HL7 v2 or FHIR)."""

    control: OrderControl
    placer_order_number: str
    placer_namespace: str = ""
    filler_order_number: str = ""
    accession_number: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    study_instance_uid: str = ""
    referral_urgency: ReferralUrgency | None = None  # None on a change: keep the order's
    request_date: date | None = None
    suspected_cancer_pathway: bool | None = None
    clinical_details: str | None = None
    psa_ng_ml: float | None = None
    source: str = "hl7"
    message_control_id: str = ""
    site_id: str = ""  # the receiving listener's or route's site (`Index.site`)

    def __post_init__(self) -> None:
        for name, limit in _column_lengths().items():
            value = getattr(self, name, None)
            if isinstance(value, str) and len(value) > limit:
                raise FieldTooLong(name, limit)
        if not self.placer_order_number.strip():
            raise ValueError("placer_order_number is required (ORC-2 / OBR-2)")
        if self.control is OrderControl.NEW and not (self.accession_number or self.patient_id):
            raise ValueError("a new order needs an Accession Number or a Patient ID to match")
        if self.psa_ng_ml is not None and not 0.0 <= self.psa_ng_ml < 10000.0:
            raise ValueError(f"PSA must be in [0, 10000) ng/mL, got {self.psa_ng_ml}")


@dataclass(frozen=True)
class OrderView:
    """What the priority policy and the result messages read of a matched order."""

    placer_order_number: str
    filler_order_number: str
    accession_number: str
    referral_urgency: ReferralUrgency
    request_date: date | None
    suspected_cancer_pathway: bool
    clinical_details: str
    psa_ng_ml: float | None

    @classmethod
    def of(cls, order: Order) -> OrderView:
        return cls(
            placer_order_number=order.placer_order_number,
            filler_order_number=order.filler_order_number,
            accession_number=order.accession_number,
            referral_urgency=ReferralUrgency(order.referral_urgency),
            request_date=date.fromisoformat(order.request_date) if order.request_date else None,
            suspected_cancer_pathway=bool(order.suspected_cancer_pathway),
            clinical_details=order.clinical_details or "",
            psa_ng_ml=order.psa_ng_ml,
        )


class OrderError(ValueError):
    """An order event that cannot be applied (unknown order on change/cancel)."""


def apply_order(s: Session, update_: OrderUpdate, now: float) -> Order:
    """Insert, change or cancel the order in the caller's transaction; match it to a study."""
    order = s.scalars(
        select(Order).where(
            Order.site_id == update_.site_id,
            Order.placer_namespace == update_.placer_namespace,
            Order.placer_order_number == update_.placer_order_number,
        )
    ).first()
    if order is None:
        if update_.control is not OrderControl.NEW:
            raise OrderError(
                f"order {update_.placer_order_number!r} is unknown: cannot "
                f"{'change' if update_.control is OrderControl.CHANGE else 'cancel'} it"
            )
        order = Order(
            placer_order_number=update_.placer_order_number,
            placer_namespace=update_.placer_namespace,
            site_id=update_.site_id,
            received_at=now,
            changes=0,
        )
        s.add(order)
    repeated = update_.control is OrderControl.NEW and order.id is not None
    if repeated and order.state == ORDER_ACTIVE:
        log.info("order %s sent again as new: taken as a change", order.placer_order_number)
    first = update_.control is OrderControl.NEW and not repeated
    order.updated_at = now
    order.message_control_id = update_.message_control_id
    order.source = update_.source
    if update_.control is OrderControl.CANCEL:
        order.state = ORDER_CANCELLED
        order.changes = (order.changes or 0) + 1
        s.flush()
        _mark_stale(s, order)
        return order
    order.state = ORDER_ACTIVE
    if update_.control is OrderControl.CHANGE:
        order.changes = (order.changes or 0) + 1
    # A first NW sets every field; a change (XO) or a repeated NW changes only what it carries:
    # a message without a priority never resets the urgency, and the request date is the
    # original order's (ORC-15 on a change is when the change was made, not the request)
    for name in ("filler_order_number", "accession_number", "patient_id", "issuer_of_patient_id"):
        value = getattr(update_, name)
        if value or first:
            setattr(order, name, value)
    if update_.study_instance_uid:
        order.study_instance_uid = update_.study_instance_uid
    if update_.referral_urgency is not None or first:
        order.referral_urgency = (update_.referral_urgency or ReferralUrgency.ROUTINE).value
    if update_.request_date is not None and (first or not order.request_date):
        order.request_date = update_.request_date.isoformat()
    if update_.suspected_cancer_pathway is not None:
        order.suspected_cancer_pathway = update_.suspected_cancer_pathway
    if update_.clinical_details is not None:
        order.clinical_details = update_.clinical_details
    if update_.psa_ng_ml is not None:
        order.psa_ng_ml = update_.psa_ng_ml
    s.flush()
    _match(s, order)
    _mark_stale(s, order)
    return order


def _mark_stale(s: Session, order: Order) -> None:
    """Mark the order's study (of the order's site only) for a new decision."""
    if order.study_instance_uid:
        own = select(Study.study_instance_uid).where(
            Study.study_instance_uid == order.study_instance_uid, Study.site_id == order.site_id
        )
        s.execute(
            update(WaitingListEntry)
            .where(WaitingListEntry.study_instance_uid.in_(own))
            .values(stale=True)
        )


def _candidate_study(s: Session, order: Order) -> Study | None:
    """The study `order` is for: by Study Instance UID (IPC-3) or Accession Number, else the
    patient's oldest study received since the request date that no other active order has.
    Only studies of the order's own site are candidates: matching never crosses sites."""
    same_site = Study.site_id == order.site_id
    if order.study_instance_uid:
        study = s.scalars(
            select(Study).where(Study.study_instance_uid == order.study_instance_uid, same_site)
        ).first()
        if study is not None:
            return study
    if order.accession_number:
        study = s.scalars(
            select(Study)
            .where(Study.accession_number == order.accession_number, same_site)
            .order_by(Study.first_received_at)
        ).first()
        if study is not None:
            return study
    if not order.patient_id:
        return None
    q = (
        select(Study)
        .join(Patient, Study.patient_fk == Patient.id)
        .where(Patient.patient_id == order.patient_id, same_site)
    )
    if order.issuer_of_patient_id:  # a study without an issuer matches any (one namespace)
        q = q.where(Patient.issuer_of_patient_id.in_(("", order.issuer_of_patient_id)))
    taken = select(Order.study_instance_uid).where(
        Order.state == ORDER_ACTIVE,
        Order.site_id == order.site_id,
        Order.id != order.id,
        Order.study_instance_uid.is_not(None),
    )
    q = q.where(Study.study_instance_uid.not_in(taken))
    for study in s.scalars(q.order_by(Study.first_received_at, Study.id)):
        if order.accession_number and study.accession_number not in ("", order.accession_number):
            continue  # the study belongs to another accession
        return study
    return None


def _match(s: Session, order: Order) -> Study | None:
    if order.state != ORDER_ACTIVE:
        return None
    study = _candidate_study(s, order)
    if study is None:
        return None
    if order.study_instance_uid != study.study_instance_uid:
        order.study_instance_uid = study.study_instance_uid
        log.info("order %s matched study %s", order.placer_order_number, study.study_instance_uid)
    urgency = ReferralUrgency(order.referral_urgency)
    if urgency.rank < ReferralUrgency(study.referral_urgency).rank:
        s.execute(
            update(Study)
            .where(Study.id == study.id)
            .values(referral_urgency=urgency.value, urgency_rank=URGENCY_RANK[urgency])
        )
    return study


def match_orders(index: Index) -> int:
    """Match active orders still without a study (order before images); returns how many."""
    matched = 0
    with index.write() as s:
        waiting = s.scalars(
            select(Order).where(Order.state == ORDER_ACTIVE, Order.study_instance_uid.is_(None))
        ).all()
        for order in waiting:
            if _match(s, order) is not None:
                _mark_stale(s, order)
                matched += 1
        # an order with an IPC Study Instance UID may name a study that arrived later
        named = s.scalars(
            select(Order).where(
                Order.state == ORDER_ACTIVE,
                Order.study_instance_uid.is_not(None),
            )
        ).all()
        for order in named:
            _match(s, order)
    return matched


def _study_site(study_instance_uid: str) -> Any:
    """WHERE clause: the order is of the study's own site (an order naming another site's
    Study Instance UID in IPC-3 never reaches that study)."""
    return (
        Order.site_id
        == select(Study.site_id)
        .where(Study.study_instance_uid == study_instance_uid)
        .scalar_subquery()
    )


def order_for_study(s: Session, study_instance_uid: str) -> OrderView | None:
    """The active order matched to a study (the latest changed one if several), or None."""
    order = s.scalars(
        select(Order)
        .where(
            Order.study_instance_uid == study_instance_uid,
            Order.state == ORDER_ACTIVE,
            _study_site(study_instance_uid),
        )
        .order_by(Order.updated_at.desc(), Order.id.desc())
    ).first()
    return OrderView.of(order) if order is not None else None


def cancelled_order_for_study(s: Session, study_instance_uid: str) -> bool:
    """Whether the study's only orders are cancelled (the RIS withdrew the request)."""
    states = set(
        s.scalars(
            select(Order.state).where(
                Order.study_instance_uid == study_instance_uid, _study_site(study_instance_uid)
            )
        )
    )
    return bool(states) and ORDER_ACTIVE not in states
