"""The worklist in SQL: every study of the index, sorted, filtered and paginated in the
database (no cap), and the sortable result columns a finished `TriageResult` is copied into.

Order by priority: the current decision of the waiting list (which folds in a radiologist's
override, the referrer's urgency as a floor and the wait clock), by `Priority.rank`; then the
longest waiting (oldest imaging request) first. A study without a result yet ranks as
`not_analysed`: unknown risk never sinks to the bottom.

The result columns on ``studies`` (migration 0005) are declared once, on `store.index.Study`,
and written by `store.results.update_result_columns`; the live waiting list recomputes
``priority``/``priority_rank`` in place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

from sqlalchemy import (
    and_,
    case,
    func,
    or_,
    select,
    true,
)
from sqlalchemy.orm import Session

from core.domain import Priority, ReferralUrgency
from core.priority import FLAG_WORDS
from store.index import Patient, Study
from workspace.tables import Assessment

STUDIES = Study.__table__  # the one declaration, in store.index

SortKey = Literal[
    "priority",
    "waited",
    "likelihood",
    "largest_lesion",
    "gland_volume",
    "study_date",
    "received",
    "patient_name",
    "status",
]
SORT_KEYS: tuple[str, ...] = SortKey.__args__  # type: ignore[attr-defined]
MAX_PAGE = 500


@dataclass(frozen=True)
class WorklistQuery:
    """Filters, order and page of one worklist request. Dates are DICOM DA (YYYYMMDD)."""

    priority: tuple[str, ...] = ()  # effective priority; "pending" = no result yet
    status: tuple[str, ...] = ()
    study_date_from: str | None = None
    study_date_to: str | None = None
    text: str | None = None  # patient name or ID, accession number, Study Instance UID
    sort: SortKey = "priority"
    descending: bool = False
    offset: int = 0
    limit: int = 50
    node_id: str | None = None  # None: every node's studies
    site_id: str | None = None  # None: every site's studies (tools); the app passes its site

    def __post_init__(self) -> None:
        if self.sort not in SORT_KEYS:
            raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}, got {self.sort!r}")
        if not 1 <= self.limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1..{MAX_PAGE}, got {self.limit}")
        if self.offset < 0:
            raise ValueError(f"offset must be >= 0, got {self.offset}")
        for name in ("study_date_from", "study_date_to"):
            value = getattr(self, name)
            if value is not None and not (len(value) == 8 and value.isdigit()):
                raise ValueError(f"{name} must be YYYYMMDD, got {value!r}")


@dataclass(frozen=True)
class WorklistPage:
    total: int
    offset: int
    limit: int
    rows: list[dict[str, Any]]
    counts: dict[str, int]  # effective priority -> studies matching the filters


def _floor_rank() -> Any:
    """The referrer's urgency as a `Priority.rank` (the AI never goes below it)."""
    return case(
        {u.value: u.rank for u in ReferralUrgency},
        value=STUDIES.c.referral_urgency,
        else_=Priority.ROUTINE.rank,
    )


def effective_rank() -> Any:
    """The decision's rank (the waiting list folds a radiologist's override, the referral floor
    and the wait clock into it), at most the referral floor; no result yet ranks
    `not_analysed`."""
    ai = func.coalesce(STUDIES.c.priority_rank, Priority.NOT_ANALYSED.rank)
    floor = _floor_rank()
    return case((ai < floor, ai), else_=floor)


def effective_priority() -> Any:
    """The current decision's flag ("pending" before the first): the same flag the SR, the ORU
    and FHIR state, never re-derived here."""
    return func.coalesce(STUDIES.c.priority, "pending")


#: Presentation of each flag (icons are for colour-blind reading; labels follow core.priority).
_ICONS = {"urgent": "\u25b2", "not_analysed": "?", "soon": "\u25c6", "routine": "\u25cb"}


def priority_display() -> list[dict[str, Any]]:
    """The flags in worklist order (by `Priority.rank`), each with its label and icon, and the
    "pending" state of a study without a result: what the pages show, served by the API."""
    rows = [
        {"value": p.value, "label": FLAG_WORDS[p].upper(), "icon": _ICONS[p.value], "rank": p.rank}
        for p in sorted(Priority, key=lambda p: p.rank)
    ]
    return [*rows, {"value": "pending", "label": "AWAITING AI", "icon": "\u2026", "rank": None}]


def _filters(q: WorklistQuery) -> list[Any]:
    where: list[Any] = []
    if q.node_id is not None:
        where.append(STUDIES.c.node_id == q.node_id)
    if q.site_id is not None:
        where.append(STUDIES.c.site_id == q.site_id)
    if q.priority:
        where.append(effective_priority().in_(q.priority))
    if q.status:
        where.append(STUDIES.c.status.in_(q.status))
    if q.study_date_from:
        where.append(STUDIES.c.study_date >= q.study_date_from)
    if q.study_date_to:
        where.append(STUDIES.c.study_date <= q.study_date_to)
    if q.text and q.text.strip():
        needle = q.text.strip().lower()
        where.append(
            or_(
                *(
                    func.lower(col).contains(needle, autoescape=True)
                    for col in (
                        Patient.patient_name,
                        Patient.patient_id,
                        STUDIES.c.accession_number,
                        STUDIES.c.study_instance_uid,
                    )
                )
            )
        )
    return where


def _order(q: WorklistQuery) -> list[Any]:
    waited = STUDIES.c.request_date  # oldest request = longest waited
    keys: dict[str, list[Any]] = {
        "priority": [effective_rank()],
        "waited": [waited],
        "likelihood": [STUDIES.c.case_likelihood],
        "largest_lesion": [STUDIES.c.largest_lesion_ml],
        "gland_volume": [STUDIES.c.gland_volume_ml],
        "study_date": [STUDIES.c.study_date],
        "received": [STUDIES.c.first_received_at],
        "patient_name": [Patient.patient_name],
        "status": [STUDIES.c.status],
    }
    # "waited" sorts days waited (ascending: fewest first), i.e. the request date reversed
    flip = q.sort == "waited"
    desc = q.descending != flip
    primary = [(k.desc() if desc else k.asc()).nulls_last() for k in keys[q.sort]]
    return [
        *primary,
        effective_rank().asc(),
        waited.asc().nulls_last(),
        STUDIES.c.first_received_at.asc(),
        STUDIES.c.id.asc(),
    ]


def _from() -> Any:
    return STUDIES.join(Patient, STUDIES.c.patient_fk == Patient.id).outerjoin(
        Assessment, Assessment.study_instance_uid == STUDIES.c.study_instance_uid
    )


def query_worklist(session: Session, q: WorklistQuery, today: date | None = None) -> WorklistPage:
    """One page of the worklist and the total count of studies matching the filters."""
    where = and_(true(), *_filters(q))
    priority = effective_priority()
    counts = {
        str(p): int(n)
        for p, n in session.execute(
            select(priority, func.count()).select_from(_from()).where(where).group_by(priority)
        )
    }
    total = sum(counts.values())
    stmt = (
        select(
            STUDIES,
            Patient.patient_name,
            Patient.patient_id,
            effective_priority().label("effective_priority"),
            effective_rank().label("effective_rank"),
            Assessment.override_priority,
            Assessment.override_reason,
            Assessment.override_by,
            Assessment.acknowledged_by,
            Assessment.reported_by,
            Assessment.pirads_overall,
            Assessment.isup_grade_group,
        )
        .select_from(_from())
        .where(where)
        .order_by(*_order(q))
        .offset(q.offset)
        .limit(q.limit)
    )
    if today is None:
        raise ValueError("the worklist needs the site's date (`TriageSettings.current_date`)")
    rows = [_row(r._mapping, today) for r in session.execute(stmt)]
    return WorklistPage(total=total, offset=q.offset, limit=q.limit, rows=rows, counts=counts)


def days_since(yyyymmdd: str | None, today: date) -> int | None:
    if not yyyymmdd:
        return None
    try:
        return (today - datetime.strptime(yyyymmdd, "%Y%m%d").date()).days
    except ValueError:
        return None


def _row(m: Any, today: date) -> dict[str, Any]:
    result = json.loads(m["result_json"]) if m["result_json"] else {}
    reason = result.get("reason") or {}
    model = result.get("model") or {}
    return {
        "study_instance_uid": m["study_instance_uid"],
        "patient_name": m["patient_name"],
        "patient_id": m["patient_id"],
        "patient_sex": m["patient_sex"],
        "patient_age": m["patient_age"],
        "accession_number": m["accession_number"],
        "study_date": m["study_date"],
        "study_description": m["study_description"],
        "referral_urgency": m["referral_urgency"],
        "request_date": m["request_date"],
        "days_waited": days_since(m["request_date"], today),
        "priority": m["effective_priority"],
        "priority_rank": m["effective_rank"],
        "priority_headline": result.get("priority_headline"),
        "priority_drivers": list(result.get("priority_drivers") or []),
        "ai_priority": result.get("ai_priority"),
        "overridden_by": m["override_by"],
        "override_reason": m["override_reason"],
        "case_likelihood": m["case_likelihood"],
        "largest_lesion_ml": m["largest_lesion_ml"],
        "gland_volume_ml": m["gland_volume_ml"],
        "psa_density": m["psa_density"],
        "status": m["status"],
        "reason": reason.get("message"),
        "reason_code": reason.get("code"),
        "priority_reasons": list(result.get("priority_reasons") or []),
        "lesion_count": len(result.get("lesions") or []),
        "model": {"name": model["name"], "version": model["version"]} if model else None,
        "disclaimer": result.get("disclaimer"),
        "acknowledged_by": m["acknowledged_by"],
        "reported_by": m["reported_by"],
        "pirads_overall": m["pirads_overall"],
        "isup_grade_group": m["isup_grade_group"],
    }
