"""HTTP surface hardening (issue 23, "smaller"): no anonymous API docs and no CDN, no exception
text or file paths in responses, FHIR links from ``[http] public_url`` never the Host header,
field lengths refused with 400 (not 500), bearer tokens expire and rotate, the integrator role.
A real SQLite index; the app in-process (TestClient)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from cli.composition import build_http_app
from core.priority import Priority
from core.settings import HttpSettings
from store.index import Index
from tests.serving.test_fhir import service_request
from tests.serving.workspace_helpers import USERS, add_study, add_users
from workspace.accounts import Accounts
from workspace.app import ApiContext
from workspace.metrics import Metrics
from workspace.tables import ApiToken

UID = "1.2.826.0.1.3680043.10.1.77"


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(f"sqlite:///{tmp_path}/index.db")


def _app(index: Index, **ctx: object) -> TestClient:
    return TestClient(build_http_app(ApiContext(index=index, metrics=Metrics(), **ctx)))  # type: ignore[arg-type]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_api_docs_only_behind_login_and_no_cdn(index: Index) -> None:
    tokens = add_users(index)
    c = _app(index)
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert c.get(path).status_code == 404  # the pages that load Swagger UI from a CDN
    assert c.get("/openapi.json").status_code == 401
    schema = c.get("/openapi.json", headers=_auth(tokens["radiologist"])).json()
    assert "/api/worklist" in schema["paths"] and "/fhir/ServiceRequest" in schema["paths"]
    assert "cdn" not in str(schema).lower()


def test_unreadable_images_409_carries_no_exception_text(index: Index) -> None:
    tokens = add_users(index)
    add_study(index, UID, priority=Priority.URGENT, documents=[Path("/srv/secret/x/sr.dcm")])
    c = _app(index)
    for url in (f"/api/studies/{UID}/images", f"/api/studies/{UID}/images/t2w/0.png"):
        r = c.get(url, headers=_auth(tokens["radiologist"]))
        assert r.status_code == 409, (url, r.status_code)
        text = r.text
        assert "cannot be shown" in text
        for leak in ("Error", "Exception", "/srv", "Traceback", "No such file"):
            assert leak not in text, (url, leak)


def test_outbox_shows_no_absolute_paths(index: Index) -> None:
    tokens = add_users(index)
    row = {
        "id": 1,
        "destination": "pacs",
        "path": "/var/lib/radtriage/outbox/1.2.3/sr.dcm",
        "state": "dead",
        "last_error": "cannot read /var/lib/radtriage/outbox/1.2.3/sr.dcm: refused",
    }
    c = _app(index, outbox=lambda state: [row] if state == "dead" else [])
    (shown,) = c.get("/api/outbox", headers=_auth(tokens["admin"])).json()
    assert "path" not in shown and "/var/lib" not in str(shown)
    assert shown["last_error"] == "cannot read <path>: refused"


def test_fhir_links_come_from_public_url_never_the_host_header(index: Index) -> None:
    tokens = add_users(index)
    for n in range(3):
        add_study(index, f"{UID}.{n}", priority=Priority.ROUTINE, accession=f"A{n}")
    hostile = {**_auth(tokens["radiologist"]), "Host": "evil.example"}
    url = "/fhir/DiagnosticReport?_count=1"
    page = _app(index).get(url, headers=hostile).json()
    urls = [link["url"] for link in page["link"]] + [e["fullUrl"] for e in page["entry"]]
    assert urls and not any("evil" in u or "://" in u for u in urls), urls  # relative
    public = HttpSettings(public_url="https://radtriage.hospital.example/")
    page = _app(index, http=public).get(url, headers=hostile).json()
    nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
    assert nxt == "https://radtriage.hospital.example/fhir/DiagnosticReport?_count=1&_offset=1"
    assert page["entry"][0]["fullUrl"].startswith("https://radtriage.hospital.example/fhir/")
    assert "evil" not in str(page)


def test_fhir_identifier_system_over_64_characters_is_400_not_500(index: Index) -> None:
    tokens = add_users(index)
    body = service_request("PLC1")
    body["identifier"][0]["system"] = "urn:" + "s" * 70
    r = _app(index).post("/fhir/ServiceRequest", json=body, headers=_auth(tokens["integrator"]))
    assert r.status_code == 400 and "longer than 64 characters" in r.text


def test_integrator_posts_orders_but_has_no_radiologist_rights(index: Index) -> None:
    tokens = add_users(index)
    add_study(index, UID, priority=Priority.URGENT)
    c, h = _app(index), _auth(tokens["integrator"])
    assert (
        c.post("/fhir/ServiceRequest", json=service_request("PLC9"), headers=h).status_code == 201
    )
    assert c.get("/fhir/DiagnosticReport", headers=h).status_code == 200
    for method, url in (
        ("GET", "/api/worklist"),
        ("GET", f"/api/studies/{UID}"),
        ("POST", f"/api/studies/{UID}/acknowledge"),
        ("GET", "/api/audit"),
    ):
        assert c.request(method, url, headers=h).status_code == 403, url


def test_bearer_tokens_expire_and_rotate(index: Index) -> None:
    tokens = add_users(index)
    c = _app(index, http=HttpSettings(token_ttl_days=1))
    old = tokens["radiologist"]
    assert c.get("/api/worklist", headers=_auth(old)).status_code == 200
    new = Accounts(index.engine).new_token(USERS["radiologist"])  # `users token rita`
    assert c.get("/api/worklist", headers=_auth(old)).status_code == 401  # revoked
    assert c.get("/api/worklist", headers=_auth(new)).status_code == 200
    with index.write() as s:  # issued two days ago
        s.execute(update(ApiToken).values(created_at=time.time() - 2 * 86400))
    assert c.get("/api/worklist", headers=_auth(new)).status_code == 401  # expired
