"""HTTP API, worklist and operations endpoints (FastAPI).

    GET  /healthz                       process up
    GET  /readyz                        503 until every model is loaded and warm
    GET  /metrics                       Prometheus text format
    GET  /api/studies                   result.json of every study (newest first)
    GET  /api/studies/{uid}             one result.json (404 if unknown)
    GET  /api/models                    loaded and available model versions
    GET  /api/outbox                    dead letters (sends that gave up)
    GET  /api/worklist                  studies by Priority.rank, then oldest first
    POST /api/worklist/{uid}/acknowledge  {"user"}
    POST /api/worklist/{uid}/override     {"user", "priority", "comment"}
    GET  /api/audit                     the worklist audit log
    GET  /worklist                      the radiologist's page

The app reads through small seams (`ApiContext`) so the composition root decides where results,
models and the outbox come from. Overrides never rewrite result.json: they are audit events.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from core.domain import Priority, ReferralUrgency, StudyStatus, TriageResult
from serving.metrics import Metrics

WEB_DIR = Path(__file__).with_name("web")
RESULT_FILE = "result.json"


class StudySource(Protocol):
    def list_studies(self) -> list[dict[str, Any]]: ...

    def get_study(self, study_instance_uid: str) -> dict[str, Any] | None: ...


class ResultDirectory:
    """Results as written by `dicom_node.analysis`: `<root>/<StudyInstanceUID>/result.json`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _files(self) -> Iterator[Path]:
        if self.root.is_dir():
            yield from self.root.glob(f"*/{RESULT_FILE}")

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            doc = TriageResult.model_validate_json(path.read_bytes()).to_json_dict()
        except (OSError, ValueError):
            return None  # being written, or not ours
        doc["updated_at"] = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat()
        return doc

    def list_studies(self) -> list[dict[str, Any]]:
        docs = [d for p in self._files() if (d := self._read(p)) is not None]
        return sorted(docs, key=lambda d: d["updated_at"], reverse=True)

    def get_study(self, study_instance_uid: str) -> dict[str, Any] | None:
        if "/" in study_instance_uid or study_instance_uid.startswith("."):
            return None
        path = self.root / study_instance_uid / RESULT_FILE
        return self._read(path) if path.is_file() else None


class AuditLog:
    """Append-only JSON-lines audit of worklist actions; the current state is replayed from it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        record = {"at": datetime.now(UTC).isoformat(), **event}
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        return record

    def events(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self._lock:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def state(self) -> dict[str, dict[str, Any]]:
        """Per study: `acknowledged_by`, `override` (the latest override event)."""
        out: dict[str, dict[str, Any]] = {}
        for event in self.events():
            entry = out.setdefault(event["study_instance_uid"], {})
            if event["action"] == "acknowledge":
                entry["acknowledged_by"] = event["user"]
                entry["acknowledged_at"] = event["at"]
            elif event["action"] == "override":
                entry["override"] = event
        return out


class Acknowledge(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1, max_length=64)


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1, max_length=64)
    priority: Priority
    comment: str = Field(
        min_length=1, max_length=500, description="Why the AI priority is overridden (audited)"
    )


@dataclass
class ApiContext:
    """What the HTTP layer reads; each piece is supplied by the composition root."""

    studies: StudySource
    metrics: Metrics
    audit: AuditLog
    models: Callable[[], dict[str, Any]] = dict
    outbox: Callable[[], list[dict[str, Any]]] = list
    pending: Callable[[], list[dict[str, Any]]] = list  # `pending_row`s, any order
    ready: Callable[[], bool] = lambda: True


def worklist_rows(studies: list[dict[str, Any]], state: dict[str, dict[str, Any]]) -> list[dict]:
    """Worklist order: effective priority (override, else AI) by `Priority.rank`, the referral's
    urgency as a floor (`_order_rank`), oldest first.

    Each row carries what the page shows: likelihood, status, reason (not analysed), lesion count
    and largest lesion, model version, acknowledgement, the latest override and the disclaimer.
    """
    rows = []
    for doc in studies:
        uid = doc["study_instance_uid"]
        entry = state.get(uid, {})
        override = entry.get("override")
        effective = Priority(override["priority"]) if override else Priority(doc["priority"])
        reason = doc.get("reason") or {}
        lesions = doc.get("lesions") or []
        largest = max(lesions, key=lambda lesion: lesion["volume_ml"], default=None)
        model = doc.get("model") or {}
        rows.append(
            {
                "study_instance_uid": uid,
                "priority": effective.value,
                "ai_priority": doc["priority"],
                "overridden_by": override["user"] if override else None,
                "override_comment": override.get("comment") if override else None,
                "overridden_at": override["at"] if override else None,
                "case_likelihood": doc.get("case_likelihood"),
                "status": doc["status"],
                "reason": reason.get("message"),
                "reason_code": reason.get("code"),
                "lesion_count": len(lesions),
                "largest_lesion": (
                    {k: largest.get(k) for k in ("volume_ml", "likelihood", "sector")}
                    if largest
                    else None
                ),
                "gland_volume_ml": doc.get("gland_volume_ml"),
                "model": {"name": model["name"], "version": model["version"]} if model else None,
                "updated_at": doc.get("updated_at"),
                "days_waited": doc.get("days_waited"),
                "referral_urgency": doc.get("referral_urgency"),
                "priority_reasons": list(doc.get("priority_reasons") or []),
                "acknowledged_by": entry.get("acknowledged_by"),
                "acknowledged_at": entry.get("acknowledged_at"),
                "disclaimer": doc.get("disclaimer"),
            }
        )
    rows.sort(key=lambda r: (_order_rank(r), r["updated_at"] or ""))
    return rows


def _order_rank(row: dict[str, Any]) -> int:
    """The row's priority rank, with the referrer's urgency as a floor: the AI never lowers it,
    so a STAT study the AI could not analyse (flag NOT ANALYSED) sorts with the urgent ones. A
    radiologist's override is a person's decision and is taken as it is."""
    rank = Priority(row["priority"]).rank
    referral = row.get("referral_urgency")
    if not row.get("overridden_by") and referral in {u.value for u in ReferralUrgency}:
        rank = min(rank, Priority(referral).rank)
    return rank


PENDING_STATUSES = (
    StudyStatus.RECEIVED,
    StudyStatus.COMPLETE,
    StudyStatus.ANALYSING,
    StudyStatus.FAILED,
)


def is_pending(row: dict[str, Any]) -> bool:
    """An index row of a study the AI has not reported on yet (not_applicable studies, which
    are not prostate MRI, never get a result and are left out)."""
    return not row.get("result") and row.get("status") in PENDING_STATUSES


def iso_utc(epoch: float | None) -> str | None:
    """An epoch time (index rows) as ISO 8601 UTC; None when unset."""
    return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch else None


def pending_row(row: dict[str, Any]) -> dict[str, Any]:
    """What the worklist shows of a pending study: no patient identifiers."""
    error = row.get("error")
    return {
        "study_instance_uid": row["study_instance_uid"],
        "status": row["status"],
        "referral_urgency": row.get("referral_urgency") or ReferralUrgency.ROUTINE.value,
        "instances": row.get("instances"),
        "received_at": iso_utc(row.get("first_received_at")),
        "last_received_at": iso_utc(row.get("last_received_at")),
        "attempts": row.get("attempts") or 0,
        "retry_at": iso_utc(row.get("retry_at")),
        "error": error.get("message") if error else None,
        "error_code": error.get("code") if error else None,
    }


def pending_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Referrer's urgency first (the AI cannot lower it), then longest waiting."""
    rank = {u.value: i for i, u in enumerate(ReferralUrgency)}
    return sorted(rows, key=lambda r: (rank.get(r["referral_urgency"], 99), r["received_at"] or ""))


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(title="radtriage", version="0.1.0")
    app.state.ctx = ctx

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = ctx.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(ctx.metrics.exposition(), media_type=ctx.metrics.content_type)

    @app.get("/api/studies")
    def studies() -> list[dict[str, Any]]:
        return ctx.studies.list_studies()

    @app.get("/api/studies/{study_instance_uid}")
    def study(study_instance_uid: str) -> dict[str, Any]:
        doc = ctx.studies.get_study(study_instance_uid)
        if doc is None:
            raise HTTPException(404, f"no result for study {study_instance_uid}")
        return doc

    @app.get("/api/models")
    def models() -> dict[str, Any]:
        return ctx.models()

    @app.get("/api/outbox")
    def outbox() -> list[dict[str, Any]]:
        return ctx.outbox()

    @app.get("/api/worklist/pending")
    def pending() -> list[dict[str, Any]]:
        return pending_order(ctx.pending())

    @app.get("/api/worklist")
    def worklist() -> list[dict[str, Any]]:
        return worklist_rows(ctx.studies.list_studies(), ctx.audit.state())

    def _known(uid: str) -> None:
        if ctx.studies.get_study(uid) is None:
            raise HTTPException(404, f"no result for study {uid}")

    @app.post("/api/worklist/{study_instance_uid}/acknowledge")
    def acknowledge(study_instance_uid: str, body: Acknowledge) -> dict[str, Any]:
        _known(study_instance_uid)
        return ctx.audit.append(
            {"action": "acknowledge", "study_instance_uid": study_instance_uid, "user": body.user}
        )

    @app.post("/api/worklist/{study_instance_uid}/override")
    def override(study_instance_uid: str, body: Override) -> dict[str, Any]:
        _known(study_instance_uid)
        doc = ctx.studies.get_study(study_instance_uid) or {}
        return ctx.audit.append(
            {
                "action": "override",
                "study_instance_uid": study_instance_uid,
                "user": body.user,
                "priority": body.priority.value,
                "ai_priority": doc.get("priority"),
                "comment": body.comment,
            }
        )

    @app.get("/api/audit")
    def audit() -> list[dict[str, Any]]:
        return ctx.audit.events()

    @app.get("/worklist", response_class=HTMLResponse)
    def worklist_page() -> HTMLResponse:
        return HTMLResponse((WEB_DIR / "worklist.html").read_text(encoding="utf-8"))

    app.state.started = time.time()
    return app
