"""The HL7 fuzz campaign's fast version: a few hundred Hypothesis messages against the live
listener (its own process), then 100 parallel connections. The 10,000-message run and its
numbers are in docs/reliability.md; the properties checked are `tests.campaigns.fuzz_hl7`'s."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.campaigns.fuzz_hl7 import (
    PARALLEL_CONNECTIONS,
    PARALLEL_MESSAGES,
    RSS_BOUND_MB,
    run_campaign,
)

pytestmark = pytest.mark.integration

FAST_CASES = 300


def test_live_hl7_listener_survives_fuzzing(tmp_path: Path) -> None:
    stats = run_campaign(FAST_CASES, tmp_path)  # raises on the first broken property
    assert stats.cases == FAST_CASES and stats.crashes == 0 and stats.hangs == 0
    assert sum(stats.acks.values()) == FAST_CASES  # every message ACKed, AA/AE/AR only
    assert set(stats.acks) == {"AA", "AE", "AR"}  # the three families all occurred
    assert stats.errors["100"] > 0 and stats.errors["102"] > 0
    assert stats.parallel_acks == PARALLEL_CONNECTIONS * PARALLEL_MESSAGES
    assert stats.parallel_rss_peak_mb < stats.rss_start_mb + RSS_BOUND_MB
