"""Building blocks for the workspace tests: a real index with studies, users of each role,
and a FastAPI TestClient over `workspace.app` (no server process)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import insert, select, update

from cli.composition import build_http_app
from core.domain import LesionResult, ModelInfo, Priority, StudyStatus, TriageResult
from store.index import Index, Patient, Study
from store.results import update_result_columns
from workspace.accounts import Accounts
from workspace.app import ApiContext
from workspace.metrics import Metrics

PASSWORD = "correct horse battery"
USERS = {"radiologist": "rita", "admin": "adam", "ml_engineer": "mel", "integrator": "ian"}
HOSTILE_NAMES = (
    "<script>window.__xss = 1</script>^Eve",
    '<img src=x onerror="window.__xss = 2">^Mallory',
    "\u0417\u0430\u0445\u0430\u0440\u043e\u0432^\u0418\u0432\u0430\u043d=\u5c71\u7530^\u592a\u90ce",
    "A" * 300 + "^" + "\u202e\u0645\u0631\u062d\u0628\u0627",
)


def add_study(
    index: Index,
    uid: str,
    *,
    priority: Priority | None = Priority.ROUTINE,
    likelihood: float | None = 0.1,
    patient_id: str = "P-1",
    patient_name: str = "Doe^John",
    accession: str = "",
    study_date: str = "20261101",
    referral: str = "routine",
    days_waited: int | None = None,
    status: StudyStatus = StudyStatus.REPORTED,
    received_at: float | None = None,
    lesions: tuple[LesionResult, ...] = (),
    documents: list[Path] | None = None,
) -> None:
    """One study row (and its patient) as the node writes them, with `priority` None meaning
    'no result yet'."""
    now = received_at if received_at is not None else time.time()
    with index.write() as s:
        pid = s.scalar(select(Patient.id).where(Patient.patient_id == patient_id))
        if pid is None:
            pid = s.execute(
                insert(Patient).values(patient_id=patient_id, patient_name=patient_name)
            ).inserted_primary_key[0]
        result = None
        if priority is not None:
            result = TriageResult(
                study_instance_uid=uid,
                status=status,
                priority=priority,
                case_likelihood=likelihood,
                lesions=lesions,
                gland_volume_ml=35.0 if likelihood is not None else None,
                model=ModelInfo(name="det", version="1", sha256="0" * 64),
                reason=None if likelihood is not None else {"code": "missing_t2w", "message": "x"},
                days_waited=days_waited,
                referral_urgency=referral,
                disclaimer="NOT FOR CLINICAL USE: demonstration model trained on synthetic data.",
            )
        sid = s.execute(
            insert(Study).values(
                study_instance_uid=uid,
                patient_fk=pid,
                accession_number=accession,
                study_date=study_date,
                referral_urgency=referral,
                urgency_rank=0,
                status=status.value,
                status_changed_at=now,
                first_received_at=now,
                last_received_at=now,
                instance_count=0,
                checked_instance_count=0,
                analysed_instance_count=0,
                attempts=0,
                reported_at=now if result else None,
                result_json=json.dumps(result.to_json_dict()) if result else None,
                documents_json=json.dumps([str(p) for p in documents or []]),
            )
        ).inserted_primary_key[0]
        if result is not None:
            update_result_columns(s, sid, result, now)


def set_patient_name(index: Index, patient_id: str, name: str) -> None:
    with index.write() as s:
        s.execute(update(Patient).where(Patient.patient_id == patient_id).values(patient_name=name))


def add_users(index: Index) -> dict[str, str]:
    """One user per role (name -> role as USERS), granted the index's site (if it has one),
    and a bearer token each: role -> token."""
    accounts = Accounts(index.engine, site_id=index.site_id)
    for role, name in USERS.items():
        accounts.add_user(name, role, PASSWORD)
    return {role: accounts.new_token(name) for role, name in USERS.items()}


def client(index: Index, **ctx: Any) -> TestClient:
    """The web app over `index`, with a waiting list that decides overrides at once (as
    `radtriage serve` wires it)."""
    if "redecide" not in ctx:
        ctx["redecide"] = _waiting_list(index).redecide
    return TestClient(build_http_app(ApiContext(index=index, metrics=Metrics(), **ctx)))


def _waiting_list(index: Index) -> Any:
    import tempfile

    from core.settings import Hl7Settings, TriageSettings
    from store.spool import Spool
    from triage.waiting_list import WaitingList

    return WaitingList(
        index,
        Spool(Path(tempfile.mkdtemp(prefix="radtriage-wl-"))),
        TriageSettings(),
        Hl7Settings(),
        thresholds=lambda model: None,
        dicom_destinations=[],
    )


def login(c: TestClient, role: str) -> str:
    """Sign `c` in as the user of `role`; returns the CSRF token."""
    r = c.post("/api/login", json={"name": USERS[role], "password": PASSWORD})
    assert r.status_code == 200, r.text
    return str(r.json()["csrf_token"])
