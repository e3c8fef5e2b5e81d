"""The fuzz campaign's fast version: a few hundred Hypothesis cases against the live node
(``python -m dicom_node.node``). The 10,000-case run and its numbers are in
docs/reliability.md; the properties checked are those of `tests.campaigns.fuzz_scp`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.campaigns.fuzz_scp import RSS_BOUND_MB, run_campaign

pytestmark = pytest.mark.integration

FAST_CASES = 300


def test_live_scp_survives_fuzzing(tmp_path: Path) -> None:
    stats = run_campaign(FAST_CASES, tmp_path)  # raises on the first broken property
    assert stats.cases == FAST_CASES
    assert stats.crashes == 0 and stats.hangs == 0
    # both families of cases ran, and the SCP refused (and quarantined) the bad instances
    assert stats.aborted_or_closed > 0
    assert stats.quarantined > 0 and stats.statuses["0xC210"] > 0
    # the valid instances sent between fuzz cases were all stored
    assert stats.good_sent == FAST_CASES // 25
    assert stats.rss_peak_mb < stats.rss_start_mb + RSS_BOUND_MB
