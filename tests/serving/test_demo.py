"""`radtriage demo --once`: the newcomer's first command, end to end with a real PACS.

Runs the real thing: phantoms, Orthanc (Debian package) routing each study to a
`radtriage serve` process over DICOM, Ray Serve models, SRs back in Orthanc.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli.demo import DEMO_CASES
from tests.conftest import REPO, free_port, require_tool

MAX_LINES = 100


@pytest.mark.integration
def test_demo_once_analyses_every_study_and_returns_srs_to_orthanc(tmp_path: Path) -> None:
    require_tool("Orthanc")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "demo",
            "--once",
            "--workdir",
            str(tmp_path / "d"),
            "--http-port",
            str(free_port()),
            "--timeout",
            "400",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "through Orthanc" in out
    # a quiet first run: its steps, the table and the sign-in, nothing per instance
    printed = (out + proc.stderr).splitlines()
    assert len(printed) < MAX_LINES, f"{len(printed)} lines:\n" + "\n".join(printed[:150])
    assert not [line for line in printed if "pynetdicom" in line or " INFO " in line]
    assert re.search(
        r"^Worklist: http://127\.0\.0\.1:\d+/worklist +\(sign in as demo / ", out, re.M
    )
    assert re.search(r"^stopped in \d+\.\d s \(radtriage in \d+\.\d s\)$", out, re.M)
    rows = [line for line in out.splitlines() if line.startswith("phantom-")]
    assert len(rows) == len(DEMO_CASES)
    by_case = {row.split()[0]: row for row in rows}
    for seed, _vendor, cspca, dropped, days_ago in DEMO_CASES:
        row = by_case[f"phantom-{seed}"]
        assert re.search(r"\bsent\b", row), row  # SR accepted by the PACS
        if dropped:
            assert f"not_analysed (missing_{dropped})" in row
        elif days_ago is not None:  # a negative raised by the waiting-list clock, never the AI
            assert re.search(rf"\burgent +waited {days_ago} of 28 days \(FDS\)", row), row
            assert "AI" not in row.split("urgent", 1)[1], row
        elif cspca:
            assert re.search(r"\b(urgent|soon) +(AI |STAT referral)", row), row
        else:  # the soon band holds false positives by design (its PPV is ~0.35): never urgent
            assert re.search(r"\b(routine|soon)\b", row) and "urgent" not in row, row


@pytest.mark.integration
def test_pynetdicom_lines_only_with_verbose(tmp_path: Path) -> None:
    """Without Orthanc the demo's own SCU pushes every instance and its in-process PACS takes
    the SRs back: pynetdicom logs several INFO lines per C-STORE, which only --verbose shows."""
    import logging

    from cli.commands.demo import quiet_logging
    from cli.demo import DemoStudy, push_direct
    from cli.demo.pacs import LocalPacs
    from training.phantoms import synthesize_case, write_study

    case = synthesize_case(910004, cspca=False)
    folder = write_study(case, tmp_path / "studies", distractors=False)
    study = DemoStudy(folder, case.study_instance_uid, "no csPCa", "ge")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    try:
        with LocalPacs(tmp_path / "pacs") as pacs:
            quiet_logging(verbose=False)
            push_direct(study, pacs.port)
            quiet = [r for r in records if r.name.startswith("pynetdicom")]
            quiet_logging(verbose=True)
            push_direct(study, pacs.port)
            verbose = [r for r in records if r.name.startswith("pynetdicom")]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert quiet == []
    assert len(verbose) > len(list(folder.rglob("*.dcm")))  # more than one per instance
