"""The worklist API over a real index: every study reachable by pagination (no cap), order and
filters applied in SQL, the referral floor and radiologist overrides in the order."""

from __future__ import annotations

import random
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from core.domain import Priority, StudyStatus
from store.index import Index
from tests.dicom_node.pg import postgresql_server  # noqa: F401 - fixture
from tests.serving.workspace_helpers import add_study, add_users, client

N = 620
PRIORITIES = [Priority.URGENT, Priority.NOT_ANALYSED, Priority.SOON, Priority.ROUTINE]


@pytest.fixture(scope="module")
def worklist(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, Index, dict[str, str]]:
    index = Index(f"sqlite:///{tmp_path_factory.mktemp('wl')}/index.db")
    rng = random.Random(7)
    now = time.time()
    for i in range(N):
        priority = PRIORITIES[i % 4]
        add_study(
            index,
            f"1.2.3.{i}",
            priority=priority,
            likelihood=None if priority is Priority.NOT_ANALYSED else round(rng.random(), 3),
            patient_id=f"P{i:04d}",
            patient_name=f"Patient{i:04d}^Test",
            accession=f"ACC{i:05d}",
            study_date=f"2026{1 + i % 12:02d}{1 + i % 28:02d}",
            days_waited=rng.randrange(0, 40),
            received_at=now - i,
        )
    # special rows
    add_study(index, "9.1", priority=Priority.NOT_ANALYSED, likelihood=None, referral="urgent",
              patient_id="PX1", patient_name="Floor^Stat", days_waited=1)  # fmt: skip
    add_study(index, "9.2", priority=None, status=StudyStatus.ANALYSING, patient_id="PX2",
              patient_name="Awaiting^AI")  # fmt: skip
    add_study(index, "9.3", priority=Priority.ROUTINE, likelihood=0.01, patient_id="PX3",
              patient_name="100%_off^Literal", days_waited=2)  # fmt: skip
    tokens = add_users(index)
    c = client(index)
    c.headers["Authorization"] = f"Bearer {tokens['radiologist']}"
    return c, index, tokens


def _all(c: TestClient, page: int = 100, **params: object) -> tuple[int, list[dict]]:
    rows: list[dict] = []
    offset = 0
    while True:
        body = c.get("/api/worklist", params={**params, "offset": offset, "limit": page}).json()
        rows += body["rows"]
        offset += page
        if offset >= body["total"]:
            return body["total"], rows


def test_pagination_reaches_every_study_exactly_once(worklist: tuple) -> None:
    c, _, _ = worklist
    total, rows = _all(c, page=100)
    uids = [r["study_instance_uid"] for r in rows]
    assert total == N + 3 == len(uids) == len(set(uids))
    ranks = [r["priority_rank"] for r in rows]
    assert ranks == sorted(ranks)
    big = c.get("/api/worklist", params={"limit": 500}).json()
    assert big["total"] == N + 3 and len(big["rows"]) == 500
    assert c.get("/api/worklist", params={"limit": 501}).status_code == 422
    assert c.get("/api/worklist", params={"sort": "1; DROP TABLE studies"}).status_code == 422


def test_order_is_priority_then_longest_waiting(worklist: tuple) -> None:
    c, _, _ = worklist
    _, rows = _all(c, page=250)
    assert rows[0]["priority"] == "urgent"
    floor = next(r for r in rows if r["study_instance_uid"] == "9.1")
    assert floor["priority"] == "not_analysed" and floor["priority_rank"] == Priority.URGENT.rank
    pending = next(r for r in rows if r["study_instance_uid"] == "9.2")
    assert pending["priority"] == "pending"
    assert pending["priority_rank"] == Priority.NOT_ANALYSED.rank  # unknown risk never sinks
    urgent = [r for r in rows if r["priority_rank"] == 0 and r["days_waited"] is not None]
    waited = [r["days_waited"] for r in urgent]
    assert waited == sorted(waited, reverse=True)
    # the patient identifiers the page needs are there
    first = rows[0]
    assert first["patient_name"].startswith("Patient") and first["patient_id"].startswith("P")
    assert first["accession_number"].startswith("ACC") and first["gland_volume_ml"] == 35.0


def test_sort_keys_in_sql(worklist: tuple) -> None:
    c, index, _ = worklist
    statements: list[str] = []

    def grab(conn, cursor, statement, params, context, executemany) -> None:
        statements.append(statement)

    event.listen(index.engine, "before_cursor_execute", grab)
    try:
        body = c.get("/api/worklist", params={"sort": "likelihood", "order": "desc", "limit": 50})
    finally:
        event.remove(index.engine, "before_cursor_execute", grab)
    rows = body.json()["rows"]
    likelihoods = [r["case_likelihood"] for r in rows]
    assert likelihoods == sorted(likelihoods, reverse=True) and len(rows) == 50
    page_sql = next(s for s in statements if "ORDER BY" in s)
    assert "LIMIT" in page_sql and "OFFSET" in page_sql and "case_likelihood DESC" in page_sql
    _, by_name = _all(c, page=500, sort="patient_name")
    names = [r["patient_name"] for r in by_name]
    assert names == sorted(names)
    _, by_wait = _all(c, page=500, sort="waited")
    days = [r["days_waited"] for r in by_wait if r["days_waited"] is not None]
    assert days == sorted(days)
    _, by_wait = _all(c, page=500, sort="waited", order="desc")
    days = [r["days_waited"] for r in by_wait if r["days_waited"] is not None]
    assert days == sorted(days, reverse=True) and days[0] >= 39


def test_filters(worklist: tuple) -> None:
    c, _, _ = worklist
    counts = c.get("/api/worklist", params={"limit": 1}).json()["counts"]
    assert counts == {"urgent": N // 4, "not_analysed": N // 4 + 1, "soon": N // 4,
                      "routine": N // 4 + 1, "pending": 1}  # fmt: skip
    total, rows = _all(c, priority="urgent")
    assert total == N // 4 and {r["priority"] for r in rows} == {"urgent"}
    total, rows = _all(c, priority=["soon", "routine"])
    assert total == N // 2 + 1 and {r["priority"] for r in rows} == {"soon", "routine"}
    total, rows = _all(c, status="analysing")
    assert [r["study_instance_uid"] for r in rows] == ["9.2"]
    total, rows = _all(c, date_from="20260301", date_to="20260331")
    assert total > 0 and all("20260301" <= r["study_date"] <= "20260331" for r in rows)
    total, rows = _all(c, q="patient0042")  # case-insensitive substring of the name
    assert [r["patient_id"] for r in rows] == ["P0042"]
    total, rows = _all(c, q="ACC00007")
    assert [r["patient_id"] for r in rows] == ["P0007"]
    total, rows = _all(c, q="100%_")  # LIKE wildcards are literal
    assert [r["study_instance_uid"] for r in rows] == ["9.3"]
    assert c.get("/api/worklist", params={"date_from": "2026-03-01"}).status_code == 422


def test_override_moves_a_study_up(worklist: tuple) -> None:
    c, _, _ = worklist
    _, before = _all(c, page=500)
    last = before[-1]
    assert last["priority"] == "routine"
    r = c.post(
        f"/api/studies/{last['study_instance_uid']}/override",
        json={"priority": "urgent", "reason": "haematuria, PSA 30"},
    )
    assert r.status_code == 200
    total, urgent = _all(c, priority="urgent")
    moved = next(x for x in urgent if x["study_instance_uid"] == last["study_instance_uid"])
    assert moved["overridden_by"] == "rita" and moved["ai_priority"] == "routine"
    assert moved["override_reason"] == "haematuria, PSA 30" and moved["priority_rank"] == 0
    assert total == N // 4 + 1
    assert (
        c.post(
            f"/api/studies/{last['study_instance_uid']}/override",
            json={"priority": "soon", "reason": ""},
        ).status_code
        == 422
    )  # a reason is required


@pytest.mark.integration
def test_the_same_worklist_and_audit_on_postgresql(postgresql_url: str) -> None:
    """Migration 0005, the worklist SQL (NULLS LAST, LIKE escapes, CASE ranks), accounts and
    the audit chain on a real PostgreSQL server."""
    from workspace.audit import AuditTrail

    index = Index(postgresql_url)
    for i in range(30):
        add_study(index, f"2.25.{i}", priority=PRIORITIES[i % 4], patient_id=f"Q{i}",
                  likelihood=None if i % 4 == 1 else i / 30, patient_name=f"Pg{i:02d}^X",
                  days_waited=i)  # fmt: skip
    tokens = add_users(index)
    c = client(index)
    c.headers["Authorization"] = f"Bearer {tokens['radiologist']}"
    total, rows = _all(c, page=7)
    assert total == 30 and len({r["study_instance_uid"] for r in rows}) == 30
    ranks = [r["priority_rank"] for r in rows]
    assert ranks == sorted(ranks)
    _, by_likelihood = _all(c, page=50, sort="likelihood", order="desc")
    values = [r["case_likelihood"] for r in by_likelihood]
    assert values[-1] is None and values[0] == max(v for v in values if v is not None)
    assert _all(c, q="pg07")[1][0]["patient_id"] == "Q7"
    assert (
        c.post(
            "/api/studies/2.25.3/override", json={"priority": "urgent", "reason": "x"}
        ).status_code
        == 200
    )
    assert AuditTrail(index.engine).verify().ok
