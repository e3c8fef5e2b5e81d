"""The live waiting list: each reported study's priority recomputed as days pass (the tick).

A study routine on day 5 must be urgent on day 26 without being analysed again. On every tick
(`WaitingList.tick`, ``[triage] tick_s``), for each of this node's reported studies, in pages
(no cap):

1. match waiting RIS orders to studies received since (`ris.orders.match_orders`);
2. recompute the priority with `core.priority.decide_priority` from the AI's likelihood, the
   order's urgency, request date and pathway (else what the images said) and the site policy,
   against today's date (``[triage] today``, an injectable clock; empty = the system date);
   PSA density = the order's PSA / the AI's gland volume;
3. write the decision into ``studies.priority``/``priority_rank`` (the worklist sorts on them)
   and ``waiting_list`` (what was last decided and sent);
4. when the flag (or the PSA density) differs from what the last SR said, build a new SR that
   supersedes it (`dicom_node.sr.build_triage_sr` with ``predecessor=``, listed in Predecessor
   Documents Sequence) and queue it in the node's DICOM outbox for every destination;
5. when what the RIS last heard differs, queue an ORU^R01 (a correction once one was sent)
   (`ris.hl7_results`); a study whose orders were all cancelled gets no HL7 result. With
   ``[hl7] fhir_base_url``, queue the decision's FHIR resources too (`ris.fhir`).

Everything is queued in the one outbox (`store.outbox`): a newer SR, ORU or FHIR push
withdraws the study's older pending one, so the last word anywhere is the current flag.

The thresholds of the model that analysed a study come from the composition root
(`ThresholdsFor`): the node does not load models. A study whose model is unknown keeps its
flag (logged), as does a study being analysed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import (
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from core import codes
from core.domain import ModelInfo, ModelRef, Priority, ReferralUrgency, StudyStatus, TriageResult
from core.periodic import Periodic
from core.priority import Override, PriorityDecision, Thresholds, days_waited, decide_priority
from core.settings import Hl7Settings, Settings, TriageSettings
from dicom_node.jobs import enqueue_document
from imaging.request_attributes import clock_start, parse_da, referral_urgency, request_values
from ris.fhir import enqueue_fhir_result
from ris.hl7_results import ResultReport, enqueue_result
from ris.orders import (
    OrderView,
    cancelled_order_for_study,
    match_orders,
    order_for_study,
)
from store.index import Index, Instance, Patient, Series
from store.index import Study as StudyRow
from store.results import WaitingListEntry, append_decision, latest_decision
from store.spool import Spool

log = logging.getLogger(__name__)

#: The model's operating points, from the composition root; None when the model is unknown.
ThresholdsFor = Callable[[ModelInfo], Thresholds | None]

PAGE = 500
# Every study with a result ticks: not-analysed, failed and not-applicable ones too (their
# referral and wait still rank them), and those whose model left the repository.
_REPORTED = (
    StudyStatus.REPORTED.value,
    StudyStatus.SENT.value,
    StudyStatus.FAILED.value,
    StudyStatus.NOT_APPLICABLE.value,
)
_NO_THRESHOLDS = Thresholds(urgent=1.0, soon=1.0)  # not read when the AI gave no likelihood


@dataclass(frozen=True)
class WaitingInputs:
    """What the policy needs of one study at one date (besides the AI's opinion), each input
    with where it came from (the decision record's inputs)."""

    referral: ReferralUrgency
    request_date: date | None
    suspected_cancer_pathway: bool
    psa_ng_ml: float | None
    referral_source: str = "none"  # order | dicom_request | none
    request_date_source: str | None = None  # order | dicom_request | study_date | received
    request_date_note: str | None = None
    image_referral: ReferralUrgency | None = None  # what the images' request said


@dataclass
class TickReport:
    studies: int = 0
    changed: int = 0
    superseding_srs: int = 0
    hl7_messages: int = 0
    fhir_messages: int = 0
    orders_matched: int = 0


def resolve_inputs(
    order: OrderView | None,
    image_referral: ReferralUrgency | None,
    image_clock: tuple[date | None, str | None, str | None],
    received: date | None,
    today: date,
) -> WaitingInputs:
    """The one rule for a study's policy inputs, at analysis and on every tick:

    - referral: the more urgent of the order's and the images' (an order never lowers what
      the images asked for, nor the reverse); its source is the one that set it;
    - request date: the order's, else the images' request or study date (`clock_start`), else
      the date received; a date after `today` is clamped to `today` and named, never dropped.
    """
    said = [(order.referral_urgency, "order")] if order is not None else []
    if image_referral is not None:
        said.append((image_referral, "dicom_request"))
    # the most urgent; on a tie the order's (the RIS's own word)
    referral, source = min(said, key=lambda x: x[0].rank, default=(ReferralUrgency.ROUTINE, "none"))
    start, start_source, note = None, None, None
    if order is not None and order.request_date is not None:
        start, start_source = order.request_date, "order"
    elif image_clock[0] is not None:
        start, start_source, note = image_clock
    elif received is not None:
        start, start_source = received, "received"
    # a request cannot follow its images: a later date (or one after today) is clamped to the
    # day the images were received, for good (the clock never runs backwards later)
    bound = min(today, received) if received is not None else today
    if start is not None and start > bound:
        when = "today" if bound == today else "the day the images were received"
        note = f"{start_source} date {start.isoformat()} is after {when}; clamped to {bound}"
        start = bound
    return WaitingInputs(
        referral,
        start,
        order.suspected_cancer_pathway if order is not None else False,
        order.psa_ng_ml if order is not None else None,
        source,
        start_source,
        note,
        image_referral,
    )


def waiting_inputs(
    result: TriageResult,
    order: OrderView | None,
    reported_at: float | None,
    known_request_date: date | None = None,
    today: date | None = None,
    received_at: float | None = None,
) -> WaitingInputs:
    """A reported study's inputs on a tick: `resolve_inputs` over its order (when matched) and
    what the images said at analysis time (recorded in the result)."""
    recorded = parse_request_date(result.request_date) or known_request_date
    if recorded is None and result.days_waited is not None and reported_at:
        recorded = _analysis_date(reported_at) - timedelta(days=result.days_waited)
    image_source = result.request_date_source if result.request_date_source != "order" else None
    image_clock: tuple[date | None, str | None, str | None] = (None, None, None)
    if recorded is not None and (image_source is not None or result.request_date is None):
        image_clock = (recorded, image_source or "dicom_request", result.request_date_note)
    image_referral = result.image_referral_urgency
    if image_referral is None and result.referral_source != "order":
        image_referral = result.referral_urgency
    received = _analysis_date(received_at) if received_at else None
    return resolve_inputs(
        order,
        image_referral,
        image_clock,
        received,
        today or date.max,
    )


def image_inputs(
    headers: Iterable[Dataset], today: date, received: date | None = None
) -> WaitingInputs:
    """The inputs of a study without an order (offline `infer`, or none matched yet)."""
    headers = list(headers)
    return resolve_inputs(
        None, _image_referral(headers), clock_start(headers, today), received, today
    )


def analysis_inputs(
    index: Index, study_instance_uid: str, headers: Iterable[Dataset], today: date
) -> WaitingInputs:
    """What the analysis step passes to `decide_priority` for a study: `resolve_inputs` over
    its RIS order (when one is matched), its DICOM request attributes and the date the node
    first received it."""
    with index.read() as s:
        order = order_for_study(s, study_instance_uid)
        row = s.execute(
            select(StudyRow.first_received_at, StudyRow.referral_urgency).where(
                StudyRow.study_instance_uid == study_instance_uid
            )
        ).first()
    headers = list(headers)
    received = _analysis_date(row[0]) if row is not None and row[0] else None
    images = _image_referral(headers)
    # the node's ingest read the request attributes of every instance (not just one header
    # per series): without a matched order, an urgency it recorded is the images' own
    indexed = ReferralUrgency(row[1]) if row is not None and row[1] else None
    if order is None and indexed is not None and indexed is not ReferralUrgency.ROUTINE:
        images = indexed if images is None or indexed.rank < images.rank else images
    return resolve_inputs(order, images, clock_start(headers, today), received, today)


def _image_referral(headers: list[Dataset]) -> ReferralUrgency | None:
    """The images' Requested Procedure Priority, None when no header carries one."""
    if next(request_values(headers, "RequestedProcedurePriority"), None) is None:
        return None
    return referral_urgency(headers)


def _analysis_date(epoch: float) -> date:
    return datetime.fromtimestamp(epoch, UTC).date()


def psa_density(psa_ng_ml: float | None, gland_volume_ml: float | None) -> float | None:
    """PSA (ng/mL) / gland volume (mL); None without both or for a gland under 1 mL."""
    if psa_ng_ml is None or gland_volume_ml is None or gland_volume_ml < 1.0:
        return None
    return round(psa_ng_ml / gland_volume_ml, 4)


def decide_today(
    result: TriageResult,
    inputs: WaitingInputs,
    thresholds: Thresholds | None,
    triage: TriageSettings,
    today: date,
) -> PriorityDecision:
    """The study's decision at `today`: the same function `radtriage simulate` ranks with.

    The AI's opinion is the one recorded at analysis (`result.ai_priority`, with the gate's
    `low_confidence`), so a re-decision never re-reads a model's thresholds; results from
    before that was recorded fall back to `thresholds`."""
    override = None
    if result.override:
        override = Override(
            Priority(result.override["priority"]),
            result.override.get("by") or "radiologist",
            result.override.get("reason", ""),
        )
    reason = ""
    if result.reason:
        reason = codes.not_analysed_reason(result.reason.get("code", "")).meaning
    return decide_priority(
        result.case_likelihood,
        thresholds or _NO_THRESHOLDS,
        inputs.referral,
        days_waited(inputs.request_date, today),
        triage.waiting_policy(),
        suspected_cancer_pathway=inputs.suspected_cancer_pathway,
        low_confidence=result.low_confidence,
        ai_opinion=result.ai_priority,
        override=override,
        not_analysed_reason=reason,
    )


class WaitingList:
    """Recomputes priorities and re-sends changed flags; the node calls `tick` on a timer."""

    def __init__(
        self,
        index: Index,
        spool: Spool,
        triage: TriageSettings,
        hl7: Hl7Settings,
        thresholds: ThresholdsFor,
        dicom_destinations: list[str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self.spool = spool
        self.triage = triage
        self.hl7 = hl7
        self.thresholds = thresholds
        self.dicom_destinations = dicom_destinations
        self.clock = clock
        self._unknown_model: set[str] = set()

    def tick(self, today: date | None = None, *, only_changed: bool = False) -> TickReport:
        """One pass over every reported study of this node; `today` defaults to the clock.
        `only_changed`: just the studies reported, re-reported or whose order changed since
        they were last decided (the node runs this every few seconds, so the RIS hears of a
        result before the radiologist starts reading, and the full pass daily or hourly)."""
        today = today or self.triage.current_date()
        report = TickReport(orders_matched=match_orders(self.index))
        last_id = 0
        while True:
            q = (
                select(StudyRow.id, StudyRow.study_instance_uid)
                .where(
                    StudyRow.id > last_id,
                    StudyRow.status.in_(_REPORTED),
                    StudyRow.result_json.is_not(None),
                    self.index.mine(StudyRow.node_id),
                )
                .order_by(StudyRow.id)
                .limit(PAGE)
            )
            if only_changed:
                entry = WaitingListEntry
                q = q.outerjoin(
                    entry, entry.study_instance_uid == StudyRow.study_instance_uid
                ).where(
                    or_(
                        entry.id.is_(None),
                        entry.stale.is_(True),
                        entry.study_reported_at.is_(None),
                        StudyRow.reported_at != entry.study_reported_at,
                    )
                )
            with self.index.read() as s:
                ids = list(s.execute(q))
            if not ids:
                return report
            for row_id, uid in ids:
                try:
                    self._study(uid, today, report)
                except Exception:  # one bad study must not stop the waiting list
                    log.exception("waiting list: study %s could not be recomputed", uid)
                last_id = row_id

    def redecide(self, uid: str, today: date | None = None) -> TickReport:
        """Decide one study now (after a radiologist's override): the same step as a tick."""
        report = TickReport()
        self._study(uid, today or self.triage.current_date(), report)
        return report

    def _study(self, uid: str, today: date, report: TickReport) -> None:
        now = self.clock()
        with self.index.write() as s:
            study = s.scalars(select(StudyRow).where(StudyRow.study_instance_uid == uid)).one()
            if study.status not in _REPORTED or study.result_json is None:
                return  # re-opened by a late instance meanwhile: the analysis decides again
            result = TriageResult.model_validate_json(study.result_json)
            entry = s.scalars(
                select(WaitingListEntry).where(WaitingListEntry.study_instance_uid == uid)
            ).first()
            override = json.loads(entry.override_json) if entry and entry.override_json else None
            cause = _cause(entry, study.reported_at, override, result.override)
            result = result.model_copy(update={"override": override})
            order = order_for_study(s, uid)
            known = s.scalar(select(StudyRow.request_date).where(StudyRow.id == study.id))
            inputs = waiting_inputs(
                result,
                order,
                study.reported_at,
                parse_request_date(known),
                today=today,
                received_at=study.first_received_at,
            )
            thresholds = None
            if result.case_likelihood is not None and result.ai_priority is None:
                # a result from before the AI's opinion was recorded: its model's thresholds,
                # else (the model left the repository) its flag as the AI's opinion: the study
                # keeps ticking either way
                thresholds = self.thresholds(result.model) if result.model else None
                if thresholds is None:
                    if uid not in self._unknown_model:
                        log.warning(
                            "study %s: thresholds of its model unknown; its flag stands in for "
                            "the AI's opinion",
                            uid,
                        )
                        self._unknown_model.add(uid)
                    if result.priority is not Priority.NOT_ANALYSED:
                        result = result.model_copy(update={"ai_priority": result.priority})
            decision = decide_today(result, inputs, thresholds, self.triage, today)
            density = psa_density(inputs.psa_ng_ml, result.gland_volume_ml)
            new = result.model_copy(
                update={
                    "priority": decision.priority,
                    "priority_rank": decision.rank,
                    "referral_urgency": inputs.referral,
                    "referral_source": inputs.referral_source,
                    "image_referral_urgency": inputs.image_referral,
                    "request_date": inputs.request_date.strftime("%Y%m%d")
                    if inputs.request_date
                    else None,
                    "request_date_source": inputs.request_date_source,
                    "request_date_note": inputs.request_date_note,
                    "days_waited": days_waited(inputs.request_date, today),
                    "priority_reasons": decision.reasons,
                    "priority_drivers": tuple(d.value for d in decision.drivers),
                    "priority_headline": decision.headline,
                    "ai_priority": decision.ai_priority or result.ai_priority,
                    "psa_density": density if density is not None else result.psa_density,
                }
            )
            report.studies += 1
            if entry is None:
                entry = WaitingListEntry(
                    study_instance_uid=uid,
                    sr_priority=result.priority.value,
                    sr_state=_state(
                        result.priority.value, result.priority_drivers, result.psa_density
                    ),
                    sr_sop_instance_uid=_sop_uid(study.previous_sr_path),
                )
                s.add(entry)
            elif entry.study_reported_at != study.reported_at:  # analysed again: its own SR
                entry.sr_priority = result.priority.value
                entry.sr_state = _state(
                    result.priority.value, result.priority_drivers, result.psa_density
                )
                entry.sr_sop_instance_uid = _sop_uid(study.previous_sr_path)
            if entry.priority != decision.priority.value:
                report.changed += int(entry.priority is not None)
            entry.priority = decision.priority.value
            entry.priority_rank = decision.rank
            entry.days_waited = new.days_waited
            entry.decided_on = today.isoformat()
            entry.reasons_json = json.dumps(list(decision.reasons))
            entry.updated_at = now
            entry.stale = False
            entry.study_reported_at = study.reported_at
            s.execute(
                update(StudyRow)
                .where(StudyRow.id == study.id)
                .values(
                    priority=decision.priority.value,
                    priority_rank=decision.rank,
                    psa_density=new.psa_density,
                    request_date=inputs.request_date.strftime("%Y%m%d")
                    if inputs.request_date
                    else None,
                )
            )
            latest = latest_decision(s, uid)
            if (
                cause in ("analysis", "override")
                or latest is None
                or _state(new.priority.value, new.priority_drivers)
                != _state(latest.priority, tuple(json.loads(latest.drivers_json)))
            ):
                append_decision(
                    s,
                    new,
                    cause=cause if latest is not None or cause != "clock" else "analysis",
                    now=now,
                    decided_on=today.isoformat(),
                    node_id=study.node_id,
                    actor=(override or {}).get("by", "") if cause == "override" else "",
                )
            said = entry.sr_state or _state(
                entry.sr_priority or "", result.priority_drivers, result.psa_density
            )
            if _state(new.priority.value, new.priority_drivers, new.psa_density) != said and (
                self._supersede(s, study, result, new, entry, now)
            ):
                report.superseding_srs += 1
            # the record of the current decision, whether or not its SR could be built yet (a
            # failed SR is tried again on the next tick: sr_state still differs)
            study.result_json = json.dumps(new.to_json_dict())
            fingerprint = hashlib.sha256(
                f"{_state(new.priority.value, new.priority_drivers, new.psa_density)}"
                f"|{entry.sr_sop_instance_uid}".encode()
            ).hexdigest()
            entry.result_fingerprint = fingerprint
            if (
                self.hl7.destinations
                and fingerprint != entry.hl7_fingerprint
                and not cancelled_order_for_study(s, uid)
            ):
                patient = s.get(Patient, study.patient_fk)
                enqueue_result(
                    s,
                    ResultReport(
                        result=new,
                        patient_id=patient.patient_id if patient else "",
                        issuer_of_patient_id=getattr(patient, "issuer_of_patient_id", "")
                        if patient
                        else "",
                        patient_name=patient.patient_name if patient else "",
                        accession_number=study.accession_number
                        or (order.accession_number if order else ""),
                        placer_order_number=order.placer_order_number if order else "",
                        filler_order_number=order.filler_order_number if order else "",
                        sr_sop_instance_uid=entry.sr_sop_instance_uid or "",
                        correction=entry.hl7_fingerprint is not None,
                    ),
                    self.hl7,
                    now,
                    node_id=study.node_id,
                )
                entry.hl7_priority = new.priority.value
                entry.hl7_fingerprint = fingerprint
                report.hl7_messages += 1
            if self.hl7.fhir_base_url and fingerprint != entry.fhir_fingerprint:
                self._queue_fhir(s, study, new, entry, now)
                entry.fhir_fingerprint = fingerprint
                report.fhir_messages += 1

    @staticmethod
    def _queue_fhir(
        s: Session, study: StudyRow, new: TriageResult, entry: WaitingListEntry, now: float
    ) -> None:
        """Queue the FHIR resources of this decision (the older pending push is withdrawn)."""
        patient = s.get(Patient, study.patient_fk)
        enqueue_fhir_result(
            s,
            new,
            sr_sop_instance_uid=entry.sr_sop_instance_uid or study.study_instance_uid,
            patient_id=patient.patient_id if patient else "",
            issuer=(patient.issuer_of_patient_id or "") if patient else "",
            accession=study.accession_number,
            now=now,
            node_id=study.node_id,
        )

    def _supersede(
        self,
        s: Session,
        study: StudyRow,
        old: TriageResult,
        new: TriageResult,
        entry: WaitingListEntry,
        now: float,
    ) -> bool:
        """Build the SR that supersedes the last one, keep it and queue it; False if it cannot
        be built (logged; the next tick tries again)."""
        uid = study.study_instance_uid
        try:
            sr_path = self._build_sr(s, study, old, new)
        except Exception:
            log.exception("study %s: superseding SR could not be built", uid)
            return False
        ds = pydicom.dcmread(sr_path, stop_before_pixels=True)
        sop_uid, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
        enqueue_document(s, study, sr_path, sop_uid, sop_class, self.dicom_destinations, now)
        documents = json.loads(study.documents_json) if study.documents_json else []
        study.documents_json = json.dumps([*documents, str(sr_path)])
        study.previous_sr_path = str(sr_path)
        study.result_json = json.dumps(new.to_json_dict())
        entry.sr_priority = new.priority.value
        entry.sr_state = _state(new.priority.value, new.priority_drivers, new.psa_density)
        entry.sr_sop_instance_uid = sop_uid
        log.info(
            "study %s: priority %s -> %s, superseding SR %s queued",
            uid,
            old.priority.value,
            new.priority.value,
            sop_uid,
        )
        return True

    @staticmethod
    def _evidence(
        s: Session, study: StudyRow, old: TriageResult, new: TriageResult
    ) -> dict[str, list[Dataset]]:
        """The superseding SR's evidence from the index (every instance, UIDs as stored) and
        one header for the patient and study modules: no pass over the study's files."""
        from dicom_node.evidence import cited_evidence

        query = (
            select(
                Series.series_instance_uid,
                Instance.sop_class_uid,
                Instance.sop_instance_uid,
                Instance.path,
            )
            .join(Series, Instance.series_fk == Series.id)
            .where(Instance.study_fk == study.id)
            .order_by(Instance.id)
        )
        rows = s.execute(query).all()
        header = None
        for row in rows:
            try:
                header = pydicom.dcmread(row.path, stop_before_pixels=True)
                break
            except (OSError, pydicom.errors.InvalidDicomError):
                continue
        if header is None:
            return {}
        header.StudyInstanceUID = study.study_instance_uid
        cited = [(r[0], r[1], r[2]) for r in rows]
        if old.series_used and Priority(new.priority) is not Priority.NOT_ANALYSED:
            return {
                role: cited_evidence(header, [c for c in cited if c[0] == series_uid])
                for role, series_uid in old.series_used.items()
            }
        return {"study": cited_evidence(header, cited)}

    def _build_sr(self, s: Session, study: StudyRow, old: TriageResult, new: TriageResult) -> Path:
        import highdicom as hd

        from dicom_node.sr import build_triage_sr

        uid = study.study_instance_uid
        documents = [Path(p) for p in json.loads(study.documents_json or "[]")]
        seg = None
        for path in documents:
            if path.is_file():
                head = pydicom.dcmread(path, stop_before_pixels=True)
                if str(head.get("Modality", "")) == "SEG":
                    seg = hd.seg.segread(path)
        evidence = self._evidence(s, study, old, new)
        previous = Path(study.previous_sr_path) if study.previous_sr_path else None
        predecessor = pydicom.dcmread(previous) if previous and previous.is_file() else None
        model = (
            ModelRef(
                new.model.name,
                new.model.version,
                new.model.sha256,
                new.disclaimer is None,
                digest=new.model.digest,
            )
            if new.model
            else None
        )
        sr = build_triage_sr(new, evidence=evidence, model=model, seg=seg, predecessor=predecessor)
        folder = self.spool.outbox_dir / uid
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{sr.SOPInstanceUID}.dcm"
        tmp = self.spool.tmp_dir / f"{sr.SOPInstanceUID}.part"
        self.spool.tmp_dir.mkdir(parents=True, exist_ok=True)
        sr.save_as(tmp, enforce_file_format=True)
        tmp.replace(target)
        return target


def _state(priority: str, drivers: tuple[str, ...] | list[str], *extra: object) -> str:
    """What an output says: the flag and its deciding driver (not the day count, which moves
    daily), plus `extra` (PSA density for the SR and ORU)."""
    first = drivers[0] if drivers else ""
    return "|".join([priority, first, *(str(x) for x in extra)])


def _cause(
    entry: WaitingListEntry | None,
    reported_at: float | None,
    override: dict[str, str] | None,
    decided_with: dict[str, str] | None,
) -> str:
    """Why the study is decided now: a new analysis, a radiologist, a changed order, or the
    clock (days passing)."""
    if entry is None or entry.study_reported_at != reported_at:
        return "analysis"
    if override != decided_with:
        return "override"
    return "order" if entry.stale else "clock"


def _sop_uid(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    except Exception:  # an unreadable file: the next SR simply has no predecessor UID here
        return None


def parse_request_date(value: str | None) -> date | None:
    """A YYYYMMDD (studies.request_date) or ISO date; None otherwise."""
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return parse_da(value)


class LiveWaitingList:
    """The waiting-list clock of a DICOM node: studies that changed every `poll_s`, every study
    every ``[triage] tick_s``. `start`/`stop`, like `DicomNode`; the RIS side (HL7 listener,
    result sender, FHIR push) is `ris.node.RisNode`."""

    def __init__(
        self,
        index: Index,
        spool: Spool,
        settings: Settings,
        thresholds: ThresholdsFor,
        *,
        poll_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.waiting_list = WaitingList(
            index,
            spool,
            settings.triage,
            settings.hl7,
            thresholds,
            [d.name for d in settings.dicom.destinations],
            clock=clock,
        )
        self.poll_s = poll_s
        self.full_every_s = settings.triage.tick_s
        self.clock = clock
        self._last_full = -float("inf")
        self._ticks = Periodic(self._tick, poll_s, "radtriage-waiting-list")

    def _tick(self) -> None:
        """Studies whose inputs changed every round; every study each `tick_s`."""
        full = self.clock() - self._last_full >= self.full_every_s
        self.waiting_list.tick(only_changed=not full)
        if full:
            self._last_full = self.clock()

    def start(self) -> None:
        self._ticks.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._ticks.stop(timeout)
