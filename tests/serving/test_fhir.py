"""FHIR R4 endpoints: ServiceRequest in, DiagnosticReport/Observation out, validated with
fhir.resources (R4B models; these resources are unchanged from R4), behind the API's auth."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from sqlalchemy import select, text

from core.domain import LesionResult, ModelInfo, Priority, StudyStatus, TriageResult
from ris.fhir import create_fhir_router
from ris.orders import ORDER_CANCELLED, Order
from store.index import Index
from workspace.accounts import Accounts
from workspace.auth import CLINICAL, require

V2 = "http://terminology.hl7.org/CodeSystem/v2-0203"


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(f"sqlite:///{tmp_path}/index.db")


@pytest.fixture
def tokens(index: Index) -> dict[str, str]:
    accounts = Accounts(index.engine)
    accounts.add_user("rita", "radiologist", "correct horse battery")
    accounts.add_user("mel", "ml_engineer", "correct horse battery")
    return {"radiologist": accounts.new_token("rita"), "ml_engineer": accounts.new_token("mel")}


@pytest.fixture
def client(index: Index) -> TestClient:
    app = FastAPI()
    app.state.ctx = SimpleNamespace(index=index)
    app.state.accounts = Accounts(index.engine)
    app.include_router(create_fhir_router(dependencies=[Depends(require(*CLINICAL))]))
    return TestClient(app)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def service_request(placer: str, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "priority": "stat",
        "authoredOn": "2026-11-20",
        "code": {"text": "MRI prostate"},
        "subject": {"identifier": {"system": "urn:oid:1.2.3.4", "value": "PAT001"}},
        "identifier": [
            {
                "type": {"coding": [{"system": V2, "code": "PLAC"}]},
                "system": "RIS",
                "value": placer,
            },
            {"type": {"coding": [{"system": V2, "code": "ACSN"}]}, "value": "ACC001"},
        ],
        "reasonCode": [{"coding": [{"code": "2WW"}]}],
        "note": [{"text": "Raised PSA"}],
        "contained": [
            {
                "resourceType": "Observation",
                "id": "psa",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "2857-1"}]},
                "valueQuantity": {"value": 6.5, "unit": "ng/mL", "code": "ng/mL"},
            }
        ],
    }
    body.update(kw)
    return body


def test_needs_authentication_and_a_clinical_role(
    client: TestClient, tokens: dict[str, str]
) -> None:
    assert client.get("/fhir/DiagnosticReport").status_code == 401
    assert client.post("/fhir/ServiceRequest", json=service_request("P1")).status_code == 401
    r = client.get("/fhir/DiagnosticReport", headers=_auth(tokens["ml_engineer"]))
    assert r.status_code == 403


def test_service_request_becomes_an_order_and_changes_and_cancels(
    client: TestClient, tokens: dict[str, str], index: Index
) -> None:
    h = _auth(tokens["radiologist"])
    r = client.post("/fhir/ServiceRequest", json=service_request("PLC1"), headers=h)
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    r = client.post(
        "/fhir/ServiceRequest", json=service_request("PLC1", priority="routine"), headers=h
    )
    assert r.status_code == 201
    with index.read() as s:
        (order,) = s.scalars(select(Order)).all()
        assert (order.placer_namespace, order.accession_number) == ("RIS", "ACC001")
        assert (order.patient_id, order.issuer_of_patient_id) == ("PAT001", "1.2.3.4")
        assert order.referral_urgency == "routine" and order.changes == 1
        assert order.request_date == "2026-11-20" and order.suspected_cancer_pathway
        assert order.psa_ng_ml == pytest.approx(6.5)
    r = client.post(
        "/fhir/ServiceRequest", json=service_request("PLC1", status="revoked"), headers=h
    )
    assert r.status_code == 201
    with index.read() as s:
        assert s.scalars(select(Order.state)).one() == ORDER_CANCELLED


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"authoredOn": "20th of November"}, "ServiceRequest"),
        ({"status": "bogus"}, "status"),
        ({"identifier": []}, "PLAC"),
        ({"resourceType": "Patient"}, "resourceType"),
        ({"status": "draft"}, "status"),
    ],
)
def test_bad_service_request_is_refused_with_an_operation_outcome(
    client: TestClient, tokens: dict[str, str], index: Index, change: dict[str, Any], why: str
) -> None:
    body = {**service_request("PLC9"), **change}
    r = client.post("/fhir/ServiceRequest", json=body, headers=_auth(tokens["radiologist"]))
    assert r.status_code == 400
    issue = OperationOutcome.model_validate(r.json()).issue[0]
    assert why in (issue.diagnostics or "")
    with index.read() as s:
        assert s.scalars(select(Order)).all() == []


def _add_results(index: Index, n: int) -> None:
    with index.write() as s:
        s.execute(
            text(
                "INSERT INTO patients (patient_id, issuer_of_patient_id, patient_name) "
                "VALUES ('PAT001', '1.2.3.4', 'Doe^John')"
            )
        )
        for i in range(n):
            result = TriageResult(
                study_instance_uid=f"1.2.826.0.1.3680043.8.498.{i + 1}",
                status=StudyStatus.REPORTED,
                priority=Priority.URGENT if i == 0 else Priority.ROUTINE,
                case_likelihood=0.9 if i == 0 else 0.1,
                gland_volume_ml=40.0,
                psa_density=0.16,
                lesions=(
                    LesionResult(
                        likelihood=0.8, volume_ml=1.5, centroid_mm=(1, 2, 3), category="ai_high"
                    ),
                ),
                model=ModelInfo(name="cspca_detector", version="0.1.0", sha256="0" * 64),
                disclaimer="NOT FOR CLINICAL USE: demonstration model.",
                referral_urgency="urgent",
                days_waited=4,
            )
            s.execute(
                text(
                    "INSERT INTO studies (study_instance_uid, patient_fk, accession_number, "
                    "study_date, study_description, referral_urgency, urgency_rank, status, "
                    "node_id, status_changed_at, first_received_at, last_received_at, "
                    "instance_count, checked_instance_count, analysed_instance_count, attempts, "
                    "analysis_failures, result_json, reported_at) VALUES (:uid, 1, :acc, '', '', "
                    "'routine', 2, 'reported', '', 0, 0, 0, 0, 0, 0, 0, 0, :r, 1795000000)"
                ),
                {
                    "uid": result.study_instance_uid,
                    "acc": f"ACC{i:03d}",
                    "r": json.dumps(result.to_json_dict()),
                },
            )


def test_diagnostic_reports_validate_and_paginate(
    client: TestClient, tokens: dict[str, str], index: Index
) -> None:
    _add_results(index, 7)
    h = _auth(tokens["radiologist"])
    r = client.get("/fhir/DiagnosticReport", params={"_count": 3}, headers=h)
    assert r.status_code == 200
    bundle = Bundle.model_validate(r.json())
    assert bundle.total == 7 and len(bundle.entry or []) == 3
    seen = []
    url: str | None = "/fhir/DiagnosticReport?_count=3"
    while url:
        page = client.get(url, headers=h).json()
        for entry in page.get("entry", []):
            report = DiagnosticReport.model_validate(entry["resource"])
            seen.append(report.identifier[0].value)
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert len(seen) == len(set(seen)) == 7  # every study once, no cap
    first = DiagnosticReport.model_validate(r.json()["entry"][0]["resource"])
    assert first.status == "preliminary"
    assert first.code.coding[0].code == "126000"
    assert first.conclusionCode[0].coding[0].code == "RT101"
    assert "NOT FOR CLINICAL USE" in (first.conclusion or "")
    assert first.subject.identifier.value == "PAT001"


def test_observations_map_tid1500_measurements(
    client: TestClient, tokens: dict[str, str], index: Index
) -> None:
    _add_results(index, 2)
    r = client.get(
        "/fhir/Observation", params={"identifier": "ACC000"}, headers=_auth(tokens["radiologist"])
    )
    assert r.status_code == 200
    bundle = r.json()
    assert bundle["total"] == 1
    observations = [Observation.model_validate(e["resource"]) for e in bundle["entry"]]
    by_code = {o.code.coding[0].code: o for o in observations}
    group = by_code["125007"]
    assert len(group.hasMember or []) == len(observations) - 1
    assert by_code["RT001"].valueCodeableConcept.coding[0].code == "RT101"
    assert float(by_code["RT002"].valueQuantity.value) == pytest.approx(0.9)
    volume = by_code["118565006"]
    assert volume.valueQuantity.code == "mL" and volume.bodySite.coding[0].code == "41216001"
    assert by_code["RT006"].valueQuantity.code == "ng/mL/mL"
    lesion = by_code["RT003"]
    assert lesion.component[0].valueQuantity.value == pytest.approx(1.5)
    assert lesion.derivedFrom[0].identifier.value == "urn:oid:1.2.826.0.1.3680043.8.498.1"
    assert lesion.device.display == "cspca_detector 0.1.0"
    r = client.get(
        "/fhir/Observation",
        params={"subject:identifier": "urn:oid:1.2.3.4|NOBODY"},
        headers=_auth(tokens["radiologist"]),
    )
    assert r.json()["total"] == 0


class _FhirServer:
    """A real HTTP peer on loopback that stores what is PUT (a FHIR server's update)."""

    def __init__(self, status: int = 200, port: int = 0) -> None:
        import http.server
        import threading

        self.status = status
        self.resources: dict[str, dict[str, Any]] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.status == 200:
                    outer.resources[self.path] = body
                    outer.puts.append(self.path)
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.puts: list[str] = []  # every accepted PUT's path, in order
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _queue_fhir(index: Index, result: TriageResult, now: float, sr_uid: str = "1.2.3.100") -> int:
    from ris.fhir import enqueue_fhir_result

    with index.write() as s:
        return enqueue_fhir_result(
            s,
            result,
            sr_sop_instance_uid=sr_uid,
            patient_id="PAT001",
            issuer="1.2.3.4",
            accession="ACC1",
            now=now,
            node_id="",
        )


def _decision(priority: Priority, uid: str = "1.2.826.0.1.3680043.8.498.1") -> TriageResult:
    return TriageResult(
        study_instance_uid=uid,
        status=StudyStatus.REPORTED,
        priority=priority,
        case_likelihood=0.9 if priority is Priority.URGENT else 0.1,
        model=ModelInfo(name="cspca_detector", version="0.1.0", sha256="0" * 64),
        referral_urgency="routine",
        days_waited=4,
    )


@pytest.mark.integration
def test_fhir_pushes_retry_with_backoff_and_refusals_are_dead_letters(index: Index) -> None:
    from ris.fhir import FhirSender
    from store.outbox import DEAD, PENDING, SENT, RetryPolicy

    _queue_fhir(index, _decision(Priority.URGENT), now=0.0)
    _queue_fhir(index, _decision(Priority.ROUTINE, "1.2.826.0.1.3680043.8.498.2"), 0.0, "1.2.9")
    server = _FhirServer(status=500)
    now = [1.0]
    try:
        push = FhirSender(
            index, server.url, policy=RetryPolicy(initial_backoff_s=10), clock=lambda: now[0]
        )
        assert push.run_once() == 0  # the server fails: retried after 10 s
        rows = index.outbox(channel="fhir")
        assert [(r["state"], r["attempts"], r["next_attempt_at"]) for r in rows] == [
            (PENDING, 1, 11.0)
        ] * 2
        assert "HTTP 500" in rows[0]["last_error"]
        server.status = 200
        assert push.run_once() == 0  # not due yet
        now[0] = 11.0
        assert push.run_once() == 2
        reports = [r for p, r in server.resources.items() if "/DiagnosticReport/" in p]
        observations = [r for p, r in server.resources.items() if "/Observation/" in p]
        assert len(reports) == 2 and observations
        for report in reports:
            DiagnosticReport.model_validate(report)
        for observation in observations:
            Observation.model_validate(observation)
        # each decision: its Observations first, its DiagnosticReport last
        assert "/DiagnosticReport/" in server.puts[len(server.puts) // 2 - 1]
        assert "/DiagnosticReport/" in server.puts[-1]
        assert push.run_once() == 0  # nothing new
        server.status = 422  # the server refuses the resource itself: no point retrying
        _queue_fhir(index, _decision(Priority.SOON, "1.2.826.0.1.3680043.8.498.3"), 12.0, "1.2.8")
        now[0] = 12.0
        assert push.run_once() == 0
        assert [r["state"] for r in index.outbox(channel="fhir")] == [SENT, SENT, DEAD]
    finally:
        server.close()


@pytest.mark.integration
def test_fhir_server_outage_ends_with_the_latest_decision_only(index: Index) -> None:
    """The FHIR server is down while a routine then an urgent decision are queued; when it is
    back it receives the urgent one only."""
    import socket

    from ris.fhir import FhirSender
    from store.outbox import SENT, WITHDRAWN, RetryPolicy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    now = [1.0]
    url = f"http://127.0.0.1:{port}/fhir"
    push = FhirSender(index, url, policy=RetryPolicy(initial_backoff_s=5), clock=lambda: now[0])
    _queue_fhir(index, _decision(Priority.ROUTINE), now=0.0)
    assert push.run_once() == 0  # connection refused
    assert "FHIR push failed" in index.outbox(channel="fhir")[0]["last_error"]
    _queue_fhir(index, _decision(Priority.URGENT), now=2.0)
    server = _FhirServer(port=port)
    try:
        now[0] = 10.0
        assert push.run_once() == 1
        assert push.run_once() == 0
    finally:
        server.close()
    assert [r["state"] for r in index.outbox(channel="fhir")] == [WITHDRAWN, SENT]
    (report,) = [r for p, r in server.resources.items() if "/DiagnosticReport/" in p]
    assert report["conclusionCode"][0]["coding"][0]["code"] == "RT101"  # urgent
    flags = [
        r["valueCodeableConcept"]["coding"][0]["code"]
        for r in server.resources.values()
        if r["code"]["coding"][0]["code"] == "RT001"
    ]
    assert flags == ["RT101"]  # the routine decision never reached the server
