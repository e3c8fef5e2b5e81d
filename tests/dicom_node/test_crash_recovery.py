"""SIGKILL the node in the middle of a transfer: every acknowledged instance survives, and the
study completes once the sender resends the rest."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from store.index import Index
from tests.conftest import REPO, free_port, require_tool

from .peers import make_mr_series

pytestmark = pytest.mark.integration


def _start_node(config: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dicom_node.node",
            "--config",
            str(config),
            "--analyser",
            "tests.dicom_node.peers:make_recording_analyser",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY"), f"node did not start: {line!r}"
    return proc


def _acknowledged(storescu_log: str) -> list[str]:
    """Files storescu got a Success response for (``-v`` log: Sending file, then Response)."""
    acked, current = [], None
    for line in storescu_log.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def test_sigkill_mid_transfer_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    port = free_port()
    var = tmp_path / "var"
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[dicom]
port = {port}
stable_age_s = 4
low_water_mark_mb = 0
[storage]
root = "{var}"
database_url = "sqlite:///{var}/index.db"
"""
    )
    files = make_mr_series(tmp_path / "src", 120, rows=96, columns=96)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    node = _start_node(config)
    cmd = [storescu, "-v", "-aec", "RADTRIAGE", "127.0.0.1", str(port), *map(str, files)]
    sender = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list((var / "spool").rglob("*.dcm"))) < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(node.pid, signal.SIGKILL)  # no chance to clean up
        node.wait(10)
        log, _ = sender.communicate(timeout=60)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
        if sender.poll() is None:
            sender.kill()
        if node.stdout is not None:
            node.stdout.close()  # the killed node's pipe, before the next node starts
    acked = _acknowledged(log)
    assert 20 <= len(acked) < len(files), log[-2000:]
    acked_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in acked}

    node = _start_node(config)
    try:
        index = Index(f"sqlite:///{var}/index.db")
        indexed = {Path(p).stem for p in index.instance_paths(study_uid)}
        assert acked_uids <= indexed, "an acknowledged instance was lost"
        for p in index.instance_paths(study_uid):
            assert pydicom.dcmread(p).PixelData  # whole files, not torn ones
        assert not list((var / "tmp").iterdir())

        resend = subprocess.run(
            [storescu, "-aec", "RADTRIAGE", "127.0.0.1", str(port), *map(str, files)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resend.returncode == 0, resend.stderr[-2000:]
        deadline = time.monotonic() + 90
        study: dict[str, object] | None = None
        while time.monotonic() < deadline:
            study = index.get_study(study_uid)
            if study and study["status"] == "reported" and study["instances"] == 120:
                sr = pydicom.dcmread(study["documents"][0])  # type: ignore[index]
                if "120 instances" in sr.ContentSequence[0].TextValue:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError(f"study did not complete after the resend: {study}")
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(30) == 0  # graceful stop
        if node.stdout is not None:
            node.stdout.close()
