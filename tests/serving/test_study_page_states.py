"""The study page in every state a study can be in (issue 22): after a superseding SR (the wait
clock changed the flag), after a radiologist's override, and not analysed. Each is opened in
Debian's Chromium (Playwright) against a real uvicorn process serving the production app over
the index the real pipeline and the waiting list wrote; the page must show the current flag,
the statement naming its driver and, where the AI ran, the key image with the SEG outline,
never an error or exception text. RADTRIAGE_SCREENSHOTS=DIR keeps a PNG of each page.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.serving.test_priority_truth import (  # noqa: F401  (the fixtures)
    ANALYSED_ON,
    Scenario,
    engine,
    make,
    ris,
)
from tests.serving.test_workspace_browser import CHROMIUM, CHROMIUM_ARGS
from tests.serving.workspace_helpers import PASSWORD

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Scenario], str]]:
    """Start the production HTTP app over a scenario's index; returns its base URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def _serve(sc: Scenario) -> str:
        port = _free_port()
        config = tmp_path / f"http-{port}.json"
        config.write_text(
            json.dumps({"database_url": str(sc.index.engine.url), "port": port, "spool": None})
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.serving.http_server", str(config)], cwd=REPO
        )
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2):
                    return base
            except OSError:
                assert proc.poll() is None, "the HTTP app exited"
                assert time.monotonic() < deadline, "the HTTP app did not start"
                time.sleep(0.2)

    yield _serve
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=20)


def _open_study(base: str, uid: str, shot: str) -> dict[str, Any]:
    """Sign in, open the study page, wait for it; what it shows."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/worklist")
            page.fill("#name", "rita")
            page.fill("#password", PASSWORD)
            page.click("#login-submit")
            expect(page).to_have_url(base + "/worklist")
            page.goto(f"{base}/studies/{uid}")
            expect(page.locator("#priority .badge")).to_be_visible()
            image = page.locator("#img-t2w")
            loaded = False
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                hint = page.locator("#images-hint").inner_text()
                if image.evaluate("img => img.complete && img.naturalWidth > 0"):
                    loaded = True
                    break
                if "cannot be shown" in hint:
                    break
                time.sleep(0.2)
            shots = os.environ.get("RADTRIAGE_SCREENSHOTS")
            if shots:
                page.screenshot(path=str(Path(shots) / shot), full_page=True)
            return {
                "badge": page.locator("#priority .badge").inner_text(),
                "driver": page.locator("#priority .driver-note").inner_text(),
                "image_loaded": loaded,
                "images_hint": page.locator("#images-hint").inner_text(),
                "body": page.locator("body").inner_text(),
                "errors": errors,
            }
        finally:
            browser.close()


def _no_exception_text(seen: dict[str, Any]) -> None:
    assert not seen["errors"], seen["errors"]
    for leak in ("Traceback", "Error:", "Exception", "has no attribute", "[object"):
        assert leak not in seen["body"], leak


def test_superseded_and_overridden_pages_show_the_current_flag_and_images(
    make: Callable[..., Scenario],  # noqa: F811
    engine: Any,  # noqa: F811
    serve: Callable[[Scenario], str],
) -> None:
    sc = make("positive")
    sc.order(request_date=ANALYSED_ON)
    sc.analyse(engine)
    sc.tick(ANALYSED_ON)
    sc.override("routine", "benign on second read")
    base = serve(sc)
    overridden = _open_study(base, sc.uid, "study-overridden.png")
    _no_exception_text(overridden)
    assert overridden["badge"].split()[-1] == "ROUTINE"
    assert overridden["driver"] == "Routine: set by rita"
    assert overridden["image_loaded"], overridden["images_hint"]
    assert "AI alone: urgent" in overridden["body"]

    sc.tick(ANALYSED_ON + timedelta(days=26))  # the clock escalates it: a superseding SR
    superseded = _open_study(base, sc.uid, "study-superseded.png")
    _no_exception_text(superseded)
    assert superseded["badge"].split()[-1] == "URGENT"
    assert superseded["driver"] == "Urgent: waited 26 of 28 days (FDS)"
    assert superseded["image_loaded"], superseded["images_hint"]


def test_not_analysed_page_says_why_in_plain_words(
    make: Callable[..., Scenario],  # noqa: F811
    engine: Any,  # noqa: F811
    serve: Callable[[Scenario], str],
) -> None:
    sc = make("no_t2w", image_priority="STAT")
    sc.analyse(engine)
    sc.tick(ANALYSED_ON)
    seen = _open_study(serve(sc), sc.uid, "study-not-analysed.png")
    _no_exception_text(seen)
    assert seen["badge"].endswith("NOT ANALYSED")
    assert re.match(r"Not analysed: No axial T2-weighted series", seen["driver"])
    assert not seen["image_loaded"]
    assert "cannot be shown" in seen["images_hint"] or seen["images_hint"] == ""
