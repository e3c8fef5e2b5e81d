"""The audit trail: every login, study view and action, append-only in the index, chained.

Each event stores ``hash = sha256(prev_hash || canonical JSON of its content)``, where the
first event's ``prev_hash`` is 64 zeros. Changing, deleting or reordering any row breaks the
chain from that row on; `verify` finds the first broken row. ``prev_hash`` is unique, so two
writers appending at once cannot fork the chain: the loser's insert fails and it retries on
the new head.

The chain alone can be rebuilt by anyone who can write the database. An `AuditAnchor` ties it
to two things the database does not hold: a key file (``mac = HMAC-SHA256(key, hash)`` per
event, so rehashing from any row needs the key) and a head file that names the newest event
(so deleting the newest rows leaves the chain shorter than its exported head). The ATNA syslog
stream (`workspace.syslog_sender`) carries each event's hash and MAC as a third copy.

A state change and its audit event commit in one transaction when the caller passes the change
as ``append(..., change=...)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from workspace.tables import AuditEvent

GENESIS = "0" * 64
KEY_BYTES = 32


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
        **({"site_id": row.site_id} if row.site_id else {}),
    }


class AuditAnchor:
    """The audit chain's anchor outside the database: a MAC key and an exported head."""

    def __init__(self, key: bytes, head_file: Path) -> None:
        if len(key) < 16:
            raise ValueError("audit key shorter than 16 bytes")
        self.key = key
        self.head_file = head_file

    @classmethod
    def load(cls, key_file: Path, head_file: Path, *, create: bool) -> AuditAnchor | None:
        """The anchor from `key_file`; with `create`, a new random key is written 0600 when the
        file is absent. None when the file is absent and `create` is false."""
        if not key_file.exists():
            if not create:
                return None
            key_file.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another process made it first
                fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(KEY_BYTES) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        mode = key_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"audit key file {key_file} is readable by others ({mode:o})")
        key = bytes.fromhex(key_file.read_text(encoding="ascii").strip())
        return cls(key, head_file)

    def mac(self, event_hash: str) -> str:
        return hmac.new(self.key, event_hash.encode(), hashlib.sha256).hexdigest()

    def read_head(self) -> dict[str, Any] | None:
        try:
            head = json.loads(self.head_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return head if isinstance(head, dict) else {}

    def export_head(
        self,
        event_id: int,
        event_hash: str,
        mac: str,
        first_anchored: Callable[[], int] | None = None,
    ) -> None:
        """Write the head file (atomically, under a lock) unless it already names a later
        event. ``anchored_from`` keeps the first anchored event's id; when there is no head
        file yet it comes from `first_anchored` (the first event with a MAC in the index), so
        a deleted head file cannot move it forward."""
        self.head_file.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.head_file.with_name(self.head_file.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                head = self.read_head()
            except (ValueError, OSError):
                head = None
            if head and int(head.get("id", 0)) >= event_id:
                return
            record = {
                "id": event_id,
                "hash": event_hash,
                "mac": mac,
                "anchored_from": int(head["anchored_from"])
                if head
                else (first_anchored() if first_anchored is not None else event_id),
                "at": time.time(),
            }
            tmp = self.head_file.with_name(self.head_file.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.head_file)


def anchor_files(audit: Any, storage_root: Path) -> tuple[Path, Path]:
    """(key file, head file) of `[audit]` (`core.settings.AuditSettings`)."""
    key_file = audit.key_file or storage_root / "audit.key"
    head_file = audit.head_file or storage_root / "audit-head.json"
    return Path(key_file), Path(head_file)


def anchor_from_settings(audit: Any, storage_root: Path, *, create: bool) -> AuditAnchor | None:
    """The anchor `[audit]` configures (None: no key file and `create` is false)."""
    return AuditAnchor.load(*anchor_files(audit, storage_root), create=create)


def verify_configured(engine: Engine, audit: Any, storage_root: Path) -> Verification:
    """`radtriage audit verify`: the chain, checked against the configured anchor. A head file
    without its key file fails (the MACs could not be checked)."""
    key_file, head_file = anchor_files(audit, storage_root)
    anchor = AuditAnchor.load(key_file, head_file, create=False)
    if anchor is None and head_file.exists():
        return Verification(False, 0, None, f"the audit key file {key_file} is missing")
    return AuditTrail(engine, anchor).verify()


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
    def __init__(
        self, engine: Engine, anchor: AuditAnchor | None = None, site_id: str | None = None
    ) -> None:
        self.engine = engine
        self.anchor = anchor
        #: the site whose events this trail writes and lists (None: every site, tools)
        self.site_id = site_id
        self._lock = threading.Lock()
        #: called after each commit with the event (the ATNA sender wakes on it)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def append(
        self,
        action: str,
        *,
        user: str = "",
        role: str = "",
        study_instance_uid: str | None = None,
        address: str = "",
        detail: dict[str, Any] | None = None,
        change: Callable[[Session], Any] | None = None,
    ) -> dict[str, Any]:
        """Append one event. `change`, when given, runs first in the same transaction: the
        state change and its audit event commit together or not at all."""
        content = {
            "at": time.time(),
            "user": user[:64],
            "role": role[:16],
            "action": action[:32],
            "study_instance_uid": study_instance_uid[:64] if study_instance_uid else None,
            "address": address[:64],
            "detail": json.loads(canonical(detail or {})),
        }
        if self.site_id:  # hashed with the event (absent on events before sites, 0010)
            content["site_id"] = self.site_id[:64]
        for _ in range(20):
            with self._lock, Session(self.engine) as s, s.begin():
                if change is not None:
                    change(s)
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
                    site_id=content.get("site_id", ""),
                    prev_hash=prev,
                    hash=chain_hash(prev, content),
                )
                if self.anchor is not None:
                    row.mac = self.anchor.mac(row.hash)
                s.add(row)
                try:
                    s.flush()
                except IntegrityError:
                    s.rollback()
                    continue  # another process appended first: chain onto its event
                event = {"id": row.id, **content, "hash": row.hash, "mac": row.mac}
            if self.anchor is not None and event["mac"]:
                self.anchor.export_head(
                    event["id"], event["hash"], event["mac"], self._first_anchored
                )
            for listener in self.listeners:
                listener(event)
            return event
        raise RuntimeError("could not append to the audit chain (20 concurrent retries)")

    def events(
        self, offset: int = 0, limit: int = 100, study_instance_uid: str | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """(total, one page of events of this trail's site, newest first)."""
        with Session(self.engine) as s:
            q = select(AuditEvent)
            count = select(func.count()).select_from(AuditEvent)
            if self.site_id is not None:
                q = q.where(AuditEvent.site_id == self.site_id)
                count = count.where(AuditEvent.site_id == self.site_id)
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

    def _first_anchored(self) -> int:
        with Session(self.engine) as s:
            first = s.scalar(select(func.min(AuditEvent.id)).where(AuditEvent.mac.is_not(None)))
            return int(first or 0)

    def after(self, last_id: int, limit: int = 100) -> list[dict[str, Any]]:
        """Events with an id above `last_id`, oldest first (the ATNA sender's queue)."""
        with Session(self.engine) as s:
            rows = s.scalars(
                select(AuditEvent)
                .where(AuditEvent.id > last_id)
                .order_by(AuditEvent.id)
                .limit(limit)
            )
            return [{"id": r.id, **_content(r), "hash": r.hash, "mac": r.mac} for r in rows]

    def verify(self, batch: int = 1000) -> Verification:
        """Walk the chain from the first event; report the first row that does not match.

        With an anchor, every event from the head file's ``anchored_from`` on must carry a MAC
        under the key, and the chain must reach the exported head with the same hash: rows
        deleted from the end, or a chain rebuilt from any row, fail."""
        head = self.anchor.read_head() if self.anchor is not None else None
        anchored_from = int(head["anchored_from"]) if head else None
        prev = GENESIS
        count = 0
        last_id = 0
        head_seen = False
        with Session(self.engine) as s:
            if self.anchor is None:
                anchored = s.scalar(select(func.count()).where(AuditEvent.mac.is_not(None)))
                if anchored:
                    return Verification(
                        False, 0, None, "events carry MACs but the audit key file is missing"
                    )
            elif head is None and s.scalar(select(func.count()).where(AuditEvent.mac.is_not(None))):
                return Verification(False, 0, None, "the audit head file is missing")
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
                    break
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
                    if self.anchor is not None:
                        must = anchored_from is not None and row.id >= anchored_from
                        if (row.mac is not None or must) and not hmac.compare_digest(
                            row.mac or "", self.anchor.mac(row.hash)
                        ):
                            return Verification(
                                False, count, row.id, "MAC does not match the audit key"
                            )
                    if head and row.id == int(head["id"]):
                        if row.hash != head.get("hash"):
                            return Verification(
                                False, count, row.id, "hash differs from the exported head"
                            )
                        head_seen = True
                    prev = row.hash
                    count += 1
                    last_id = row.id
        if head and not head_seen:
            return Verification(
                False,
                count,
                int(head["id"]),
                f"the chain ends before the exported head (event {head['id']}): rows deleted",
            )
        return Verification(True, count)
