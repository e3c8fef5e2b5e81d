"""What the node records of a study's result: the sortable result columns on ``studies``, the
``waiting_list`` row (the flag last decided, a radiologist's override and what each way out last
received) and the ``decisions`` record (one immutable row per change of flag).

Written by the analysis (`update_result_columns`, in the transaction that stores
``result_json``) and by the waiting-list clock; read by the worklist, FHIR and HL7 projections.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import Boolean, Float, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from core.domain import TriageResult
from store.index import Base, Instance, Study


class WaitingListEntry(Base):
    __tablename__ = "waiting_list"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    priority: Mapped[str] = mapped_column(String(16))
    priority_rank: Mapped[int] = mapped_column(Integer)
    days_waited: Mapped[int | None] = mapped_column(Integer, nullable=True)
    decided_on: Mapped[str] = mapped_column(String(10))
    reasons_json: Mapped[str] = mapped_column(Text, default="[]")
    sr_priority: Mapped[str | None] = mapped_column(String(16), nullable=True)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hl7_priority: Mapped[str | None] = mapped_column(String(16), nullable=True)
    hl7_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    study_reported_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # what the result says now (flag, PSA density, SR), and what was last queued for FHIR
    result_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    fhir_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    stale: Mapped[bool] = mapped_column(Boolean, default=False)  # set by a changed order
    updated_at: Mapped[float] = mapped_column(Float)
    # a radiologist's flag {"priority", "by", "reason"} (migration 0007); the tick decides with it
    override_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    # what the last SR said: "flag|deciding driver|PSA density" (migration 0007)
    sr_state: Mapped[str | None] = mapped_column(String(128), nullable=True)


class Decision(Base):
    """One change of a study's flag, never updated: its inputs, the flag, the coded drivers (the
    deciding one first), the headline every output states, what caused it and who."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    node_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    decided_at: Mapped[float] = mapped_column(Float)
    decided_on: Mapped[str] = mapped_column(String(10))  # the site's date (YYYY-MM-DD)
    cause: Mapped[str] = mapped_column(String(16))  # analysis | clock | order | override
    actor: Mapped[str] = mapped_column(String(64), default="")  # the user of an override
    priority: Mapped[str] = mapped_column(String(16))
    priority_rank: Mapped[int] = mapped_column(Integer)
    drivers_json: Mapped[str] = mapped_column(Text)
    headline: Mapped[str] = mapped_column(Text)
    inputs_json: Mapped[str] = mapped_column(Text)


DECISION_CAUSES = ("analysis", "clock", "order", "override")


def decision_inputs(result: TriageResult) -> dict[str, object]:
    """The policy inputs a decision was made from, with their sources (from the result)."""
    model = result.model
    return {
        "case_likelihood": result.case_likelihood,
        "ai_priority": result.ai_priority.value if result.ai_priority else None,
        "low_confidence": result.low_confidence,
        "domain_gate": result.domain_gate,
        "model": f"{model.name}:{model.version}" if model else None,
        "model_sha256": model.sha256 if model else None,
        "model_digest": model.digest if model else None,
        "thresholds": result.thresholds,
        "referral": result.referral_urgency.value if result.referral_urgency else None,
        "referral_source": result.referral_source,
        "request_date": result.request_date,
        "request_date_source": result.request_date_source,
        "request_date_note": result.request_date_note,
        "days_waited": result.days_waited,
        "psa_density": result.psa_density,
        "not_analysed_reason": (result.reason or {}).get("code"),
        "override": result.override,
        "reasons": list(result.priority_reasons),
    }


def latest_decision(session: Session, study_instance_uid: str) -> Decision | None:
    return session.scalars(
        select(Decision)
        .where(Decision.study_instance_uid == study_instance_uid)
        .order_by(Decision.id.desc())
        .limit(1)
    ).first()


def append_decision(
    session: Session,
    result: TriageResult,
    *,
    cause: str,
    now: float,
    decided_on: str,
    node_id: str = "",
    actor: str = "",
) -> Decision:
    """Append the decision `result` carries (in the caller's transaction)."""
    if cause not in DECISION_CAUSES:
        raise ValueError(f"cause must be one of {DECISION_CAUSES}, got {cause!r}")
    row = Decision(
        study_instance_uid=result.study_instance_uid,
        node_id=node_id,
        decided_at=now,
        decided_on=decided_on,
        cause=cause,
        actor=actor[:64],
        priority=result.priority.value,
        priority_rank=result.priority_rank
        if result.priority_rank is not None
        else result.priority.rank,
        drivers_json=json.dumps(list(result.priority_drivers)),
        headline=result.priority_headline or "",
        inputs_json=json.dumps(decision_inputs(result)),
    )
    session.add(row)
    return row


def decision_rows(session: Session, study_instance_uid: str) -> list[dict[str, object]]:
    """Every decision of a study, oldest first (for the study API)."""
    return [
        {
            "decided_at": d.decided_at,
            "decided_on": d.decided_on,
            "cause": d.cause,
            "actor": d.actor or None,
            "priority": d.priority,
            "priority_rank": d.priority_rank,
            "drivers": json.loads(d.drivers_json),
            "headline": d.headline,
            "inputs": json.loads(d.inputs_json),
        }
        for d in session.scalars(
            select(Decision)
            .where(Decision.study_instance_uid == study_instance_uid)
            .order_by(Decision.id)
        )
    ]


def record_override(
    session: Session, study_instance_uid: str, override: dict[str, str] | None, now: float
) -> None:
    """Store a radiologist's flag (None: withdraw it) for the waiting list to decide with; the
    study is re-decided on the next tick, or at once by the caller's `redecide`."""
    entry = session.scalars(
        select(WaitingListEntry).where(WaitingListEntry.study_instance_uid == study_instance_uid)
    ).first()
    if entry is None:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == study_instance_uid)
        ).first()
        entry = WaitingListEntry(
            study_instance_uid=study_instance_uid,
            priority=(study.priority if study is not None else None) or "not_analysed",
            priority_rank=(study.priority_rank if study is not None else None) or 1,
            decided_on="",
            updated_at=now,
        )
        session.add(entry)
    entry.override_json = json.dumps(override) if override else None
    entry.stale = True
    entry.updated_at = now


def request_date_of(result: TriageResult, now: float) -> str | None:
    """YYYYMMDD of the imaging request: the result's own when it carries one, else the day
    `days_waited` before the report."""
    own = getattr(result, "request_date", None)
    if own:
        return str(own)
    if result.days_waited is None:
        return None
    day = datetime.fromtimestamp(now, UTC).date() - timedelta(days=result.days_waited)
    return day.strftime("%Y%m%d")


def _patient_header(session: Session, study_id: int) -> tuple[str | None, str | None]:
    """PatientSex (0010,0040) and PatientAge (0010,1010) from one instance of the study."""
    from pydicom import dcmread

    path = session.scalar(
        select(Instance.path).where(Instance.study_fk == study_id).order_by(Instance.id).limit(1)
    )
    if path is None:
        return None, None
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientSex", "PatientAge"])
    except Exception:  # unreadable now: the columns stay empty, the worklist shows a dash
        return None, None
    sex = str(ds.get("PatientSex") or "")[:16] or None
    age = str(ds.get("PatientAge") or "")[:16] or None
    return sex, age


def update_result_columns(
    session: Session, study_id: int, result: TriageResult, now: float
) -> None:
    """Copy a finished result into the sortable ``studies`` columns (call it in the same
    transaction that stores ``result_json``)."""
    largest = max((lesion.volume_ml for lesion in result.lesions), default=None)
    sex, age = _patient_header(session, study_id)
    session.execute(
        update(Study)
        .where(Study.id == study_id)
        .values(
            priority=result.priority.value,
            priority_rank=result.priority_rank
            if result.priority_rank is not None
            else result.priority.rank,
            case_likelihood=result.case_likelihood,
            largest_lesion_ml=largest,
            gland_volume_ml=result.gland_volume_ml,
            psa_density=result.psa_density,
            request_date=request_date_of(result, now),
            patient_sex=sex,
            patient_age=age,
        )
    )
