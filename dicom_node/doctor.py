"""`radtriage doctor`: check the index against the spool, the outbox and the results, and repair
what can be repaired without losing or inventing anything.

Run it with the server stopped (a running node changes the rows and files while it looks).

Checks (``Problem.check``), and what ``repair=True`` does:

- ``partial_file``: a half-written ``tmp/*.part`` file (a crash during a write): removed.
- ``spool_unindexed``: a spooled instance the index lacks (acknowledged, then the process died
  before indexing): indexed (`dicom_node.node.reconcile`; unreadable files go to quarantine).
- ``instance_file_missing``: an indexed instance whose file is gone: not repairable (the
  sender must resend it); reported.
- ``study_stuck_analysing``: a study left ``analysing`` by a dead process: back to
  ``complete`` (`dicom_node.jobs.recover`), so it is analysed again.
- ``outbox_file_missing``: an outbox item (pending) whose document is gone: the item is marked
  ``dead`` and the study sent back to ``received`` so a new report is made; a document already
  sent is never rewritten under the same UID.
- ``outbox_orphan_file``: a document under ``outbox/`` no outbox item names (written by an
  analysis that died before recording it, so never sent): removed.
- ``sent_with_pending``: a study ``sent`` while one of its outbox items is still pending:
  back to ``reported`` so the sender finishes.
- ``results_orphan``: a ``results/`` folder for no indexed study: reported (it may be evidence).

Besides the problems, the report shows the one outbox (`store.outbox.summary`): items by
channel (dicom, hl7, fhir) and state (pending, sent, dead, withdrawn), the dead letters and the
stuck items (pending for over an hour), without file paths or message payloads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from core.domain import StudyStatus
from store import outbox
from store.index import OUTBOX_DEAD, OUTBOX_PENDING, Index, Instance, OutboxItem, Study
from store.spool import Spool

S = StudyStatus


@dataclass(frozen=True)
class Problem:
    """One inconsistency; `repaired` says whether this run fixed it."""

    check: str
    detail: str
    study_instance_uid: str | None = None
    path: str | None = None
    repaired: bool = False


@dataclass
class Report:
    """Everything one doctor run found, and the totals it looked at."""

    problems: list[Problem] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    outbox: dict[str, Any] = field(default_factory=dict)

    @property
    def unrepaired(self) -> list[Problem]:
        return [p for p in self.problems if not p.repaired]

    @property
    def ok(self) -> bool:
        """No problem left (none found, or every one repaired)."""
        return not self.unrepaired

    def to_dict(self) -> dict[str, Any]:
        by_check: dict[str, int] = {}
        for p in self.problems:
            by_check[p.check] = by_check.get(p.check, 0) + 1
        return {
            "ok": self.ok,
            "problems": [asdict(p) for p in self.problems],
            "by_check": by_check,
            "repaired": sum(p.repaired for p in self.problems),
            "unrepaired": len(self.unrepaired),
            "checked": self.checked,
            "outbox": self.outbox,
        }


def examine(spool: Spool, index: Index, results_root: Path, repair: bool = False) -> Report:
    """Run every check (module docstring); with `repair`, fix what can be fixed."""
    report = Report()
    _partial_files(spool, report, repair)
    _instances(spool, index, report, repair)
    _stuck(index, report, repair)
    _outbox(spool, index, report, repair)
    _results(index, results_root, report)
    report.outbox = outbox.summary(index, time.time())
    return report


def _partial_files(spool: Spool, report: Report, repair: bool) -> None:
    parts = sorted(spool.tmp_dir.glob("*.part"))
    for part in parts:
        if repair:
            part.unlink(missing_ok=True)
        report.problems.append(
            Problem(
                "partial_file", "half-written file from a crash", path=str(part), repaired=repair
            )
        )


def _instances(spool: Spool, index: Index, report: Report, repair: bool) -> None:
    with index.read() as s:
        rows = s.execute(
            select(Instance.path, Study.study_instance_uid).join(
                Study, Instance.study_fk == Study.id
            )
        ).all()
    known = {path for path, _ in rows}
    report.checked["instances"] = len(rows)
    for path, study_uid in rows:
        if not Path(path).is_file():
            report.problems.append(
                Problem(
                    "instance_file_missing",
                    "indexed instance has no file; the sender must resend it",
                    study_uid,
                    path,
                )
            )
    files = sorted(spool.spool_dir.glob("*/*/*.dcm"))
    report.checked["spool_files"] = len(files)
    unindexed = [f for f in files if str(f) not in known]
    if unindexed and repair:
        from dicom_node.node import reconcile

        reconcile(spool, index, time.time())
    for f in unindexed:
        report.problems.append(
            Problem(
                "spool_unindexed",
                "spooled instance missing from the index",
                path=str(f),
                repaired=repair,
            )
        )


def _stuck(index: Index, report: Report, repair: bool) -> None:
    with index.read() as s:
        stuck = list(
            s.scalars(
                select(Study.study_instance_uid).where(
                    Study.status == S.ANALYSING.value, index.mine(Study.node_id)
                )
            )
        )
        report.checked["studies"] = len(list(s.scalars(select(Study.id))))
    if stuck and repair:
        from dicom_node.jobs import recover

        recover(index, time.time())
    for uid in stuck:
        report.problems.append(
            Problem(
                "study_stuck_analysing", "left analysing by a dead process", uid, repaired=repair
            )
        )


def _outbox(spool: Spool, index: Index, report: Report, repair: bool) -> None:
    now = time.time()
    with index.read() as s:
        items = list(
            s.scalars(select(OutboxItem).where(OutboxItem.channel == outbox.Channel.DICOM.value))
        )
        sent_studies = set(
            s.scalars(select(Study.study_instance_uid).where(Study.status == S.SENT.value))
        )
    report.checked["outbox_items"] = len(items)
    named = {Path(o.path).resolve() for o in items if o.path}
    for o in items:
        if o.state == OUTBOX_PENDING and not (o.path and Path(o.path).is_file()):
            if repair:
                with index.write() as s:
                    s.execute(
                        update(OutboxItem)
                        .where(OutboxItem.id == o.id)
                        .values(
                            state=OUTBOX_DEAD,
                            last_error="document missing (doctor)",
                            closed_at=now,
                        )
                    )
                    s.execute(
                        update(Study)
                        .where(Study.study_instance_uid == o.study_instance_uid)
                        .values(status=S.RECEIVED.value, status_changed_at=now)
                    )
            report.problems.append(
                Problem(
                    "outbox_file_missing",
                    f"pending item for {o.destination} has no document",
                    o.study_instance_uid,
                    o.path,
                    repaired=repair,
                )
            )
    pending_studies = {o.study_instance_uid for o in items if o.state == OUTBOX_PENDING}
    for uid in sorted(sent_studies & pending_studies):
        if repair:
            with index.write() as s:
                s.execute(
                    update(Study)
                    .where(Study.study_instance_uid == uid, Study.status == S.SENT.value)
                    .values(status=S.REPORTED.value, status_changed_at=now)
                )
        report.problems.append(
            Problem("sent_with_pending", "sent while an item is pending", uid, repaired=repair)
        )
    files = sorted(spool.outbox_dir.glob("*/*.dcm"))
    report.checked["outbox_files"] = len(files)
    for f in files:
        if f.resolve() in named:
            continue
        if repair:
            f.unlink(missing_ok=True)
        report.problems.append(
            Problem(
                "outbox_orphan_file",
                "document no outbox item names (never sent)",
                f.parent.name,
                str(f),
                repaired=repair,
            )
        )


def _results(index: Index, results_root: Path, report: Report) -> None:
    if not results_root.is_dir():
        return
    with index.read() as s:
        uids = set(s.scalars(select(Study.study_instance_uid)))
    folders = [p for p in sorted(results_root.iterdir()) if p.is_dir()]
    report.checked["result_folders"] = len(folders)
    for folder in folders:
        if folder.name not in uids:
            report.problems.append(
                Problem(
                    "results_orphan",
                    "results folder for no indexed study (kept: it may be evidence)",
                    path=str(folder),
                )
            )
