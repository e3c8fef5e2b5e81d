"""The node's analysis step: scan -> volumes -> engine -> priority -> SR/SEG -> result folder.

One study flows one way through here, in the DICOM node's process::

    scan_study(instance paths)            headers, once (imaging.study_reader)
    load_study_volumes(scan)              series selection + pixels of the three series used
    engine.predict(InferenceRequest)      arrays only: in process or on a Ray Serve cluster
    decide_priority(...)                  core.priority: AI likelihood, referral floor, waiting
    build_seg / build_triage_sr           highdicom, evidence from the headers already read
    result.json, sr.dcm, seg.dcm          into the study's result folder; the job queues them

`radtriage infer` and `radtriage serve` run this same function; only the `InferenceEngine`
differs. Nothing is ever dropped:

- an `InputError` (missing series, bad geometry, not DICOM), or a `ModelError` /
  `InferenceError` the engine reports for this study -> priority `not_analysed`, a `reason`
  {code, message} and a coded "not analysed" SR (status `reported`; `failed` for model errors);
- not an MR / not a prostate -> status `not_applicable`, still with a reason and an SR;
- a bug while reading the study -> `not_analysed` with reason `internal_error`, logged;
- the engine itself unreachable (cluster down, timeout) -> the exception propagates, so the job
  is retried with a backoff and, after repeated failures, reported "not analysed" by the job;
- if even the SR cannot be written the result says so (`failed`) and result.json is still written.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from core import codes
from core.domain import (
    REQUIRED_ROLES,
    LesionResult,
    ModelInfo,
    ModelRef,
    Prediction,
    Priority,
    SeriesRole,
    StudyStatus,
    TriageResult,
)
from core.engine import InferenceEngine, InferenceRequest, ShadowOutput
from core.errors import (
    InferenceError,
    InputError,
    ModelError,
    NotDicomError,
    NotMRError,
    RadtriageError,
    WrongBodyPartError,
)
from core.log_events import log_event
from core.priority import Thresholds, WaitingPolicy, days_waited, decide_priority
from core.settings import TriageSettings
from core.uids import require_uid
from dicom_node.evidence import scan_evidence
from dicom_node.jobs import AnalysisOutput, Document
from dicom_node.seg import build_seg
from dicom_node.sr import build_triage_sr
from imaging.series_selection import SelectionRules, load_rules
from imaging.study_reader import StudyScan, scan_study
from imaging.study_volumes import StudyVolumes, load_study_volumes
from store.index import Index
from triage.waiting_list import WaitingInputs, analysis_inputs, image_inputs, psa_density

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SR_FILE = "sr.dcm"
SEG_FILE = "seg.dcm"


@dataclass(frozen=True)
class StudyAnalysis:
    """What one analysis produced: the result and the DICOM documents written for PACS."""

    result: TriageResult
    documents: list[Document]
    out_dir: Path
    batch_sizes: dict[str, int] = field(default_factory=dict)
    shadow: ShadowOutput | None = None  # a shadow detector's answer: stored, never sent


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._last = self.start
        self.timings: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round((now - self._last) * 1000.0, 1)
        self._last = now

    def total(self) -> dict[str, float]:
        return {**self.timings, "total": round((time.perf_counter() - self.start) * 1000.0, 1)}


# --- the analysis -----------------------------------------------------------------------------


def _error_status(exc: BaseException) -> StudyStatus:
    if isinstance(exc, NotMRError | WrongBodyPartError):
        return StudyStatus.NOT_APPLICABLE
    if isinstance(exc, ModelError | InferenceError):
        return StudyStatus.FAILED
    return StudyStatus.REPORTED


def _reason(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, RadtriageError):
        return exc.to_dict()
    return {
        "code": "internal_error",
        "message": f"internal error ({type(exc).__name__}); see the server log",
    }


def _write_json_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".json.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class _Outcome:
    """What the models said (or why they could not), before priority and documents."""

    volumes: StudyVolumes | None = None
    prediction: Prediction | None = None
    model: ModelRef | None = None
    thresholds: Thresholds | None = None
    error: BaseException | None = None
    batch_sizes: dict[str, int] = field(default_factory=dict)
    shadow: ShadowOutput | None = None
    gland: ModelRef | None = None


def _run_models(
    scan: StudyScan, engine: InferenceEngine, rules: SelectionRules, clock: _Clock
) -> _Outcome:
    try:
        volumes = load_study_volumes(scan, rules)
    except InputError as exc:
        return _Outcome(error=exc)
    except Exception as exc:  # a bug must still give a "not analysed" result, never silence
        log.exception("reading the study failed", extra={"study": scan.study_instance_uid})
        return _Outcome(error=exc)
    clock.lap("load")
    request = InferenceRequest(volumes.study_instance_uid, volumes.t2w, volumes.adc, volumes.hbv)
    try:
        output = engine.predict(request)  # anything but our errors: engine down, retry later
    except (InputError, ModelError, InferenceError) as exc:
        return _Outcome(volumes=volumes, error=exc)
    clock.lap("inference")
    return _Outcome(
        volumes,
        output.prediction,
        output.detector,
        output.thresholds,
        None,
        output.batch_sizes,
        output.shadow,
        output.gland,
    )


def analyse_study(
    scan: StudyScan,
    out_dir: Path,
    engine: InferenceEngine,
    policy: WaitingPolicy,
    *,
    today: date,
    inputs: WaitingInputs | None = None,
    rules: SelectionRules | None = None,
    previous_sr: Path | None = None,
) -> StudyAnalysis:
    """Analyse one scanned study; write result.json, sr.dcm and, when analysed, seg.dcm into
    `out_dir`. `inputs`: the referral as the RIS order gives it (`waiting_list.analysis_inputs`);
    None reads it from the images' request attributes. Never raises for a bad study; raises
    when the engine cannot be reached."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    uid = scan.study_instance_uid
    outcome = (
        _run_models(scan, engine, rules or load_rules(), clock)
        if scan.series
        else _Outcome(error=NotDicomError(_no_dicom_message(scan), study_instance_uid=uid))
    )
    volumes = outcome.volumes
    evidence: dict[str, list[Dataset]] = (
        {role.value: list(volumes.headers.get(role, [])) for role in REQUIRED_ROLES}
        if volumes is not None
        else {"study": scan_evidence(scan)}
    )
    model = outcome.model or engine.current_detector()
    if inputs is None:
        inputs = image_inputs([s.headers for s in scan.series], today)
    result = _result(uid, model, outcome, inputs, policy, today)
    clock.lap("priority")
    documents, result = _write_documents(out_dir, result, evidence, model, outcome, previous_sr)
    clock.lap("report")
    finished = datetime.now(UTC).isoformat(timespec="seconds")
    result = result.model_copy(update={"timings_ms": clock.total(), "analysed_at": finished})
    _write_json_atomic(out_dir / RESULT_FILE, result.model_dump_json(indent=2))
    log_event(
        log,
        "study analysed",
        study_instance_uid=result.study_instance_uid,
        status=result.status.value,
        priority=result.priority.value,
        case_likelihood=result.case_likelihood,
        reason=(result.reason or {}).get("code"),
        model=f"{model.name}:{model.version}",
        timings_ms=result.timings_ms,
        batch_sizes=outcome.batch_sizes,
    )
    return StudyAnalysis(result, documents, out_dir, outcome.batch_sizes, outcome.shadow)


def _no_dicom_message(scan: StudyScan) -> str:
    detail = f"; e.g. {scan.skipped[0][0].name}: {scan.skipped[0][1]}" if scan.skipped else ""
    return f"no readable DICOM image files{detail}"


def _result(
    uid: str,
    model: ModelRef,
    outcome: _Outcome,
    inputs: WaitingInputs,
    policy: WaitingPolicy,
    today: date,
) -> TriageResult:
    waited = days_waited(inputs.request_date, today)
    prediction = outcome.prediction
    likelihood = prediction.case_likelihood if prediction is not None else None
    low_confidence = prediction is not None and prediction.low_confidence
    reason = None
    if prediction is None:
        error = outcome.error
        reason = (
            _reason(error)
            if error is not None
            else {"code": "internal_error", "message": "no prediction"}
        )
    decision = decide_priority(
        likelihood,
        outcome.thresholds,
        inputs.referral,
        waited,
        policy,
        suspected_cancer_pathway=inputs.suspected_cancer_pathway,
        low_confidence=low_confidence,
        not_analysed_reason=codes.not_analysed_reason(reason["code"]).meaning if reason else "",
    )
    thresholds = outcome.thresholds
    common: dict[str, Any] = {
        "study_instance_uid": uid,
        "priority": decision.priority,
        "model": ModelInfo(
            name=model.name, version=model.version, sha256=model.sha256, digest=model.digest
        ),
        "disclaimer": model.disclaimer,
        "series_used": dict(outcome.volumes.series_used) if outcome.volumes is not None else {},
        "referral_urgency": inputs.referral,
        "days_waited": waited,
        "priority_reasons": decision.reasons,
        "priority_rank": decision.rank,
        "priority_drivers": tuple(d.value for d in decision.drivers),
        "priority_headline": decision.headline,
        "ai_priority": decision.ai_priority,
        "low_confidence": low_confidence,
        "referral_source": inputs.referral_source,
        "image_referral_urgency": inputs.image_referral,
        "request_date": inputs.request_date.strftime("%Y%m%d") if inputs.request_date else None,
        "request_date_source": inputs.request_date_source,
        "request_date_note": inputs.request_date_note,
        "thresholds": {"urgent": thresholds.urgent, "soon": thresholds.soon}
        if thresholds is not None and prediction is not None
        else None,
    }
    if prediction is None:
        error = outcome.error
        return TriageResult(
            status=_error_status(error) if error is not None else StudyStatus.FAILED,
            reason=reason,
            **common,
        )
    return TriageResult(
        status=StudyStatus.REPORTED,
        case_likelihood=prediction.case_likelihood,
        lesions=tuple(LesionResult.from_lesion(les) for les in prediction.lesions),
        gland_volume_ml=prediction.gland_volume_ml,
        psa_density=psa_density(inputs.psa_ng_ml, prediction.gland_volume_ml),
        domain_gate=prediction.domain_gate,
        domain_gate_note=prediction.domain_gate_note,
        gland_model=(
            ModelInfo(
                name=gland.name, version=gland.version, sha256=gland.sha256, digest=gland.digest
            )
            if (gland := outcome.gland) is not None
            else None
        ),
        **common,
    )


def redecide_not_analysed(result: TriageResult, reason: dict[str, str]) -> TriageResult:
    """`result` as a study the AI could not analyse: flag, rank, drivers, statement and reasons
    decided again from its referral and wait (none of the AI's opinion survives)."""
    coded = codes.not_analysed_reason(reason.get("code", ""))
    rank = Priority.NOT_ANALYSED.rank
    drivers = ["not_analysed"]
    reasons = ["AI could not analyse this study"]
    referral = result.referral_urgency
    if referral is not None and referral.rank < rank:
        rank = referral.rank
        drivers.append("referral_floor")
        reasons.append(f"referral urgency {referral.value} ranks it")
    if result.priority_rank is not None and "wait_clock" in result.priority_drivers:
        rank = min(rank, result.priority_rank)
        drivers.append("wait_clock")
    return result.model_copy(
        update={
            "priority": Priority.NOT_ANALYSED,
            "status": StudyStatus.FAILED,
            "reason": reason,
            "case_likelihood": None,
            "lesions": (),
            "ai_priority": None,
            "low_confidence": False,
            "domain_gate": None,
            "thresholds": None,
            "priority_rank": rank,
            "priority_drivers": tuple(drivers),
            "priority_headline": f"Not analysed: {coded.meaning}",
            "priority_reasons": tuple(reasons),
        }
    )


def _document(path: Path, ds: Dataset) -> Document:
    return Document(path, str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.Modality))


def _write_documents(
    out_dir: Path,
    result: TriageResult,
    evidence: dict[str, list[Dataset]],
    model: ModelRef,
    outcome: _Outcome,
    previous_sr: Path | None,
) -> tuple[list[Document], TriageResult]:
    """SEG (analysed studies only) then the SR; a failure here degrades, never disappears."""
    documents: list[Document] = []
    seg = None
    if outcome.prediction is not None and outcome.volumes is not None:
        try:
            seg = build_seg(outcome.volumes.headers[SeriesRole.T2W], outcome.prediction, model)
            if seg is not None:
                seg.save_as(out_dir / SEG_FILE)
                documents.append(_document(out_dir / SEG_FILE, seg))
        except Exception:
            log.exception("SEG not written", extra={"study": result.study_instance_uid})
            seg = None
    predecessor = read_previous_sr(previous_sr)
    try:
        sr = build_triage_sr(
            result, evidence=evidence, model=model, seg=seg, predecessor=predecessor
        )
        sr.save_as(out_dir / SR_FILE)
        return [*documents, _document(out_dir / SR_FILE, sr)], result
    except Exception as exc:
        log.exception("SR not written", extra={"study": result.study_instance_uid})
        first_error = exc
    # Fall back to a "not analysed" SR so PACS still hears about the study, decided again as
    # a study the AI could not analyse (its referral and wait still rank it).
    fallback = redecide_not_analysed(
        result,
        {
            "code": "internal_error",
            "message": f"the AI report could not be written ({type(first_error).__name__})",
        },
    )
    for doc in documents:
        doc.path.unlink(missing_ok=True)
    try:
        sr = build_triage_sr(fallback, evidence=evidence, model=model, predecessor=predecessor)
        sr.save_as(out_dir / SR_FILE)
        return [_document(out_dir / SR_FILE, sr)], fallback
    except Exception:
        log.exception("fallback SR not written", extra={"study": result.study_instance_uid})
        return [], fallback


def read_previous_sr(path: Path | None) -> Dataset | None:
    """The SR a re-run supersedes (its UID goes into Predecessor Documents Sequence)."""
    if path is None or not path.is_file():
        return None
    try:
        return pydicom.dcmread(path)
    except Exception:
        log.warning("previous SR unreadable; writing a new one without predecessor")
        return None


class StudyAnalyser:
    """`dicom_node.jobs.Analyser` for the node: analyses into ``<results_root>/<uid>/``.

    Settings are checked here, once, when the node is wired (a bad `[triage]` section fails at
    start-up, not on every study). With the node's `index`, a study's RIS order (referral
    urgency, request date, pathway, PSA) counts at analysis time; without one (`infer`) the
    images' request attributes do.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        results_root: Path,
        triage: TriageSettings,
        *,
        index: Index | None = None,
        rules: SelectionRules | None = None,
        observe: Callable[[StudyAnalysis], None] | None = None,
    ) -> None:
        self.engine = engine
        self.results_root = Path(results_root)
        self.triage = triage
        self.policy = triage.waiting_policy()
        self.index = index
        self.rules = rules or load_rules()
        self.observe = observe

    def analyse(
        self,
        scan: StudyScan,
        out_dir: Path,
        previous_sr: Path | None = None,
        study_instance_uid: str | None = None,
    ) -> StudyAnalysis:
        today = self.triage.current_date()
        inputs = None
        if self.index is not None and (uid := scan.study_instance_uid or study_instance_uid):
            inputs = analysis_inputs(self.index, uid, [s.headers for s in scan.series], today)
        analysis = analyse_study(
            scan,
            out_dir,
            self.engine,
            self.policy,
            today=today,
            inputs=inputs,
            rules=self.rules,
            previous_sr=previous_sr,
        )
        if self.observe is not None:
            self.observe(analysis)
        return analysis

    def __call__(
        self, study_instance_uid: str, instance_paths: list[Path], previous_sr: Path | None
    ) -> AnalysisOutput:
        scan = scan_study(instance_paths)
        # the index's key, checked again: a folder is never named by raw header text
        out_dir = self.results_root / require_uid(study_instance_uid, "StudyInstanceUID")
        analysis = self.analyse(scan, out_dir, previous_sr, study_instance_uid)
        return AnalysisOutput(result=analysis.result, documents=analysis.documents)
