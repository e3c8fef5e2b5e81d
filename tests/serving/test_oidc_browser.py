"""Single sign-on in a real browser: Chromium (Debian's, driven by Playwright) signs in through
the OpenID Provider (oidc-provider from npm on localhost, a different site from the app on
127.0.0.1) and lands on the worklist with the role the provider's claim maps to; signing out
ends the provider's session too (its end-session page, then the app's login page; the next
single sign-on asks for the password again)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import uvicorn

from store.index import Index
from tests.serving.oidc_provider import Provider, run_provider, settings
from tests.serving.test_workspace_browser import CHROMIUM, CHROMIUM_ARGS
from tests.serving.workspace_helpers import add_study
from workspace.app import ApiContext
from workspace.metrics import Metrics

pytestmark = pytest.mark.integration


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Provider]:
    from cli.composition import build_http_app

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is not installed (apt install chromium)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser)")
    with run_provider(tmp_path) as provider:
        index = Index(f"sqlite:///{tmp_path / 'index.db'}")
        add_study(index, "1.2.826.0.1.3680043.8.498.1", accession="ACC 1/2")
        ctx = ApiContext(
            index=index,
            metrics=Metrics(),
            oidc=settings(provider),
            viewer_url="https://ohif.example/viewer?StudyInstanceUIDs={study_uid}&acc={accession}",
        )
        port = int(urlsplit(provider.app_url).port or 0)
        server = uvicorn.Server(
            uvicorn.Config(build_http_app(ctx), host="127.0.0.1", port=port, log_level="error")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            yield provider
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            index.close()


def test_sign_in_through_the_provider_lands_on_the_worklist(served: Provider) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = served.app_url
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(base + "/worklist")
            expect(page).to_have_url(base + "/login")
            sso = page.locator("#sso-link")
            expect(sso).to_have_text("Sign in with Hospital SSO")
            sso.click()
            # the provider's own login page (another site: localhost)
            expect(page.locator('input[name="login"]')).to_be_visible()
            assert urlsplit(page.url).hostname == "localhost"
            page.fill('input[name="login"]', "rita")
            page.fill('input[name="password"]', "any password")
            page.click('button[type="submit"]')
            expect(page).to_have_url(base + "/worklist")
            expect(page.locator("#who")).to_have_text("Signed in as rita (radiologist)")
            row = page.locator("#rows tr.row").first
            expect(row).to_have_attribute("data-uid", "1.2.826.0.1.3680043.8.498.1")
            # the viewer link as the server built it, every value encoded
            expect(row.locator("a.viewer")).to_have_attribute(
                "href",
                "https://ohif.example/viewer?StudyInstanceUIDs=1.2.826.0.1.3680043.8.498.1"
                "&acc=ACC%201%2F2",
            )

            page.click("#logout")  # the provider asks to confirm its own sign-out
            page.get_by_role("button", name="Yes, sign me out").click()
            expect(page).to_have_url(base + "/login")
            page.goto(base + "/worklist")
            expect(page).to_have_url(base + "/login")
            page.locator("#sso-link").click()  # the provider's session ended too
            expect(page.locator('input[name="login"]')).to_be_visible()
        finally:
            browser.close()
