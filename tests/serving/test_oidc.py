"""Single sign-on against a real OpenID Provider (oidc-provider from npm, on loopback): the
authorization code flow with PKCE through `workspace.oidc`, and each refusal (bad state, no
sign-in in progress, another client's ID token, an expired one, a forged signature, a wrong
nonce, an unmapped role, a local account's name, a disabled user). The Chromium test is in
test_oidc_browser.py."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from core.errors import SignInError
from store.index import Index
from tests.serving.oidc_provider import Provider, run_provider, settings, sign_in_at_provider
from tests.serving.workspace_helpers import PASSWORD, client
from workspace.accounts import Accounts
from workspace.oidc import OidcClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    with run_provider(tmp_path_factory.mktemp("oidc")) as p:
        yield p


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = Index(f"sqlite:///{tmp_path / 'index.db'}")
    yield idx
    idx.close()


def app(index: Index, provider: Provider) -> TestClient:
    return client(index, oidc=settings(provider))


def callback_path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def start(c: TestClient) -> str:
    r = c.get("/oidc/login", follow_redirects=False)
    assert r.status_code == 303
    return r.headers["location"]


def test_sign_in_opens_a_session_with_the_mapped_role(index: Index, provider: Provider) -> None:
    c = app(index, provider)
    assert c.get("/api/login/options").json() == {
        "oidc": {"name": "Hospital SSO", "url": "/oidc/login"}
    }
    authorize = start(c)
    query = parse_qs(urlsplit(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and query["client_id"] == ["radtriage"]
    assert query["redirect_uri"] == [provider.redirect_url]  # from settings, not the Host
    r = c.get(callback_path(sign_in_at_provider(authorize, "rita")))
    assert r.status_code == 200, r.text
    assert 'url=/worklist"' in r.text
    me = c.get("/api/session").json()
    assert (me["name"], me["role"]) == ("rita", "radiologist")
    assert c.get("/api/worklist").status_code == 200  # a clinical role, as mapped
    # the SSO user has a row (no password opens it), the sign-in is audited
    assert Accounts(index.engine).check_password("rita", "any password") is None
    events = c.app.state.audit.events(0, 10, None)[1]  # type: ignore[attr-defined]
    login = next(e for e in events if e["action"] == "login")
    assert login["user"] == "rita" and login["detail"]["via"] == "oidc"

    # sign-out ends the session here and hands the browser the provider's end-session URL
    csrf = me["csrf_token"]
    out = c.post("/api/logout", headers={"X-CSRF-Token": csrf}).json()
    end = urlsplit(out["end_session_url"])
    assert f"{end.scheme}://{end.netloc}{end.path}".endswith("/session/end")
    params = parse_qs(end.query)
    assert params["post_logout_redirect_uri"] == [provider.app_url + "/login"]
    assert params["id_token_hint"][0].count(".") == 2
    assert c.get("/api/session").status_code == 401


def test_role_follows_the_provider_and_first_mapping_wins(index: Index, provider: Provider) -> None:
    c = app(index, provider)
    c.get(callback_path(sign_in_at_provider(start(c), "adam")))
    assert c.get("/api/session").json()["role"] == "admin"
    assert c.get("/api/audit").status_code == 200


def test_bad_state_is_refused(index: Index, provider: Provider) -> None:
    c = app(index, provider)
    back = callback_path(sign_in_at_provider(start(c), "rita"))
    tampered = back.replace("state=", "state=x")
    r = c.get(tampered)
    assert r.status_code == 400 and "state" in r.text
    assert "radtriage_session" not in c.cookies
    assert c.get("/api/session").status_code == 401
    # the pending sign-in is spent: the genuine callback cannot be replayed afterwards
    assert c.get(back).status_code == 400


def test_callback_without_a_sign_in_in_this_browser_is_refused(
    index: Index, provider: Provider
) -> None:
    victim, attacker = app(index, provider), app(index, provider)
    back = callback_path(sign_in_at_provider(start(attacker), "rita"))
    r = victim.get(back)  # login CSRF: someone else's callback URL
    assert r.status_code == 400
    assert victim.get("/api/session").status_code == 401


def test_unmapped_role_is_refused_and_creates_no_user(index: Index, provider: Provider) -> None:
    c = app(index, provider)
    r = c.get(callback_path(sign_in_at_provider(start(c), "nora")))
    assert r.status_code == 403 and "no role" in r.text
    assert c.get("/api/session").status_code == 401
    assert all(u["name"] != "nora" for u in Accounts(index.engine).list_users())
    events = c.app.state.audit.events(0, 10, None)[1]  # type: ignore[attr-defined]
    assert events[0]["action"] == "login_failed"


def test_local_accounts_stay_and_are_never_taken_over(index: Index, provider: Provider) -> None:
    Accounts(index.engine).add_user("rita", "admin", PASSWORD)  # a local (break-glass) rita
    c = app(index, provider)
    r = c.get(callback_path(sign_in_at_provider(start(c), "rita")))
    assert r.status_code == 403 and "local account" in r.text
    assert c.get("/api/session").status_code == 401
    r = c.post("/api/login", json={"name": "rita", "password": PASSWORD})
    assert r.status_code == 200 and r.json()["role"] == "admin"


def test_a_disabled_sso_user_is_refused(index: Index, provider: Provider) -> None:
    c = app(index, provider)
    c.get(callback_path(sign_in_at_provider(start(c), "rita")))
    assert c.get("/api/session").status_code == 200
    Accounts(index.engine).disable("rita")
    assert c.get("/api/session").status_code == 401  # the session ended at once
    r = c.get(callback_path(sign_in_at_provider(start(c), "rita")))
    assert r.status_code == 403 and "disabled" in r.text


def _id_token(provider: Provider, client_id: str) -> tuple[str, str]:
    """A real ID token the provider issued to `client_id`, and the nonce it carries."""
    rp = OidcClient(settings(provider, client_id=client_id))
    authorize, pending = rp.begin()
    code = parse_qs(urlsplit(sign_in_at_provider(authorize, "rita")).query)["code"][0]
    return rp.exchange(code, pending), pending.nonce


def test_another_clients_id_token_is_refused(provider: Provider) -> None:
    token, nonce = _id_token(provider, "other-app")
    assert OidcClient(settings(provider, client_id="other-app")).validate(token, nonce)["aud"]
    with pytest.raises(SignInError, match=r"(?i)audience"):
        OidcClient(settings(provider)).validate(token, nonce)


def test_expired_id_token_is_refused(provider: Provider) -> None:
    token, nonce = _id_token(provider, "short-lived")  # valid 1 s
    time.sleep(2.5)
    rp = OidcClient(settings(provider, client_id="short-lived", clock_skew_s=0))
    with pytest.raises(SignInError, match=r"(?i)expired"):
        rp.validate(token, nonce)


def test_forged_signature_and_wrong_nonce_are_refused(provider: Provider) -> None:
    token, nonce = _id_token(provider, "radtriage")
    rp = OidcClient(settings(provider))
    assert rp.validate(token, nonce)["preferred_username"] == "rita"
    with pytest.raises(SignInError, match="nonce"):
        rp.validate(token, nonce + "x")
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["radtriage-admin"]  # a raised privilege, the signature kept
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(SignInError, match=r"[Ss]ignature"):
        rp.validate(f"{header}.{forged}.{signature}", nonce)
    unsigned = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    with pytest.raises(SignInError):
        rp.validate(f"{unsigned}.{payload}.", nonce)
