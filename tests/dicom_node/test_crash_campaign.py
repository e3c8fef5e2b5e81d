"""SIGKILL `radtriage serve` during ingest, analysis and sending, and one of its two receiver
processes during ingest (fast version of
tests/campaigns/crash_serve.py): nothing acknowledged is lost, nothing stuck, one SR per study
(or one chain of versions) in Orthanc, and `radtriage doctor` finds nothing left to repair."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.campaigns.crash_serve import run_campaign
from tests.conftest import require_tool

pytestmark = pytest.mark.integration


def test_sigkill_in_each_phase_loses_nothing_and_sends_one_sr_per_study(tmp_path: Path) -> None:
    require_tool("storescu")
    require_tool("Orthanc")
    report = run_campaign(tmp_path, rounds=4, seed=7, workers=2)
    assert report["kills"] == {"ingest": 1, "worker": 1, "analysis": 1, "sending": 1}
    # the ingest kills landed mid-association (the whole server, and the receiving process)
    assert report["kills_after_phase_passed"]["ingest"] == 0
    assert report["kills_after_phase_passed"]["worker"] == 0
    assert report["lost"] == 0 and report["stuck"] == 0 and report["settled"]
    assert report["acknowledged"] == report["instances"]  # the resend completed every study
    assert len(report["srs_in_orthanc"]) == 4 and report["sr_chains_ok"]
    assert report["doctor_exit"] == 0
