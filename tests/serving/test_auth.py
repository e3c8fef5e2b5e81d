"""Access control over every route: who may call what (role matrix), 401 without credentials
and no patient data in its body, pages redirect to /login, CSRF on session requests, cookie
flags, disabled users. A real SQLite index; the app in-process (TestClient)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from core.domain import LesionResult, Priority
from store.index import Index
from tests.serving.workspace_helpers import PASSWORD, USERS, add_study, add_users, client, login
from workspace.accounts import Accounts

UID = "1.2.826.0.1.3680043.10.1.1"
PATIENT_NAME = "Secret^Patient"
PATIENT_ID = "MRN-SECRET-42"
OPEN = "open"
ANY = ("radiologist", "admin", "ml_engineer")
CLINICAL = ("radiologist", "admin")
INTEGRATIONS = ("radiologist", "admin", "integrator")
RADIOLOGIST = ("radiologist",)
LESION = LesionResult(likelihood=0.8, volume_ml=0.5, centroid_mm=(0, 0, 0), category="ai")

#: (method, path template) -> who may call it. Every route of the app must be listed here.
POLICY: dict[tuple[str, str], object] = {
    ("GET", "/healthz"): OPEN,
    ("GET", "/readyz"): OPEN,
    ("GET", "/metrics"): OPEN,
    ("GET", "/static/{name}"): OPEN,
    ("GET", "/login"): OPEN,
    ("POST", "/api/login"): OPEN,
    ("GET", "/"): OPEN,  # a redirect to /worklist
    ("GET", "/openapi.json"): ANY,  # behind login; /docs and /redoc (a CDN) are off
    ("GET", "/api/session"): ANY,
    ("POST", "/api/logout"): ANY,
    ("GET", "/api/models"): ANY,
    ("GET", "/api/priorities"): ANY,
    ("GET", "/api/studies/{study_instance_uid}/assessment"): ANY,
    ("GET", "/api/outbox"): ("admin", "ml_engineer"),
    ("GET", "/api/audit"): ("admin",),
    ("GET", "/api/worklist"): CLINICAL,
    ("GET", "/api/worklist/pending"): CLINICAL,
    ("GET", "/api/studies/{study_instance_uid}"): CLINICAL,
    ("GET", "/api/studies/{study_instance_uid}/images"): CLINICAL,
    ("GET", "/api/studies/{study_instance_uid}/images/{role}/{z}.png"): CLINICAL,
    ("GET", "/api/studies/{study_instance_uid}/sr"): CLINICAL,
    ("GET", "/api/studies/{study_instance_uid}/seg"): CLINICAL,
    ("GET", "/api/studies/{study_instance_uid}/decisions"): CLINICAL,
    ("GET", "/worklist"): CLINICAL,
    ("GET", "/studies/{study_instance_uid}"): CLINICAL,
    ("POST", "/api/studies/{study_instance_uid}/acknowledge"): RADIOLOGIST,
    ("POST", "/api/studies/{study_instance_uid}/reported"): RADIOLOGIST,
    ("POST", "/api/studies/{study_instance_uid}/override"): RADIOLOGIST,
    ("POST", "/api/studies/{study_instance_uid}/findings/{finding_index}"): RADIOLOGIST,
    ("POST", "/api/studies/{study_instance_uid}/pirads"): RADIOLOGIST,
    ("POST", "/api/studies/{study_instance_uid}/biopsy"): RADIOLOGIST,
}
#: Routes other modules mount on the app (ris.fhir, dicom_node.dicomweb) when present; the
#: matrix checks their access control too, not their request bodies.
MOUNTED: dict[tuple[str, str], object] = {
    ("POST", "/fhir/ServiceRequest"): INTEGRATIONS,
    ("GET", "/fhir/DiagnosticReport"): INTEGRATIONS,
    ("GET", "/fhir/Observation"): INTEGRATIONS,
    ("GET", "/dicomweb/studies"): INTEGRATIONS,
    ("POST", "/dicomweb/studies"): ("integrator", "admin"),  # only with [http] stow = true
    ("GET", "/dicomweb/studies/{study_instance_uid}/series"): INTEGRATIONS,
}
PAGES = {"/worklist", "/studies/{study_instance_uid}"}
BODIES = {
    "/api/login": {"name": "rita", "password": PASSWORD},
    "/api/studies/{study_instance_uid}/override": {"priority": "urgent", "reason": "PSA rising"},
    "/api/studies/{study_instance_uid}/findings/{finding_index}": {"decision": "reject"},
    "/api/studies/{study_instance_uid}/pirads": {"pirads": 4},
    "/api/studies/{study_instance_uid}/biopsy": {"isup_grade_group": 2, "biopsy_date": "20261120"},
}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[TestClient, dict[str, str], Index]:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    add_study(
        index,
        UID,
        priority=Priority.URGENT,
        likelihood=0.9,
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
        lesions=(LESION,),
    )
    tokens = add_users(index)
    return client(index), tokens, index


def _url(template: str) -> str:
    return (
        template.replace("{study_instance_uid}", UID)
        .replace("{finding_index}", "0")
        .replace("{role}", "t2w")
        .replace("{z}", "0")
        .replace("{name}", "style.css")
    )


def _routes(c: TestClient) -> list[tuple[str, str]]:
    out = []
    for route in c.app.routes:  # type: ignore[attr-defined]
        methods = route.methods if isinstance(route, APIRoute) else getattr(route, "methods", None)
        for method in sorted(methods or ()):
            if method != "HEAD":
                out.append((method, route.path))
    return out


def test_every_route_has_a_policy(setup: tuple[TestClient, dict[str, str], Index]) -> None:
    c, _, _ = setup
    routes = set(_routes(c))
    assert routes - set(POLICY) - set(MOUNTED) == set(), "classify new routes in POLICY"
    assert set(POLICY) <= routes


@pytest.mark.parametrize("role", ["radiologist", "admin", "ml_engineer", "integrator", None])
def test_role_matrix(role: str | None, setup: tuple[TestClient, dict[str, str], Index]) -> None:
    c, tokens, _ = setup
    headers = {"Authorization": f"Bearer {tokens[role]}"} if role else {}
    mounted = {k: v for k, v in MOUNTED.items() if k in set(_routes(c))}
    for (method, template), allowed in {**POLICY, **mounted}.items():
        if template == "/api/logout":
            continue  # would end nothing for a token, checked in the session tests
        url = _url(template)
        caller = TestClient(c.app) if template == "/api/login" else c  # keeps c signed out
        r = caller.request(
            method, url, headers=headers, json=BODIES.get(template), follow_redirects=False
        )
        where = f"{role} {method} {url}: {r.status_code} {r.text[:200]}"
        if allowed == OPEN:
            assert r.status_code not in (401, 403), where
        elif role is None:
            if template in PAGES:
                assert r.status_code == 303 and r.headers["location"] == "/login", where
            else:
                assert r.status_code == 401, where
                assert PATIENT_NAME not in r.text and PATIENT_ID not in r.text, where
                assert r.headers["www-authenticate"] == "Bearer", where
        elif role in allowed:  # type: ignore[operator]
            refused = (401, 403) if (method, template) in mounted else (401, 403, 422)
            assert r.status_code not in refused, where
        else:
            assert r.status_code == 403, where
            assert PATIENT_NAME not in r.text and PATIENT_ID not in r.text, where


def test_session_cookie_flags_and_csrf(setup: tuple[TestClient, dict[str, str], Index]) -> None:
    c, tokens, _ = setup
    r = c.post("/api/login", json={"name": USERS["radiologist"], "password": PASSWORD})
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    csrf = r.json()["csrf_token"]
    url = f"/api/studies/{UID}/acknowledge"
    assert c.post(url).status_code == 403  # no token
    assert c.post(url, headers={"X-CSRF-Token": "x" * 43}).status_code == 403  # wrong token
    other = TestClient(c.app)
    other_csrf = login(other, "radiologist")
    assert c.post(url, headers={"X-CSRF-Token": other_csrf}).status_code == 403  # another session's
    assert c.post(url, headers={"X-CSRF-Token": csrf}).status_code == 200
    assert c.get("/api/session").json()["csrf_token"] == csrf
    # bearer requests carry no ambient credential: no CSRF token needed
    bearer = TestClient(c.app)
    r = bearer.post(url, headers={"Authorization": f"Bearer {tokens['radiologist']}"})
    assert r.status_code == 200
    # logout ends the session on the server, not only in the browser
    session_id = c.cookies.get("radtriage_session")
    assert c.post("/api/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
    stale = TestClient(c.app, cookies={"radtriage_session": session_id})
    assert stale.get("/api/worklist").status_code == 401


def test_https_sets_secure_cookie(setup: tuple[TestClient, dict[str, str], Index]) -> None:
    c, _, _ = setup
    https = TestClient(c.app, base_url="https://testserver")
    r = https.post("/api/login", json={"name": USERS["admin"], "password": PASSWORD})
    assert "secure" in r.headers["set-cookie"].lower()


def test_wrong_password_and_disabled_user(setup: tuple[TestClient, dict[str, str], Index]) -> None:
    c, tokens, index = setup
    assert c.post("/api/login", json={"name": "rita", "password": "nope"}).status_code == 401
    assert c.post("/api/login", json={"name": "nobody", "password": "nope"}).status_code == 401
    login(c, "radiologist")
    Accounts(index.engine).disable("rita")
    assert c.get("/api/worklist").status_code == 401  # the session ended
    headers = {"Authorization": f"Bearer {tokens['radiologist']}"}
    assert c.get("/api/worklist", headers=headers).status_code == 401  # the token too
    assert c.post("/api/login", json={"name": "rita", "password": PASSWORD}).status_code == 401
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    actions = [e["action"] for e in c.get("/api/audit", headers=admin).json()["events"]]
    assert actions.count("login_failed") == 3 and "login" in actions


def test_passwords_and_tokens_are_not_stored(
    setup: tuple[TestClient, dict[str, str], Index],
) -> None:
    _, tokens, index = setup
    with index.engine.connect() as conn:
        dump = "\n".join(
            str(row)
            for t in ("users", "api_tokens")
            for row in conn.exec_driver_sql(f"SELECT * FROM {t}")
        )
    assert PASSWORD not in dump
    assert all(token not in dump for token in tokens.values())
    assert "$argon2id$" in dump


def test_pages_are_self_contained_and_script_free() -> None:
    """No external URLs (closed hospital networks) and no inline script or handler: the CSP
    (script-src 'self') would block them, and hostile values could not ride on them."""
    import re

    from workspace.app import WEB_DIR

    for page in WEB_DIR.glob("*.html"):
        html = page.read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), page.name
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), page.name
        assert not re.search(r"\son[a-z]+\s*=", html), page.name
    for script in WEB_DIR.glob("*.js"):
        assert "innerHTML" not in script.read_text(encoding="utf-8"), script.name
    css = (WEB_DIR / "style.css").read_text(encoding="utf-8")
    assert not re.search(r"""url\(\s*["']?(https?:)?//|@import""", css)


def test_pages_send_a_strict_csp(setup: tuple[TestClient, dict[str, str], Index]) -> None:
    c, _, _ = setup
    r = c.get("/login")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"


def test_https_option(tmp_path: Path) -> None:
    """[http] certfile + keyfile: uvicorn serves TLS (as `serve` configures it) and the session
    cookie comes back Secure; one without the other is a configuration error."""
    import datetime
    import ipaddress
    import ssl
    import threading
    import time

    import httpx
    import uvicorn
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from core.errors import ConfigError
    from core.settings import load_settings
    from tests.conftest import free_port

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    config = tmp_path / "site.toml"
    config.write_text(f'[http]\ncertfile = "{certfile}"\n')
    with pytest.raises(ConfigError, match="certfile and keyfile"):
        load_settings(config, environ={})
    config.write_text(f'[http]\ncertfile = "{certfile}"\nkeyfile = "{keyfile}"\n')
    h = load_settings(config, environ={}).http

    index = Index(f"sqlite:///{tmp_path}/index.db")
    add_users(index)
    port = free_port()
    trust = ssl.create_default_context(cafile=str(certfile))
    app = client(index).app
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            ssl_certfile=h.certfile,
            ssl_keyfile=h.keyfile,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trust) as https:
            for _ in range(100):
                try:
                    https.get("/healthz")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            r = https.post("/api/login", json={"name": "adam", "password": PASSWORD})
            assert r.status_code == 200
            assert "secure" in r.headers["set-cookie"].lower()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_repeated_failed_sign_ins_are_throttled_per_address(
    setup: tuple[TestClient, dict[str, str], Index],
) -> None:
    c, _, _ = setup  # more in tests/serving/test_login_throttle.py
    for _ in range(5):
        assert c.post("/api/login", json={"name": "rita", "password": "guess"}).status_code == 401
    right = {"name": "rita", "password": PASSWORD}
    assert c.post("/api/login", json=right).status_code == 429  # this address must wait
