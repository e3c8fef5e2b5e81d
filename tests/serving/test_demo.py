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
    rows = [line for line in out.splitlines() if line.startswith("phantom-")]
    assert len(rows) == len(DEMO_CASES)
    by_case = {row.split()[0]: row for row in rows}
    for seed, _vendor, cspca, dropped, days_ago in DEMO_CASES:
        row = by_case[f"phantom-{seed}"]
        assert re.search(r"\bsent\b", row), row  # SR accepted by the PACS
        if dropped:
            assert f"not_analysed (missing_{dropped})" in row
        elif days_ago is not None:  # a negative raised by the waiting-list clock
            assert f"urgent (waited {days_ago} d)" in row, row
        elif cspca:
            assert re.search(r"\b(urgent|soon)\b", row), row
        else:  # the soon band holds false positives by design (its PPV is ~0.35): never urgent
            assert re.search(r"\b(routine|soon)\b", row) and "urgent" not in row, row
