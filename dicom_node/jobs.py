"""The per-study job: a persistent state machine in the index, and the analysis worker.

::

    received --(assembler: complete)--> complete --(worker claims)--> analysing
    analysing --(analyser returns)--> reported --(sender: all sent)--> sent
    analysing --(analyser raises)--> complete, retried after a backoff (10 s, 20 s, ...)
    analysing --(analyser raised MAX_ANALYSIS_FAILURES times in a row)--> reported, with a
                coded "not analysed" SR built here (safety net: PACS always hears of the study);
                failed only if even that SR cannot be built
    reported --(dead letter)--> failed
    received --(assembler: no prostate MRI)--> not_applicable
    reported | sent | failed | not_applicable --(late instance)--> received   (re-run)
    analysing --(restart after a crash)--> complete                           (resume)

Every change is a compare-and-set UPDATE (``WHERE status IN (allowed sources)``), so the SCP,
assembler, worker and sender threads never overwrite each other's decisions. The work queue is
ordered by referral urgency (Requested Procedure Priority), then by age (first instance).
With several DICOM nodes on one database, a node claims and recovers only the studies it
received (`Index.mine`): their files are in its spool.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pydicom
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.domain import Priority, StudyStatus, TriageResult
from core.errors import RadtriageError
from store import outbox
from store.index import Index, Study
from store.results import update_result_columns
from store.spool import Spool, write_atomic

log = logging.getLogger(__name__)

S = StudyStatus

# For each target status, the statuses a study may move from.
TRANSITIONS: dict[StudyStatus, frozenset[StudyStatus]] = {
    S.COMPLETE: frozenset({S.RECEIVED, S.ANALYSING}),
    S.ANALYSING: frozenset({S.COMPLETE}),
    S.REPORTED: frozenset({S.ANALYSING}),
    S.SENT: frozenset({S.REPORTED}),
    S.FAILED: frozenset({S.ANALYSING, S.REPORTED}),
    S.NOT_APPLICABLE: frozenset({S.RECEIVED}),
    S.RECEIVED: frozenset({S.ANALYSING, S.REPORTED, S.SENT, S.FAILED, S.NOT_APPLICABLE}),
}

SR_MODALITY = "SR"
MAX_ANALYSIS_FAILURES = 3
RETRY_BACKOFF_S = 10.0


@dataclass(frozen=True)
class Document:
    """A DICOM document an analysis wrote (SR, SEG) with the UIDs the outbox needs."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    modality: str


@dataclass(frozen=True)
class AnalysisOutput:
    """What an analysis produces: the result and the DICOM documents (SR, SEG) to send."""

    result: TriageResult
    documents: list[Document]


class Analyser(Protocol):
    """The analysis seam (`triage.analysis.StudyAnalyser`), injected by the composition root.

    Called from the node's worker thread with every instance file of the study, and the SR of
    the previous analysis when this is a re-run (its SOP Instance UID goes into the new SR's
    Predecessor Documents Sequence). Return `AnalysisOutput`; a study that cannot be analysed
    is returned as a "not analysed" result with its SR, not raised. Raise only when the
    analysis itself broke (the study becomes ``failed``)."""

    def __call__(
        self, study_instance_uid: str, instance_paths: list[Path], previous_sr: Path | None
    ) -> AnalysisOutput: ...


def transition(index: Index, study_instance_uid: str, to: StudyStatus, **values: Any) -> bool:
    """Move a study to `to` if its current status allows it; returns whether it moved."""
    sources = [s.value for s in TRANSITIONS[to]]
    with index.write() as s:
        res = s.execute(
            update(Study)
            .where(Study.study_instance_uid == study_instance_uid, Study.status.in_(sources))
            .values(status=to.value, status_changed_at=values.pop("now", time.time()), **values)
        )
        return bool(getattr(res, "rowcount", 0))


def recover(index: Index, now: float) -> list[str]:
    """After a restart: every study of this node left ``analysing`` goes back to ``complete``."""
    with index.write() as s:
        uids = list(
            s.scalars(
                select(Study.study_instance_uid).where(
                    Study.status == S.ANALYSING.value, index.mine(Study.node_id)
                )
            )
        )
    for uid in uids:
        transition(index, uid, S.COMPLETE, now=now)
    return uids


@dataclass(frozen=True)
class Claim:
    study_instance_uid: str
    mr_instances: int  # MR instances when analysis started: more later means a re-run
    previous_sr: Path | None


def claim_next(index: Index, now: float) -> Claim | None:
    """Take this node's most urgent, then oldest, ``complete`` study; mark it ``analysing``."""
    with index.write() as s:
        study = s.scalars(
            select(Study)
            .where(
                Study.status == S.COMPLETE.value,
                index.mine(Study.node_id),
                (Study.retry_at.is_(None)) | (Study.retry_at <= now),
            )
            .order_by(Study.urgency_rank, Study.first_received_at, Study.id)
            .limit(1)
        ).first()
        if study is None:
            return None
        study.status = S.ANALYSING.value
        study.status_changed_at = now
        study.analysis_started_at = now
        study.attempts += 1
        study.analysed_instance_count = study.instance_count
        previous = Path(study.previous_sr_path) if study.previous_sr_path else None
        return Claim(study.study_instance_uid, Index.mr_instance_count(s, study.id), previous)


def enqueue_document(
    s: Session,
    study: Study,
    path: Path,
    sop_instance_uid: str,
    sop_class_uid: str,
    destinations: Iterable[str],
    now: float,
) -> None:
    """Queue one document of `study` for every destination, once (a resend reuses the row); a
    newer document of the same kind (SR, SEG) withdraws the older pending one
    (`store.outbox.enqueue`)."""
    for dest in destinations:
        outbox.enqueue(
            s,
            outbox.Message(
                channel=outbox.Channel.DICOM,
                kind=outbox.dicom_kind(sop_class_uid),
                study_instance_uid=study.study_instance_uid,
                destination=dest,
                item_uid=sop_instance_uid,
                node_id=study.node_id,
                path=str(path),
                sop_class_uid=sop_class_uid,
            ),
            now,
        )


def record_report(
    index: Index,
    spool: Spool,
    claim: Claim,
    output: AnalysisOutput,
    destinations: list[str],
    now: float,
) -> None:
    """Keep the documents under the storage root, queue them for every destination and move
    the study to ``reported`` (or back to ``received`` when instances arrived meanwhile)."""
    uid = claim.study_instance_uid
    kept: list[tuple[Path, str, str, str]] = []
    folder = spool.outbox_folder(uid)
    folder.mkdir(parents=True, exist_ok=True)
    for doc in output.documents:
        target = folder / f"{doc.sop_instance_uid}.dcm"
        if not target.exists():
            write_atomic(target, (doc.path.read_bytes(),), spool.tmp_dir)
        kept.append((target, doc.sop_instance_uid, doc.sop_class_uid, doc.modality))
    sr = next((p for p, _, _, m in kept if m == SR_MODALITY), None)
    with index.write() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        if study.status != S.ANALYSING.value:
            log.warning("study %s left analysing (%s) before its report", uid, study.status)
            return
        late = Index.mr_instance_count(s, study.id) > claim.mr_instances
        study.status = S.RECEIVED.value if late else S.REPORTED.value
        study.status_changed_at = now
        study.reported_at = now
        study.result_json = json.dumps(output.result.to_json_dict())
        update_result_columns(s, study.id, output.result, now)
        study.documents_json = json.dumps([str(p) for p, *_ in kept])
        study.error_code = None
        study.error_message = None
        study.analysis_failures = 0
        study.retry_at = None
        if sr is not None:
            study.previous_sr_path = str(sr)
        for path, sop_uid, sop_class, _ in kept:
            enqueue_document(s, study, path, sop_uid, sop_class, destinations, now)
        if late:
            log.info("study %s got new instances during analysis: analysing again", uid)
        elif kept and destinations and not unsent_documents(s, uid):
            # the same documents were already delivered (a re-run that changed nothing, whose
            # first report the sender finished while the study was being analysed again)
            study.status = S.SENT.value
            study.sent_at = now


def unsent_documents(s: Session, study_instance_uid: str) -> int:
    """DICOM outbox items of the study not yet delivered (pending or dead; not withdrawn)."""
    return outbox.undelivered(s, study_instance_uid, outbox.Channel.DICOM)


def not_analysed_fallback(
    claim: Claim, paths: list[Path], code: str, message: str, out_dir: Path
) -> AnalysisOutput:
    """A coded "not analysed" SR for a study the analyser itself keeps failing on (models or
    inference cluster down), built from the study's own headers: never silent, never dropped."""
    from datetime import UTC, datetime

    from core import codes
    from dicom_node.evidence import scan_evidence
    from dicom_node.sr import build_triage_sr
    from imaging.request_attributes import clock_start, referral_urgency, request_values
    from imaging.study_reader import scan_study

    scan = scan_study(paths)
    evidence = scan_evidence(scan)
    headers = [s.headers for s in scan.series]
    uid = claim.study_instance_uid
    # what the images asked for is kept, so the waiting list still ranks it by referral and wait
    asked = next(request_values(headers, "RequestedProcedurePriority"), None) is not None
    image_referral = referral_urgency(headers) if asked else None
    start, source, note = clock_start(headers, datetime.now(UTC).date())
    result = TriageResult(
        study_instance_uid=uid,
        status=S.FAILED,
        priority=Priority.NOT_ANALYSED,
        reason={
            "code": code,
            "message": f"AI analysis failed {MAX_ANALYSIS_FAILURES} times: {message}",
        },
        referral_urgency=image_referral,
        image_referral_urgency=image_referral,
        referral_source="dicom_request" if image_referral is not None else "none",
        request_date=start.strftime("%Y%m%d") if start else None,
        request_date_source=source,
        request_date_note=note,
        priority_drivers=("not_analysed",),
        priority_headline=f"Not analysed: {codes.not_analysed_reason(code).meaning}",
    )
    previous = claim.previous_sr
    predecessor = pydicom.dcmread(previous) if previous and previous.is_file() else None
    sr = build_triage_sr(result, evidence={"study": evidence}, model=None, predecessor=predecessor)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{sr.SOPInstanceUID}.dcm"
    sr.save_as(target, enforce_file_format=True)
    document = Document(target, str(sr.SOPInstanceUID), str(sr.SOPClassUID), str(sr.Modality))
    return AnalysisOutput(result=result, documents=[document])


class JobWorker:
    """Runs the analyser on claimed studies, one at a time, in the calling thread."""

    def __init__(
        self,
        index: Index,
        spool: Spool,
        analyse: Analyser,
        destinations: list[str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self.spool = spool
        self.analyse = analyse
        self.destinations = destinations
        self.clock = clock

    def run_once(self) -> str | None:
        """Analyse the next study, if any; returns its StudyInstanceUID."""
        claim = claim_next(self.index, self.clock())
        if claim is None:
            return None
        uid = claim.study_instance_uid
        paths: list[Path] = []
        try:
            paths = self.index.instance_paths(uid)
            output = self.analyse(uid, paths, claim.previous_sr)
            record_report(self.index, self.spool, claim, output, self.destinations, self.clock())
        except Exception as exc:
            err = exc if isinstance(exc, RadtriageError) else None
            code = err.reason_code if err else "internal_error"
            message = err.message if err else f"{type(exc).__name__}: {exc}"
            log.exception("analysis of study %s failed", uid)
            self._analysis_failed(claim, paths, code, message)
        return uid

    def _analysis_failed(self, claim: Claim, paths: list[Path], code: str, message: str) -> None:
        """Back to ``complete`` with a retry time; after too many failures, report the study as
        not analysed (coded SR to PACS); ``failed`` only if even that cannot be done."""
        uid = claim.study_instance_uid
        now = self.clock()
        with self.index.read() as s:
            failures = 1 + (
                s.scalar(select(Study.analysis_failures).where(Study.study_instance_uid == uid))
                or 0
            )
        values: dict[str, Any] = {
            "now": now,
            "error_code": code,
            "error_message": message,
            "analysis_failures": failures,
        }
        if failures < MAX_ANALYSIS_FAILURES:
            retry_at = now + RETRY_BACKOFF_S * 2 ** (failures - 1)
            transition(self.index, uid, S.COMPLETE, retry_at=retry_at, **values)
            return
        try:
            output = not_analysed_fallback(claim, paths, code, message, self.spool.tmp_dir)
            record_report(self.index, self.spool, claim, output, self.destinations, now)
            for document in output.documents:  # record_report keeps its own copy in the spool
                document.path.unlink(missing_ok=True)
            log.warning("study %s reported as not analysed after %d failures", uid, failures)
        except Exception:
            log.exception("study %s: not even a not-analysed SR could be built", uid)
            transition(self.index, uid, S.FAILED, retry_at=None, **values)
