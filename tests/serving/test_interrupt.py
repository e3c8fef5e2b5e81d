"""Ctrl-C (or SIGTERM) on `radtriage serve` (Ray Serve backend, as `serve` and the demo run
it) while a study is arriving over DICOM: the server and every process it started are gone,
and nothing is left half-written (`radtriage doctor` finds index, spool, outbox and results
consistent).

Ctrl-C in a terminal sends SIGINT to the whole foreground process group; the test does the same
(`killpg`). It asserts outcomes, not a timing (the seconds are recorded as the test's
``shutdown_s`` property and printed); the bound below only keeps a hang from blocking the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.serving.test_serve_process import _in_session, _kill_group

pytestmark = pytest.mark.integration

HANG_BOUND_S = 120.0


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_stops_serve_with_nothing_half_written(
    how: str, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """ctrl-c: SIGINT to the process group, as a terminal sends it; sigterm: to the main
    process only, as `docker stop`, systemd and `radtriage demo` send it."""
    pytest.importorskip("ray")
    from cli.demo import DemoStudy, create_demo_user, push_direct, wait_ready, write_config
    from cli.demo.pacs import LocalPacs, free_port
    from training.phantoms import synthesize_case, write_study

    case = synthesize_case(910002, cspca=False)
    folder = write_study(case, tmp_path / "studies", distractors=False)
    study = DemoStudy(folder, case.study_instance_uid, "no csPCa", "siemens")
    pacs = LocalPacs(tmp_path / "pacs").start()
    dicom_port, http_port = free_port(), free_port()
    config = tmp_path / "radtriage.toml"
    write_config(config, tmp_path / "var", dicom_port, http_port, pacs.aet, pacs.port)
    (tmp_path / "var").mkdir()
    create_demo_user(f"sqlite:///{tmp_path / 'var'}/radtriage.db")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--config", str(config)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    try:
        wait_ready(f"http://127.0.0.1:{http_port}", proc, log, timeout=300)
        # interrupt while the study arrives: some instances stored, the rest still coming
        pushing = threading.Thread(target=_push_quietly, args=(push_direct, study, dicom_port))
        pushing.start()
        spool = tmp_path / "var"
        deadline = time.monotonic() + 60
        while len(list(spool.rglob("*.dcm"))) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=HANG_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still running {HANG_BOUND_S:.0f} s after {how}; see {log}")
        shutdown_s = time.monotonic() - started
        record_property("shutdown_s", round(shutdown_s, 1))
        print(f"serve stopped {shutdown_s:.1f} s after {how}")
        pushing.join(timeout=30)
        time.sleep(1.0)  # children get a moment to notice their parent is gone
        assert _in_session(proc.pid) == {}, "processes left behind"
        assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
        assert "radtriage stopped" in log.read_text(errors="replace")

        doctor = subprocess.run(
            [sys.executable, "-m", "cli.main", "doctor", "--config", str(config), "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        report = json.loads(doctor.stdout.strip().splitlines()[-1])
        assert doctor.returncode == 0 and report["ok"], report
        assert not list((spool / "tmp").glob("*.part"))
    finally:
        _kill_group(proc)
        pacs.stop()


def _push_quietly(push: object, study: object, port: int) -> None:
    with contextlib.suppress(Exception):  # the server going away mid-association is expected
        push(study, port)  # type: ignore[operator]
