"""The radiologist's read of a study, stored in the index: acknowledge, mark reported, override
the priority (reason required), accept / reject / edit each AI finding (in the spirit of IHE AI
Result Assessment), PI-RADS v2.1 per lesion and overall, and later the biopsy ISUP grade group.
Every change is also an audit event: the caller passes the change to `AuditTrail.append` with
the open transaction (``session=``), so that the change and its event commit together."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.domain import Priority
from workspace.tables import Assessment, FindingAssessment


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OverrideBody(_Body):
    priority: Literal[Priority.URGENT, Priority.SOON, Priority.ROUTINE] = Field(
        description="urgent, soon or routine (not analysed is the AI's state, never a choice)"
    )
    reason: str = Field(min_length=1, max_length=500, description="Why (required, audited)")


class FindingBody(_Body):
    decision: Literal["accept", "reject", "edit"]
    pirads: int | None = Field(default=None, ge=1, le=5, description="PI-RADS v2.1 of this lesion")
    sector: str | None = Field(default=None, max_length=32, description="edit: corrected sector")
    volume_ml: float | None = Field(default=None, ge=0, le=500, description="edit: volume")
    comment: str | None = Field(default=None, max_length=500)


class PiradsBody(_Body):
    pirads: int = Field(ge=1, le=5, description="PI-RADS v2.1 overall assessment category")


class BiopsyBody(_Body):
    isup_grade_group: int = Field(ge=0, le=5, description="0 = benign, 1..5 ISUP grade group")
    biopsy_date: str = Field(pattern=r"^\d{8}$", description="YYYYMMDD")


def _get(s: Session, uid: str, now: float) -> Assessment:
    row = s.scalar(select(Assessment).where(Assessment.study_instance_uid == uid))
    if row is None:
        row = Assessment(study_instance_uid=uid, updated_at=now)
        s.add(row)
    return row


class Assessments:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def _transaction(self, session: Session | None) -> Iterator[Session]:
        """The caller's open transaction, or a new one that commits at the end."""
        if session is not None:
            yield session
            return
        with Session(self.engine) as s, s.begin():
            yield s

    def _write(self, uid: str, session: Session | None, **values: Any) -> None:
        now = time.time()
        with self._transaction(session) as s:
            row = _get(s, uid, now)
            for key, value in values.items():
                setattr(row, key, now if value is _NOW else value)
            row.updated_at = now

    def acknowledge(self, uid: str, user: str, session: Session | None = None) -> None:
        self._write(uid, session, acknowledged_by=user, acknowledged_at=_NOW)

    def reported(self, uid: str, user: str, session: Session | None = None) -> None:
        self._write(uid, session, reported_by=user, reported_at=_NOW)

    def override(
        self, uid: str, user: str, body: OverrideBody, session: Session | None = None
    ) -> None:
        self._write(
            uid,
            session,
            override_priority=body.priority.value,
            override_rank=body.priority.rank,
            override_reason=body.reason,
            override_by=user,
            override_at=_NOW,
        )

    def pirads(self, uid: str, user: str, body: PiradsBody, session: Session | None = None) -> None:
        self._write(uid, session, pirads_overall=body.pirads, pirads_by=user)

    def biopsy(self, uid: str, body: BiopsyBody, session: Session | None = None) -> None:
        self._write(
            uid, session, isup_grade_group=body.isup_grade_group, biopsy_date=body.biopsy_date
        )

    def finding(
        self, uid: str, index: int, user: str, body: FindingBody, session: Session | None = None
    ) -> None:
        now = time.time()
        with self._transaction(session) as s:
            _get(s, uid, now).updated_at = now
            row = s.scalar(
                select(FindingAssessment).where(
                    FindingAssessment.study_instance_uid == uid,
                    FindingAssessment.finding_index == index,
                )
            )
            if row is None:
                row = FindingAssessment(study_instance_uid=uid, finding_index=index)
                s.add(row)
            row.decision = body.decision
            row.pirads = body.pirads
            row.sector = body.sector if body.decision == "edit" else None
            row.volume_ml = body.volume_ml if body.decision == "edit" else None
            row.comment = body.comment
            row.by = user
            row.at = now

    def get(self, uid: str) -> dict[str, Any]:
        """`GET /api/studies/{uid}/assessment`; empty fields when nothing was entered yet."""
        with Session(self.engine) as s:
            row = s.scalar(select(Assessment).where(Assessment.study_instance_uid == uid))
            findings = s.scalars(
                select(FindingAssessment)
                .where(FindingAssessment.study_instance_uid == uid)
                .order_by(FindingAssessment.finding_index)
            )
            out: dict[str, Any] = {
                "study_instance_uid": uid,
                "acknowledged_by": row.acknowledged_by if row else None,
                "acknowledged_at": row.acknowledged_at if row else None,
                "reported_by": row.reported_by if row else None,
                "reported_at": row.reported_at if row else None,
                "override": (
                    {
                        "priority": row.override_priority,
                        "reason": row.override_reason,
                        "by": row.override_by,
                        "at": row.override_at,
                    }
                    if row and row.override_priority
                    else None
                ),
                "pirads_overall": row.pirads_overall if row else None,
                "pirads_by": row.pirads_by if row else None,
                "isup_grade_group": row.isup_grade_group if row else None,
                "biopsy_date": row.biopsy_date if row else None,
                "findings": [
                    {
                        "finding_index": f.finding_index,
                        "decision": f.decision,
                        "pirads": f.pirads,
                        "sector": f.sector,
                        "volume_ml": f.volume_ml,
                        "comment": f.comment,
                        "by": f.by,
                        "at": f.at,
                    }
                    for f in findings
                ],
            }
        return out


_NOW = object()
