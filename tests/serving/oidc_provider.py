"""A real OpenID Provider on loopback for the single sign-on tests: panva/oidc-provider (npm,
OpenID Certified) run by tests/oidc/provider.mjs, and a scripted user agent that signs a test
account in through its login form (the flow a browser makes, over HTTP)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest

from tests.conftest import IN_CI, REPO, free_port

PROVIDER_DIR = REPO / "tests" / "oidc"
ROLE_MAP = {
    "radtriage-radiologist": "radiologist",
    "radtriage-admin": "admin",
    "radtriage-ml": "ml_engineer",
}
ACCOUNTS = {
    "rita": {"roles": ["radtriage-radiologist", "ward-staff"]},
    "adam": {"roles": ["radtriage-admin"]},
    "nora": {"roles": ["ward-staff"]},  # holds no role radtriage maps
}
SECRET = "test-client-secret"  # a test provider's static client


@dataclass(frozen=True)
class Provider:
    issuer: str
    app_url: str  # where the relying party under test is served (its redirect URL's origin)

    @property
    def redirect_url(self) -> str:
        return self.app_url + "/oidc/callback"


def provider_ready() -> None:
    """Skip (fail in CI) when Node.js or the provider package is not installed."""
    if shutil.which("node") is None:
        message = "node not installed (apt: nodejs; see .ci/run)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        message = f"run `npm ci` in {PROVIDER_DIR} (.ci/run does)"
        pytest.fail(message) if IN_CI else pytest.skip(message)


@contextmanager
def run_provider(work: Path) -> Iterator[Provider]:
    """The provider on localhost (a different site from the app on 127.0.0.1, as a hospital's
    identity provider is), with clients "radtriage", "other-app" (another audience) and
    "short-lived" (ID tokens valid 1 s), all redirecting to the app's callback."""
    provider_ready()
    port, app_port = free_port(), free_port()
    app_url = f"http://127.0.0.1:{app_port}"
    issuer = f"http://localhost:{port}"
    client = {
        "client_secret": SECRET,
        "redirect_uris": [app_url + "/oidc/callback"],
        "post_logout_redirect_uris": [app_url + "/login"],
    }
    config = {
        "issuer": issuer,
        "host": "127.0.0.1",
        "port": port,
        "clients": [
            {"client_id": name, **client} for name in ("radtriage", "other-app", "short-lived")
        ],
        "accounts": ACCOUNTS,
        "id_token_ttl_s": {"short-lived": 1},
    }
    path = work / "provider.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    log = work / "provider.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["node", str(PROVIDER_DIR / "provider.mjs"), str(path)],
            cwd=PROVIDER_DIR,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "listening" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"the provider exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"the provider did not start: {log.read_text()}"
            time.sleep(0.1)
        yield Provider(issuer, app_url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def sign_in_at_provider(authorize_url: str, login: str) -> str:
    """Follow the authorization request through the provider's login form as `login`;
    returns the URL the provider sends the browser back to (the app's callback)."""
    with httpx.Client(timeout=10) as ua:
        url = authorize_url
        for _ in range(10):
            r = ua.get(url)
            if r.status_code in (302, 303):
                url = urljoin(url, r.headers["location"])
                if "/oidc/callback" in url:
                    return url
                continue
            form = re.search(r'<form[^>]*action="([^"]+)"', r.text)
            assert r.status_code == 200 and form, f"unexpected provider page: {r.text[:300]}"
            action = urljoin(url, form.group(1).replace("&amp;", "&"))
            posted = ua.post(
                action, data={"prompt": "login", "login": login, "password": "any password"}
            )
            assert posted.status_code in (302, 303), posted.text[:300]
            url = urljoin(action, posted.headers["location"])
            if "/oidc/callback" in url:
                return url
        raise AssertionError("the provider never redirected back to the app")


def settings(provider: Provider, **overrides: Any) -> Any:
    from core.settings import OidcSettings

    values: dict[str, Any] = {
        "issuer": provider.issuer,
        "client_id": "radtriage",
        "client_secret": SECRET,
        "redirect_url": provider.redirect_url,
        "display_name": "Hospital SSO",
        "role_map": ROLE_MAP,
    }
    return OidcSettings(**(values | overrides))
