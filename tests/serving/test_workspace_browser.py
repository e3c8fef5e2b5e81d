"""The radiologist's morning in a real browser: `radtriage serve --local` as a process, phantom
studies pushed over DICOM (their PatientName hostile: script, img onerror, very long, other
scripts), the pages driven by Playwright on Debian's Chromium (never a downloaded browser).

Signs in, finds the freshly analysed urgent phantom at the top under its patient's name, opens
it, sees the key image with the outline, rejects a finding, enters PI-RADS 4, overrides the
priority with a reason; the audit holds each step and `audit verify` passes; a second browser
without login gets the login page. RADTRIAGE_SCREENSHOTS=DIR saves the pages as PNG.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "morning coffee 42"
HOSTILE = {
    "positive": '<img src=x onerror="window.__xss=1">^Eve',
    "negative": "<script>window.__xss=2</script>^Mallory",
    "no_t2w": "\u0417\u0430\u0445\u0430\u0440\u043e\u0432^\u0418\u0432\u0430\u043d"
    "=\u5c71\u7530^\u592a\u90ce=" + "\u202e\u0645\u0631\u062d\u0628\u0627" + "A" * 150,
}
#: RADTRIAGE_SCREENSHOTS mode: plain synthetic names, for the README (still rendered as text)
PLAIN = {"positive": "Phantom^Alan", "negative": "Phantom^Brian", "no_t2w": "Phantom^Colin"}
NAMES = PLAIN if os.environ.get("RADTRIAGE_SCREENSHOTS") else HOSTILE


def person_name(pn: str) -> str:
    """What the page shows for a PN (mirrors common.js personName)."""
    groups = []
    for group in pn.split("="):
        family, given, middle, prefix, suffix = ([*group.split("^"), "", "", "", ""])[:5]
        rest = " ".join(p for p in (prefix, given, middle, suffix) if p)
        groups.append(f"{family}, {rest}" if family and rest else family or rest)
    return " / ".join(g for g in groups if g)


@dataclass
class Server:
    base_url: str
    uids: dict[str, str]
    config: Path
    admin_token: str


def _get(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    import pydicom

    from cli.demo import DemoStudy, push_direct, wait_ready, write_config
    from cli.demo.pacs import LocalPacs, free_port, stop_process
    from store.index import Index
    from training.phantoms import synthesize_case, write_study
    from workspace.accounts import Accounts

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is not installed (apt install chromium)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser)")
    work = tmp_path_factory.mktemp("workspace")
    studies: dict[str, DemoStudy] = {}
    for key, seed, cspca in (("positive", 920001, True), ("negative", 920002, False),
                             ("no_t2w", 920003, False)):  # fmt: skip
        case = synthesize_case(seed, cspca=cspca)
        folder = write_study(case, work / "studies", distractors=False)
        for path in folder.rglob("*.dcm"):
            ds = pydicom.dcmread(path)
            ds.SpecificCharacterSet = "ISO_IR 192"
            with warnings.catch_warnings():  # hostile on purpose: over-long, too many groups
                warnings.simplefilter("ignore", UserWarning)
                ds.PatientName = NAMES[key]
                ds.save_as(path)
        if key == "no_t2w":  # the AI cannot analyse it: NOT ANALYSED, with the reason
            for series in folder.glob("*_t2w*"):
                shutil.rmtree(series)
        studies[key] = DemoStudy(folder, case.study_instance_uid, key, "siemens")

    pacs = LocalPacs(work / "pacs")
    pacs.start()
    dicom_port, http_port = free_port(), free_port()
    config = work / "radtriage.toml"
    write_config(config, work / "var", dicom_port, http_port, pacs.aet, pacs.port)
    from core.settings import load_settings

    index = Index(load_settings(config).storage.database_url)
    accounts = Accounts(index.engine)
    accounts.add_user("rita", "radiologist", PASSWORD)
    accounts.add_user("adam", "admin", PASSWORD)
    admin_token = accounts.new_token("adam")
    index.close()

    log = work / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--config", str(config), "--local"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(base_url, proc, log, timeout=240)
        with warnings.catch_warnings():  # encoding the hostile names warns, as it should
            warnings.simplefilter("ignore", UserWarning)
            for study in studies.values():
                push_direct(study, dicom_port)
        deadline = time.monotonic() + 240
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = _get(base_url + "/api/worklist", admin_token)["rows"]
            if len(rows) == 3 and all(r["status"] in {"sent", "failed"} for r in rows):
                break
            time.sleep(1.0)
        assert len(rows) == 3, f"worklist after 240 s: {rows}; see {log}"
        uids = {k: s.study_instance_uid for k, s in studies.items()}
        yield Server(base_url, uids, config, admin_token)
    finally:
        stop_process(proc, timeout=30)
        pacs.stop()


def _outline_pixels(png: bytes) -> int:
    from PIL import Image

    from workspace.key_images import SELECTED_COLOUR

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return int(np.all(rgb == np.asarray(SELECTED_COLOUR, dtype=np.uint8), axis=-1).sum())


def _shot(page: Any, name: str) -> None:
    folder = os.environ.get("RADTRIAGE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def test_the_radiologists_morning(server: Server, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    uid = server.uids["positive"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 950})
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.base_url + "/worklist")
            expect(page).to_have_url(server.base_url + "/login")
            page.fill("#name", "rita")
            page.fill("#password", PASSWORD)
            page.click("#login-submit")
            expect(page).to_have_url(server.base_url + "/worklist")
            first = page.locator("#rows tr.row").first
            expect(first).to_have_attribute("data-uid", uid)
            expect(first).to_have_attribute("data-priority", "urgent")
            expect(page.locator("#who")).to_contain_text("rita")

            # hostile names render as text, nothing they carry runs
            for key, pn in NAMES.items():
                row = page.locator(f'#rows tr[data-uid="{server.uids[key]}"]')
                expect(row.locator(".patient .name")).to_have_text(person_name(pn))
            assert page.evaluate("window.__xss") is None
            assert page.locator("#rows img, #rows script").count() == 0
            na = page.locator(f'#rows tr[data-uid="{server.uids["no_t2w"]}"]')
            expect(na).to_have_attribute("data-priority", "not_analysed")
            expect(na.locator(".priority")).to_contain_text("NOT ANALYSED")
            expect(na.locator(".priority .reason")).to_contain_text("T2")
            expect(page.locator("#summary")).to_contain_text("3 studies")
            _shot(page, "worklist.png")

            first.locator("a.open").click()
            expect(page).to_have_url(f"{server.base_url}/studies/{uid}")
            expect(page.locator("#patient-name")).to_have_text(person_name(NAMES["positive"]))
            image = page.locator("#img-t2w")
            src = re.compile(rf"/api/studies/{re.escape(uid)}/images/t2w/\d+\.png\?lesion=0")
            expect(image).to_have_attribute("src", src)
            # (wait_for_function evaluates a string: the page's CSP forbids that, rightly)
            deadline = time.monotonic() + 60
            while not image.evaluate("img => img.complete && img.naturalWidth > 0"):
                assert time.monotonic() < deadline, "the key image did not load"
                time.sleep(0.2)
            png = page.request.get(server.base_url + image.get_attribute("src")).body()
            assert _outline_pixels(png) > 10  # the selected lesion's outline is drawn
            expect(page.locator("#disclaimer")).to_be_visible()

            lesion = page.locator("#lesions tr.lesion").first
            lesion.locator("select.finding-decision").select_option("reject")
            lesion.locator("button.finding-save").click()
            expect(lesion.locator(".decision")).to_contain_text("reject")
            page.select_option("#pirads", "4")
            page.click("#pirads-save")
            expect(page.locator("#assessment")).to_contain_text("4")
            page.select_option("#override-priority", "soon")
            page.click("#override-save")  # no reason yet: refused on the page
            expect(page.locator("#read-error")).to_contain_text("reason")
            page.fill("#override-reason", "prior negative biopsy; discussed at MDT")
            page.click("#override-save")
            expect(page.locator("#assessment")).to_contain_text("soon by rita")
            _shot(page, "study.png")
            assert errors == []
            assert page.evaluate("window.__xss") is None

            stranger = browser.new_context().new_page()
            stranger.goto(f"{server.base_url}/studies/{uid}")
            expect(stranger).to_have_url(server.base_url + "/login")
            expect(stranger.locator("#login-form")).to_be_visible()
            assert "onerror" not in stranger.content() and "Mallory" not in stranger.content()
        finally:
            browser.close()

    events = _get(f"{server.base_url}/api/audit?study={uid}&limit=500", server.admin_token)
    actions = [e["action"] for e in reversed(events["events"])]
    for step in ("view_study_page", "view_study", "finding", "pirads", "override"):
        assert step in actions, actions
    assert actions.index("finding") < actions.index("pirads") < actions.index("override")
    override = next(e for e in events["events"] if e["action"] == "override")
    assert override["user"] == "rita" and override["role"] == "radiologist"
    assert override["detail"]["reason"] == "prior negative biopsy; discussed at MDT"
    assert override["address"] == "127.0.0.1"
    logins = _get(f"{server.base_url}/api/audit?limit=500", server.admin_token)["events"]
    assert any(e["action"] == "login" and e["user"] == "rita" for e in logins)
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "audit", "verify", "--config", str(server.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "intact" in done.stdout
    rows = _get(f"{server.base_url}/api/worklist", server.admin_token)["rows"]
    moved = next(r for r in rows if r["study_instance_uid"] == uid)
    assert moved["priority"] == "soon" and moved["ai_priority"] == "urgent"
    assert moved["pirads_overall"] == 4
