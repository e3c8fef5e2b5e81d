"""The one analysis path: study files -> volumes -> prediction -> priority -> result + SR/SEG.

Used by the server (inside the Ray Serve ingress), by `radtriage infer` and by the tests; only
the `Engine` that turns three volumes into a `Prediction` differs (direct ONNX Runtime calls or
Ray Serve deployments). Nothing is ever dropped:

- an `InputError`, `ModelError` or `InferenceError` -> priority `not_analysed`, `reason`
  {code, message} and a coded "not analysed" SR (status `reported`; `failed` for model errors);
- not an MR / not a prostate -> status `not_applicable`, still with a reason and an SR;
- any other exception -> `not_analysed` with reason `internal_error`, logged with its traceback;
- if even the SR cannot be written the result says so (`failed`) and result.json is still written.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset

from core.domain import (
    REQUIRED_ROLES,
    LesionResult,
    ModelInfo,
    ModelRef,
    Prediction,
    Priority,
    ReferralUrgency,
    SeriesRole,
    StudyStatus,
    TriageResult,
    Volume,
)
from core.errors import (
    InferenceError,
    InputError,
    ModelError,
    NotMRError,
    RadtriageError,
    WrongBodyPartError,
)
from core.log_events import log_event
from core.priority import Thresholds, WaitingPolicy, decide_priority
from core.settings import ModelSettings, TriageSettings
from dicom_node.sr import read_evidence

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SR_FILE = "sr.dcm"
SEG_FILE = "seg.dcm"


@dataclass(frozen=True)
class EngineOutput:
    """A prediction plus how it was computed (batch size per model, for metrics)."""

    prediction: Prediction
    batch_sizes: dict[str, int] = field(default_factory=dict)


class Engine(Protocol):
    """Turns the three volumes of one study into a prediction (direct or via Ray Serve)."""

    @property
    def detector(self) -> ModelRef: ...

    @property
    def thresholds(self) -> Thresholds: ...

    def predict(self, t2w: Volume, adc: Volume, hbv: Volume) -> EngineOutput: ...


@dataclass(frozen=True)
class StudyAnalysis:
    """What one analysis produced: the result and the DICOM documents written for PACS."""

    result: TriageResult
    documents: list[Path]
    out_dir: Path
    batch_sizes: dict[str, int] = field(default_factory=dict)


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


def _paths(source: Path | Sequence[Path]) -> list[Path]:
    if isinstance(source, (str, Path)):
        root = Path(source)
        if root.is_file():
            return [root]
        return sorted(p for p in root.rglob("*") if p.is_file())
    return [Path(p) for p in source]


def _request_values(headers: Iterable[Dataset], keyword: str) -> Iterator[Any]:
    """`keyword` of each header, at top level and in its Request Attributes Sequence items."""
    for ds in headers:
        for item in (ds, *ds.get("RequestAttributesSequence", [])):
            yield item.get(keyword)


def referral_urgency(headers: Iterable[Dataset]) -> ReferralUrgency:
    """The most urgent Requested Procedure Priority (0040,1003) found, top level or in the
    Request Attributes Sequence; routine when absent."""
    best = ReferralUrgency.ROUTINE
    rank = {ReferralUrgency.ROUTINE: 0, ReferralUrgency.SOON: 1, ReferralUrgency.URGENT: 2}
    for value in _request_values(headers, "RequestedProcedurePriority"):
        urgency = ReferralUrgency.from_dicom(str(value) if value else None)
        if rank[urgency] > rank[best]:
            best = urgency
    return best


STALE_REQUEST_DAYS = 365  # an older request is an archive study re-sent, not a waiting patient


def days_since_referral(headers: Iterable[Dataset], today: date) -> int | None:
    """Days from the earliest Issue Date of Imaging Service Request (0040,2004) in `headers`
    to `today`: the waiting-list clock. None when no header carries a valid, past date, or
    when the request is over `STALE_REQUEST_DAYS` old."""
    earliest: date | None = None
    for value in _request_values(headers, "IssueDateOfImagingServiceRequest"):
        try:
            issued = datetime.strptime(str(value or "").strip()[:8], "%Y%m%d").date()
        except ValueError:
            continue
        if issued <= today and (earliest is None or issued < earliest):
            earliest = issued
    if earliest is None or (today - earliest).days > STALE_REQUEST_DAYS:
        return None
    return (today - earliest).days


def _error_status(exc: BaseException) -> StudyStatus:
    if isinstance(exc, (NotMRError, WrongBodyPartError)):
        return StudyStatus.NOT_APPLICABLE
    if isinstance(exc, (ModelError, InferenceError)):
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


def _study_uid(evidence: Sequence[Dataset], fallback: str | None) -> str:
    """The StudyInstanceUID the files carry (they are what the SR cites), else `fallback`."""
    for ds in evidence:
        if ds.get("StudyInstanceUID"):
            return str(ds.StudyInstanceUID)
    return fallback or ""


def analyse_study(
    source: Path | Sequence[Path],
    out_dir: Path,
    engine: Engine,
    *,
    triage: TriageSettings | None = None,
    study_instance_uid: str | None = None,
    previous_sr: Path | None = None,
    days_waited: int | None = None,
) -> StudyAnalysis:
    """Analyse one study (a folder or its instance paths) and write result.json, sr.dcm and,
    when analysed, seg.dcm into `out_dir`. Never raises for a bad study."""
    triage = triage or TriageSettings()
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    prediction: Prediction | None = None
    volumes: Any = None
    batch_sizes: dict[str, int] = {}
    error: BaseException | None = None
    try:
        from dicom_node.study_volumes import load_study_volumes

        if isinstance(source, (str, Path)):
            volumes = load_study_volumes(Path(source))
        else:
            from dicom_node.study_reader import scan_study

            volumes = load_study_volumes(scan_study([Path(p) for p in source]))
        clock.lap("load")
        output = engine.predict(volumes.t2w, volumes.adc, volumes.hbv)
        prediction, batch_sizes = output.prediction, output.batch_sizes
        clock.lap("inference")
    except (InputError, ModelError, InferenceError) as exc:
        error = exc
    except Exception as exc:  # a bug must still give a "not analysed" result, never silence
        log.exception("analysis crashed", extra={"study_instance_uid": study_instance_uid})
        error = exc

    evidence: dict[str, list[Dataset]]
    if volumes is not None:
        evidence = {role.value: list(volumes.headers.get(role, [])) for role in REQUIRED_ROLES}
        uid = volumes.study_instance_uid
    else:
        evidence = {"study": read_evidence(_paths(source))}
        uid = _study_uid(evidence["study"], study_instance_uid)
    uid = uid or study_instance_uid or "unknown"

    model = engine.detector
    result = _result(
        uid, model, engine.thresholds, prediction, volumes, error, evidence, triage, days_waited
    )
    clock.lap("priority")
    documents, result = _write_documents(
        out_dir, result, evidence, model, prediction, volumes, previous_sr
    )
    clock.lap("report")
    result = result.model_copy(update={"timings_ms": clock.total()})
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
        batch_sizes=batch_sizes,
    )
    return StudyAnalysis(result, documents, out_dir, batch_sizes)


def _result(
    uid: str,
    model: ModelRef,
    thresholds: Thresholds,
    prediction: Prediction | None,
    volumes: Any,
    error: BaseException | None,
    evidence: Mapping[str, Sequence[Dataset]],
    triage: TriageSettings,
    days_waited: int | None,
) -> TriageResult:
    headers = [ds for group in evidence.values() for ds in group]
    referral = referral_urgency(headers)
    if days_waited is None:
        days_waited = days_since_referral(headers, datetime.now(UTC).date())
    policy = WaitingPolicy(triage.fds_days, triage.escalate_within_days, triage.urgent_within_days)
    likelihood = prediction.case_likelihood if prediction is not None else None
    decision = decide_priority(likelihood, thresholds, referral, days_waited, policy)
    log_event(log, "priority decided", study_instance_uid=uid, reasons=list(decision.reasons))
    common: dict[str, Any] = {
        "study_instance_uid": uid,
        "priority": decision.priority,
        "model": ModelInfo(name=model.name, version=model.version, sha256=model.sha256),
        "disclaimer": model.disclaimer,
        "series_used": dict(volumes.series_used) if volumes is not None else {},
        "referral_urgency": referral,
        "days_waited": days_waited,
        "priority_reasons": decision.reasons,
    }
    if prediction is None:
        return TriageResult(
            status=_error_status(error) if error is not None else StudyStatus.FAILED,
            reason=_reason(error)
            if error is not None
            else {"code": "internal_error", "message": "no prediction"},
            **common,
        )
    return TriageResult(
        status=StudyStatus.REPORTED,
        case_likelihood=prediction.case_likelihood,
        lesions=tuple(LesionResult.from_lesion(les) for les in prediction.lesions),
        gland_volume_ml=prediction.gland_volume_ml,
        **common,
    )


def _write_documents(
    out_dir: Path,
    result: TriageResult,
    evidence: Mapping[str, Sequence[Dataset]],
    model: ModelRef,
    prediction: Prediction | None,
    volumes: Any,
    previous_sr: Path | None,
) -> tuple[list[Path], TriageResult]:
    """SEG (analysed studies only) then the SR; a failure here degrades, never disappears."""
    from dicom_node.seg import build_seg
    from dicom_node.sr import build_triage_sr

    documents: list[Path] = []
    seg = None
    if prediction is not None and volumes is not None:
        try:
            seg = build_seg(volumes.headers[SeriesRole.T2W], prediction, model)
            if seg is not None:
                seg.save_as(out_dir / SEG_FILE)
                documents.append(out_dir / SEG_FILE)
        except Exception:
            log.exception(
                "SEG not written", extra={"study_instance_uid": result.study_instance_uid}
            )
            seg = None
    predecessor = _read_previous(previous_sr)
    try:
        sr = build_triage_sr(
            result,
            evidence=evidence,
            model=model,
            prediction=prediction,
            seg=seg,
            predecessor=predecessor,
        )
        sr.save_as(out_dir / SR_FILE)
        documents.append(out_dir / SR_FILE)
        return documents, result
    except Exception as exc:
        log.exception("SR not written", extra={"study_instance_uid": result.study_instance_uid})
        first_error = exc
    # Fall back to a "not analysed" SR so PACS still hears about the study.
    fallback = result.model_copy(
        update={
            "priority": Priority.NOT_ANALYSED,
            "status": StudyStatus.FAILED,
            "reason": {
                "code": "internal_error",
                "message": f"the AI report could not be written ({type(first_error).__name__})",
            },
            "case_likelihood": None,
            "lesions": (),
        }
    )
    for path in documents:
        path.unlink(missing_ok=True)
    try:
        sr = build_triage_sr(fallback, evidence=evidence, model=model, predecessor=predecessor)
        sr.save_as(out_dir / SR_FILE)
        return [out_dir / SR_FILE], fallback
    except Exception:
        log.exception(
            "fallback SR not written", extra={"study_instance_uid": result.study_instance_uid}
        )
        return [], fallback


def _read_previous(path: Path | None) -> Dataset | None:
    if path is None:
        return None
    import pydicom

    try:
        return pydicom.dcmread(path)
    except Exception:
        log.warning("previous SR unreadable; writing a new one without predecessor")
        return None


class PipelineEngine:
    """Direct calls into `models.pipeline.TriagePipeline` (offline `infer`, tests, benchmarks)."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self._thresholds: Thresholds = pipeline.thresholds

    @classmethod
    def load(cls, models: ModelSettings, *, device: str = "auto") -> PipelineEngine:
        from models.pipeline import TriagePipeline

        pipeline = TriagePipeline.from_repository(
            repository=models.repository,
            detector=models.detector,
            gland=models.gland,
            device=device,
        )
        return cls(pipeline)

    @property
    def detector(self) -> ModelRef:
        return self.pipeline.detector.ref  # type: ignore[no-any-return]

    @property
    def thresholds(self) -> Thresholds:
        return self._thresholds

    def predict(self, t2w: Volume, adc: Volume, hbv: Volume) -> EngineOutput:
        return EngineOutput(self.pipeline.predict(t2w, adc, hbv), {"detector": 1, "gland": 1})
