"""The audit trail: every login, study view and action, append-only in the index, chained.

Each event stores ``hash = sha256(prev_hash || canonical JSON of its content)``, where the
first event's ``prev_hash`` is 64 zeros. Changing, deleting or reordering any row breaks the
chain from that row on; `verify` finds the first broken row. ``prev_hash`` is unique, so two
writers appending at once cannot fork the chain: the loser's insert fails and it retries on
the new head.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from workspace.tables import AuditEvent

GENESIS = "0" * 64


def canonical(event: dict[str, Any]) -> bytes:
    """The bytes an event's hash covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, content: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical(content)).hexdigest()


def _content(row: AuditEvent) -> dict[str, Any]:
    return {
        "at": row.at,
        "user": row.user,
        "role": row.role,
        "action": row.action,
        "study_instance_uid": row.study_instance_uid,
        "address": row.address,
        "detail": json.loads(row.detail_json),
    }


@dataclass(frozen=True)
class Verification:
    ok: bool
    events: int
    first_bad_id: int | None = None
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "first_bad_id": self.first_bad_id,
            "problem": self.problem,
        }


class AuditTrail:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()

    def append(
        self,
        action: str,
        *,
        user: str = "",
        role: str = "",
        study_instance_uid: str | None = None,
        address: str = "",
        detail: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        content = {
            "at": time.time(),
            "user": user[:64],
            "role": role[:16],
            "action": action[:32],
            "study_instance_uid": study_instance_uid[:64] if study_instance_uid else None,
            "address": address[:64],
            "detail": json.loads(canonical(detail or {})),
        }
        for _ in range(20):
            with self._lock, Session(self.engine) as s, s.begin():
                head = s.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1))
                prev = head or GENESIS
                row = AuditEvent(
                    at=content["at"],
                    user=content["user"],
                    role=content["role"],
                    action=content["action"],
                    study_instance_uid=content["study_instance_uid"],
                    address=content["address"],
                    detail_json=json.dumps(content["detail"], sort_keys=True),
                    prev_hash=prev,
                    hash=chain_hash(prev, content),
                )
                s.add(row)
                try:
                    s.flush()
                except IntegrityError:
                    s.rollback()
                    continue  # another process appended first: chain onto its event
                return {"id": row.id, **content, "hash": row.hash}
        raise RuntimeError("could not append to the audit chain (20 concurrent retries)")

    def events(
        self, offset: int = 0, limit: int = 100, study_instance_uid: str | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """(total, one page of events, newest first)."""
        with Session(self.engine) as s:
            q = select(AuditEvent)
            count = select(func.count()).select_from(AuditEvent)
            if study_instance_uid is not None:
                q = q.where(AuditEvent.study_instance_uid == study_instance_uid)
                count = count.where(AuditEvent.study_instance_uid == study_instance_uid)
            total = s.scalar(count) or 0
            rows = s.scalars(q.order_by(AuditEvent.id.desc()).offset(offset).limit(limit))
            return int(total), [{"id": r.id, **_content(r), "hash": r.hash} for r in rows]

    def count_since(self, action: str, since: float, user: str | None = None) -> int:
        """Events of `action` (by `user`) at or after `since` (epoch seconds)."""
        q = (
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == action, AuditEvent.at >= since)
        )
        if user is not None:
            q = q.where(AuditEvent.user == user)
        with Session(self.engine) as s:
            return int(s.scalar(q) or 0)

    def verify(self, batch: int = 1000) -> Verification:
        """Walk the chain from the first event; report the first row that does not match."""
        prev = GENESIS
        count = 0
        last_id = 0
        with Session(self.engine) as s:
            while True:
                rows = list(
                    s.scalars(
                        select(AuditEvent)
                        .where(AuditEvent.id > last_id)
                        .order_by(AuditEvent.id)
                        .limit(batch)
                    )
                )
                if not rows:
                    return Verification(True, count)
                for row in rows:
                    if row.prev_hash != prev:
                        return Verification(
                            False, count, row.id, "prev_hash does not match the event before"
                        )
                    try:
                        expected = chain_hash(prev, _content(row))
                    except ValueError:
                        return Verification(False, count, row.id, "detail is not valid JSON")
                    if row.hash != expected:
                        return Verification(False, count, row.id, "content does not match hash")
                    prev = row.hash
                    count += 1
                    last_id = row.id
