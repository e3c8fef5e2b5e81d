"""The worklist in a real browser: `radtriage serve` as a process, studies pushed over DICOM,
the page rendered by Debian's headless Chromium (the DOM after its scripts ran).

One server for the module (`--local` backend: same analysis code, no Ray start-up): a csPCa
phantom, a negative one, and a negative one whose T2W series was removed before the push.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, require_tool

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
)


@dataclass
class Server:
    base_url: str
    uids: dict[str, str]  # positive / negative / no_t2w -> StudyInstanceUID
    workdir: Path


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from cli.demo import DemoStudy, push_direct, wait_ready, write_config
    from cli.pacs import LocalPacs, free_port, stop_process
    from training.phantoms import synthesize_case, write_study

    work = tmp_path_factory.mktemp("worklist")
    studies: dict[str, DemoStudy] = {}
    for key, seed, cspca in (("positive", 910001, True), ("negative", 910002, False),
                             ("no_t2w", 910004, False)):  # fmt: skip
        case = synthesize_case(seed, cspca=cspca)
        folder = write_study(case, work / "studies", distractors=False)
        studies[key] = DemoStudy(folder, case.study_instance_uid, key, "siemens")
    for series in studies["no_t2w"].folder.glob("*_t2w*"):
        shutil.rmtree(series)

    pacs = LocalPacs(work / "pacs")
    pacs.start()
    dicom_port, http_port = free_port(), free_port()
    config = work / "radtriage.toml"
    write_config(config, work / "var", dicom_port, http_port, pacs.aet, pacs.port)
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
        for study in studies.values():
            push_direct(study, dicom_port)
        deadline = time.monotonic() + 240
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = _get(base_url + "/api/worklist")
            if len(rows) == 3 and all(r["status"] in {"sent", "failed"} for r in rows):
                break
            time.sleep(1.0)
        assert len(rows) == 3, f"results after 240 s: {rows}; see {log}"
        yield Server(base_url, {k: s.study_instance_uid for k, s in studies.items()}, work)
    finally:
        stop_process(proc, timeout=30)
        pacs.stop()


def _chromium(url: str, profile: Path, *extra: str) -> str:
    exe = require_tool("chromium")
    done = subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        timeout=90,
        check=True,
    )
    return done.stdout.decode("utf-8")


class _Rows(HTMLParser):
    """Rows of the rendered worklist: data-* attributes and the text of each cell by class."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self._cell: str | None = None
        self.banner_hidden: bool | None = None
        self.pending_hidden: bool | None = None
        self._in_banner = False
        self.banner_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "div" and a.get("id") == "disclaimer":
            self.banner_hidden = "hidden" in a
            self._in_banner = True
        if tag == "section" and a.get("id") == "pending-section":
            self.pending_hidden = "hidden" in a
        if tag == "tr" and "data-uid" in a:  # a pending row has no data-priority
            self.rows.append(
                {"uid": a["data-uid"], "priority": a.get("data-priority"), "cells": {}}
            )
        elif tag == "td" and self.rows:
            self._cell = (a.get("class") or "").split(" ")[0] or "cell"

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._in_banner = False
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_banner:
            self.banner_text += data
        if self._cell and self.rows:
            cells = self.rows[-1]["cells"]
            cells[self._cell] = cells.get(self._cell, "") + data


def _render(server: Server, tmp_path: Path) -> _Rows:
    parsed = _Rows()
    parsed.feed(_chromium(server.base_url + "/worklist", tmp_path / "profile", "--dump-dom"))
    return parsed


def test_page_is_self_contained() -> None:
    html = (REPO / "serving" / "web" / "worklist.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"""url\(\s*["']?(https?:)?//|@import""", html)


def test_rows_in_priority_order_with_findings_reason_and_model(
    server: Server, tmp_path: Path
) -> None:
    page = _render(server, tmp_path)
    uids = server.uids
    assert [r["uid"] for r in page.rows] == [uids["positive"], uids["no_t2w"], uids["negative"]]
    assert [r["priority"] for r in page.rows] == ["urgent", "not_analysed", "routine"]
    positive, no_t2w, negative = (r["cells"] for r in page.rows)

    result = _get(f"{server.base_url}/api/studies/{uids['positive']}")
    assert "URGENT" in positive["priority"]  # text, not colour alone
    assert positive["likelihood"].strip().startswith(f"{round(result['case_likelihood'] * 100)}%")
    n = len(result["lesions"])
    assert n >= 1 and f"{n} lesion" in positive["findings"]
    largest = max(result["lesions"], key=lambda lesion: lesion["volume_ml"])
    assert f"largest {largest['volume_ml']:.2f} ml" in positive["findings"]
    assert f"version {result['model']['version']}" in positive["model"]
    assert result["model"]["name"] in positive["model"]

    assert "NOT ANALYSED" in no_t2w["priority"]
    assert "T2-weighted" in no_t2w["reason"] and "missing_t2w" in no_t2w["reason"]
    assert "ROUTINE" in negative["priority"] and "0 lesions" in negative["findings"]
    assert all(r["cells"]["status"].strip() == "SR in PACS" for r in page.rows)
    assert all(r["uid"] in r["cells"]["study"] for r in page.rows)

    assert page.pending_hidden is True  # every study has its result: nothing awaits the AI
    assert page.banner_hidden is False, "the demo model says NOT FOR CLINICAL USE"
    assert "NOT FOR CLINICAL USE" in page.banner_text
    assert "synthetic data" in page.banner_text


def test_acknowledge_and_override_are_audited_and_shown(server: Server, tmp_path: Path) -> None:
    uids = server.uids
    base = server.base_url + "/api/worklist/"
    _post(base + uids["positive"] + "/acknowledge", {"user": "dr_ack"})
    _post(
        base + uids["negative"] + "/override",
        {"user": "dr_over", "priority": "soon", "comment": "PSA doubled in 6 months"},
    )
    page = _render(server, tmp_path)
    assert [r["priority"] for r in page.rows] == ["urgent", "not_analysed", "soon"]
    positive, _, negative = (r["cells"] for r in page.rows)
    assert page.rows[2]["uid"] == uids["negative"]
    assert "\u2713 dr_ack" in positive["actions"]
    assert "Acknowledge" not in positive["actions"]  # no second acknowledgement button
    assert "SOON" in negative["priority"]
    assert "override by dr_over (AI: routine)" in negative["priority"]
    assert "PSA doubled in 6 months" in negative["priority"]

    audit = _get(server.base_url + "/api/audit")
    assert [(e["action"], e["user"]) for e in audit[-2:]] == [
        ("acknowledge", "dr_ack"),
        ("override", "dr_over"),
    ]
    assert audit[-1]["ai_priority"] == "routine" and audit[-1]["priority"] == "soon"
    assert audit[-1]["comment"] == "PSA doubled in 6 months"
    # the AI result itself is never rewritten by an override
    assert _get(f"{server.base_url}/api/studies/{uids['negative']}")["priority"] == "routine"


def test_screenshot_renders(server: Server, tmp_path: Path) -> None:
    shot = tmp_path / "worklist.png"
    _chromium(
        server.base_url + "/worklist",
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1400,700",
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1400, 700)


DEVTOOLS = ("--remote-debugging-port=0",)  # the port is written to <profile>/DevToolsActivePort


class _DevTools:
    """A page of a headless Chromium driven over the DevTools protocol, as a user drives it:
    mouse clicks at the centre of visible elements and typed text, not calls into the page."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self._id:
                assert "error" not in message, message["error"]
                return dict(message["result"])

    def js(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"still false after {timeout:.0f} s: {expression}"
            time.sleep(0.2)
        return value

    def click(self, selector: str) -> None:
        box = self.wait_for(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; const r = e.getBoundingClientRect();"
            " return r.width && r.height ? [r.x + r.width / 2, r.y + r.height / 2] : null; })()"
        )
        x, y = box
        hit = self.js(
            f"document.elementFromPoint({x}, {y})"
            f"?.closest({json.dumps(selector)}) === document.querySelector({json.dumps(selector)})"
        )
        assert hit, f"{selector} is covered by another element"
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.js(
            f"(e => {{ e.focus(); e.select(); }})(document.querySelector({json.dumps(selector)}))"
        )
        self.call("Input.insertText", text=text)


@contextlib.contextmanager
def _browser(url: str, profile: Path) -> Iterator[_DevTools]:
    """Headless Chromium on `url`, with its DevTools connection to the page."""
    from websockets.sync.client import connect

    exe = require_tool("chromium")
    flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--virtual-time-budget")]
    proc = subprocess.Popen(
        [exe, *flags, "--window-size=1400,900", f"--user-data-dir={profile}", *DEVTOOLS, url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and proc.poll() is None, "no DevTools port"
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        pages = [t for t in _get(f"http://127.0.0.1:{port}/json/list") if t["type"] == "page"]
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as ws:
            yield _DevTools(ws)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_radiologist_acknowledges_and_overrides_with_the_mouse(
    server: Server, tmp_path: Path
) -> None:
    uid = server.uids["no_t2w"]
    row = f'tr[data-uid="{uid}"]'
    before = len(_get(server.base_url + "/api/audit"))
    with _browser(server.base_url + "/worklist", tmp_path / "profile") as page:
        page.wait_for("document.querySelectorAll('tr[data-uid]').length === 3")
        page.type("#user", "dr_mouse")

        page.click(f"{row} button.ack")
        page.wait_for(f"document.querySelector('{row} .acknowledged-by')?.textContent")
        assert page.js(f"document.querySelector('{row} .acknowledged-by').textContent") == (
            "\u2713 dr_mouse"
        )

        page.click(f"{row} button.override")
        assert page.wait_for("document.getElementById('override-dialog').open")
        options = page.js(
            "[...document.querySelectorAll('#override-priority option')].map(o => o.value)"
        )
        assert options == ["urgent", "soon", "routine"]  # every priority but the current one
        page.click("#override-form button[type=submit]")  # no reason given yet
        time.sleep(0.5)
        assert page.js("document.getElementById('override-dialog').open"), "saved without reason"
        assert len(_get(server.base_url + "/api/audit")) == before + 1  # only the acknowledge

        page.type("#override-comment", "Prior biopsy Gleason 3+4, T2W to be repeated")
        page.click("#override-form button[type=submit]")  # first option: urgent
        page.wait_for("!document.getElementById('override-dialog').open")
        page.wait_for(f"document.querySelector('{row}')?.dataset.priority === 'urgent'")
        note = page.js(f"document.querySelector('{row} .override-note').textContent")
        assert note == "override by dr_mouse (AI: not analysed)"

    audit = _get(server.base_url + "/api/audit")[before:]
    assert [(e["action"], e["user"]) for e in audit] == [
        ("acknowledge", "dr_mouse"),
        ("override", "dr_mouse"),
    ]
    assert audit[1]["priority"] == "urgent" and audit[1]["ai_priority"] == "not_analysed"
    assert audit[1]["comment"] == "Prior biopsy Gleason 3+4, T2W to be repeated"
    assert _get(f"{server.base_url}/api/studies/{uid}")["priority"] == "not_analysed"


def test_studies_awaiting_the_ai_are_shown_by_referral_urgency(
    tmp_path: Path, pending_context: tuple[Any, str, str]
) -> None:
    """Studies still arriving (a real index, no analysis yet) appear under "Awaiting AI
    analysis", the referrer's STAT study first; the triaged list is empty."""
    import threading

    import uvicorn

    from serving.http_api import create_app
    from tests.conftest import free_port

    ctx, routine, stat = pending_context
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.1)
        page = _Rows()
        page.feed(_chromium(f"http://127.0.0.1:{port}/worklist", tmp_path / "p", "--dump-dom"))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert page.pending_hidden is False
    assert [r["uid"] for r in page.rows] == [stat, routine]
    assert all(r["priority"] is None for r in page.rows)  # none is in the triaged table
    first, second = (r["cells"] for r in page.rows)
    assert "URGENT" in first["referral"] and "ROUTINE" in second["referral"]
    assert first["status"] == second["status"] == "Receiving images"
    assert second["images"] == "5"
    assert re.fullmatch(r"1[01] min", second["waited"]), second  # received 600 s ago
