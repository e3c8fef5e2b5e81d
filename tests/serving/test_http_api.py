from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi.testclient import TestClient

from core.domain import ModelInfo, Priority, StudyStatus, TriageResult
from serving.http_api import ApiContext, AuditLog, ResultDirectory, create_app
from serving.metrics import Metrics


def _write(root: Path, uid: str, priority: Priority, likelihood: float | None) -> TriageResult:
    result = TriageResult(
        study_instance_uid=uid,
        status=StudyStatus.REPORTED,
        priority=priority,
        case_likelihood=likelihood,
        model=ModelInfo(name="det", version="1", sha256="0" * 64),
        reason=None if likelihood is not None else {"code": "missing_t2w", "message": "no T2W"},
        timings_ms={"total": 1200.0, "inference": 300.0},
    )
    (root / uid).mkdir(parents=True)
    (root / uid / "result.json").write_text(result.model_dump_json())
    age = {"1.2.3.1": 300, "1.2.3.2": 200, "1.2.3.3": 100}[uid]  # seconds ago
    os.utime(root / uid / "result.json", (time.time() - age, time.time() - age))
    return result


def _client(tmp_path: Path, ready: bool = True) -> tuple[TestClient, Metrics]:
    results = tmp_path / "results"
    _write(results, "1.2.3.1", Priority.ROUTINE, 0.05)
    _write(results, "1.2.3.2", Priority.URGENT, 0.9)
    _write(results, "1.2.3.3", Priority.NOT_ANALYSED, None)
    metrics = Metrics()
    for doc in ResultDirectory(results).list_studies():
        metrics.observe_result(
            TriageResult.model_validate({k: v for k, v in doc.items() if k != "updated_at"})
        )
    ctx = ApiContext(
        studies=ResultDirectory(results),
        metrics=metrics,
        audit=AuditLog(tmp_path / "audit.jsonl"),
        models=lambda: {"loaded": {"detector": {"name": "det", "version": "1"}}},
        outbox=lambda: [{"sop_instance_uid": "9.9", "destination": "pacs", "error": "refused"}],
        ready=lambda: ready,
    )
    return TestClient(create_app(ctx)), metrics


def test_operations_endpoints(tmp_path: Path) -> None:
    client, _ = _client(tmp_path, ready=False)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 503
    text = client.get("/metrics").text
    assert 'radtriage_studies_total{priority="urgent",status="reported"} 1.0' in text
    assert "radtriage_inference_seconds_bucket" in text
    assert client.get("/api/models").json()["loaded"]["detector"]["version"] == "1"
    assert client.get("/api/outbox").json()[0]["error"] == "refused"


def test_studies_follow_the_result_schema(tmp_path: Path) -> None:
    client, _ = _client(tmp_path)
    uids = {d["study_instance_uid"] for d in client.get("/api/studies").json()}
    assert uids == {"1.2.3.1", "1.2.3.2", "1.2.3.3"}
    doc = client.get("/api/studies/1.2.3.3").json()
    assert doc["priority"] == "not_analysed" and doc["reason"]["code"] == "missing_t2w"
    assert client.get("/api/studies/4.5.6").status_code == 404


def test_worklist_order_acknowledge_and_audited_override(tmp_path: Path) -> None:
    client, _ = _client(tmp_path)
    rows = client.get("/api/worklist").json()
    assert [r["priority"] for r in rows] == ["urgent", "not_analysed", "routine"]
    no_reason = {"user": "dr_a", "priority": "urgent"}
    assert client.post("/api/worklist/1.2.3.1/override", json=no_reason).status_code == 422
    r = client.post(
        "/api/worklist/1.2.3.1/override",
        json={"user": "dr_a", "priority": "urgent", "comment": "clinical concern"},
    )
    assert r.status_code == 200
    client.post("/api/worklist/1.2.3.2/acknowledge", json={"user": "dr_b"})
    rows = client.get("/api/worklist").json()
    assert [r["study_instance_uid"] for r in rows][:2] == ["1.2.3.1", "1.2.3.2"]  # older first
    overridden = next(r for r in rows if r["study_instance_uid"] == "1.2.3.1")
    assert overridden["overridden_by"] == "dr_a" and overridden["ai_priority"] == "routine"
    assert rows[1]["acknowledged_by"] == "dr_b"
    audit = client.get("/api/audit").json()
    assert [e["action"] for e in audit] == ["override", "acknowledge"]
    assert client.get("/api/studies/1.2.3.1").json()["priority"] == "routine"  # result untouched
    bad = client.post("/api/worklist/1.2.3.1/override", json={"user": "x", "priority": "later"})
    assert bad.status_code == 422
    assert client.post("/api/worklist/7.7/acknowledge", json={"user": "x"}).status_code == 404
    assert "Prostate MRI worklist" in client.get("/worklist").text


def test_pending_studies_are_listed_by_referral_urgency_without_patient_data(
    pending_context: tuple[ApiContext, str, str], phantoms: dict[str, Path]
) -> None:
    ctx, routine, stat = pending_context
    client = TestClient(create_app(ctx))
    assert client.get("/api/worklist").json() == []  # nothing triaged yet
    rows = client.get("/api/worklist/pending").json()
    assert [r["study_instance_uid"] for r in rows] == [stat, routine]  # STAT first, though newer
    assert [r["referral_urgency"] for r in rows] == ["urgent", "routine"]
    assert [r["status"] for r in rows] == ["received", "received"]
    n_adc = len(list(phantoms["positive"].glob("*_adc/*.dcm")))
    assert [r["instances"] for r in rows] == [n_adc, 5]
    assert all(r["received_at"] and r["error"] is None for r in rows)
    assert not {"patient_id", "patient_name", "accession_number"} & set(rows[0])


def test_worklist_rows_carry_the_waiting_time_and_the_priority_reasons(tmp_path: Path) -> None:
    results = tmp_path / "results"
    (results / "1.2.3.9").mkdir(parents=True)
    result = TriageResult(
        study_instance_uid="1.2.3.9",
        status=StudyStatus.REPORTED,
        priority=Priority.URGENT,
        case_likelihood=0.05,
        referral_urgency="routine",
        days_waited=26,
        priority_reasons=("AI csPCa likelihood 0.05 -> routine", "waited 26 days against 28"),
    )
    (results / "1.2.3.9" / "result.json").write_text(result.model_dump_json())
    ctx = ApiContext(
        studies=ResultDirectory(results), metrics=Metrics(), audit=AuditLog(tmp_path / "a.jsonl")
    )
    (row,) = TestClient(create_app(ctx)).get("/api/worklist").json()
    assert row["priority"] == "urgent" and row["days_waited"] == 26
    assert row["referral_urgency"] == "routine"
    assert row["priority_reasons"] == list(result.priority_reasons)


def test_a_stat_study_the_ai_could_not_analyse_sorts_with_the_urgent_ones() -> None:
    from serving.http_api import worklist_rows

    def doc(uid: str, priority: str, referral: str, at: str) -> dict:
        return {
            "study_instance_uid": uid,
            "priority": priority,
            "status": "sent",
            "referral_urgency": referral,
            "updated_at": at,
        }

    studies = [
        doc("ai-urgent", "urgent", "routine", "2026-11-22T10:00:00"),
        doc("na-routine", "not_analysed", "routine", "2026-11-22T08:00:00"),
        doc("na-stat", "not_analysed", "urgent", "2026-11-22T09:00:00"),
        doc("old-result", "routine", None, "2026-11-22T07:00:00"),  # before referral was kept
        doc("stat-overridden", "urgent", "urgent", "2026-11-22T06:00:00"),
    ]
    state = {"stat-overridden": {"override": {"priority": "routine", "user": "dr", "at": "x"}}}
    rows = worklist_rows(studies, state)
    assert [r["study_instance_uid"] for r in rows] == [
        "na-stat",  # urgent by its referral, waiting longer than the AI-urgent one
        "ai-urgent",
        "na-routine",
        "stat-overridden",  # a person lowered it to routine: taken as it is (oldest routine)
        "old-result",
    ]
    assert rows[0]["priority"] == "not_analysed"  # the flag itself is not changed
