"""A radiologist's change and its audit event commit in one transaction: when the audit event
cannot be written the change is not kept, and a change that fails leaves no event."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import workspace.audit
from cli.composition import build_http_app
from store.index import Index
from tests.serving.workspace_helpers import add_study, add_users
from workspace.app import ApiContext
from workspace.metrics import Metrics

UID = "1.2.826.0.1.3680043.8.498.77"


@pytest.fixture
def node(tmp_path: Path) -> tuple[TestClient, dict[str, str], object]:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    add_study(index, UID)
    tokens = add_users(index)
    app = build_http_app(ApiContext(index=index, metrics=Metrics()))
    return TestClient(app, raise_server_exceptions=False), tokens, app.state.audit


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("acknowledge", None),
        ("reported", None),
        ("override", {"priority": "urgent", "reason": "PSA rising"}),
        ("pirads", {"pirads": 4}),
        ("biopsy", {"isup_grade_group": 2, "biopsy_date": "20261201"}),
    ],
)
def test_change_is_not_kept_without_its_audit_event(node, monkeypatch, path, body) -> None:
    c, tokens, audit = node
    auth = {"Authorization": f"Bearer {tokens['radiologist']}"}
    before = c.get(f"/api/studies/{UID}/assessment", headers=auth).json()

    def broken(prev: str, content: dict) -> str:
        raise RuntimeError("audit store unavailable")

    monkeypatch.setattr(workspace.audit, "chain_hash", broken)
    r = c.post(f"/api/studies/{UID}/{path}", json=body, headers=auth)
    assert r.status_code == 500
    monkeypatch.undo()
    assert c.get(f"/api/studies/{UID}/assessment", headers=auth).json() == before
    assert not [e for e in audit.events()[1] if e["action"] == path]
    # and with the audit trail working, both are kept
    r = c.post(f"/api/studies/{UID}/{path}", json=body, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["assessment"] != before
    (event,) = [e for e in audit.events()[1] if e["action"] == path]
    assert r.json()["audit_id"] == event["id"]


def test_failed_change_leaves_no_event(node, monkeypatch) -> None:
    c, tokens, audit = node
    auth = {"Authorization": f"Bearer {tokens['radiologist']}"}
    from workspace.assessments import Assessments

    def broken(self, *a, **kw) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(Assessments, "acknowledge", broken)
    assert c.post(f"/api/studies/{UID}/acknowledge", headers=auth).status_code == 500
    assert not [e for e in audit.events()[1] if e["action"] == "acknowledge"]


def test_reads_of_patient_data_are_audited(node) -> None:
    c, tokens, audit = node
    auth = {"Authorization": f"Bearer {tokens['radiologist']}"}
    assert c.get("/api/worklist?q=Doe", headers=auth).status_code == 200
    assert c.get(f"/api/studies/{UID}/assessment", headers=auth).status_code == 200
    assert c.get("/fhir/DiagnosticReport?subject=P-1", headers=auth).status_code == 200
    assert c.get(f"/api/studies/{UID}/sr", headers=auth).status_code == 404  # none: no event
    events = {e["action"]: e for e in audit.events()[1]}
    assert set(events) == {"worklist", "assessment", "fhir_search"}
    assert events["worklist"]["detail"] == {"query": "q=Doe"}
    assert events["assessment"]["study_instance_uid"] == UID
    assert events["fhir_search"]["user"] == "rita"
