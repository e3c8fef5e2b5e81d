from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.domain import Priority, ReferralUrgency
from core.priority import Thresholds, WaitingPolicy, ai_priority, decide_priority

T = Thresholds(urgent=0.6, soon=0.3)
_SEVERITY = {Priority.ROUTINE: 0, Priority.SOON: 1, Priority.URGENT: 2}


@pytest.mark.parametrize(
    ("likelihood", "expected"),
    [
        (0.0, Priority.ROUTINE),
        (0.29, Priority.ROUTINE),
        (0.3, Priority.SOON),
        (0.59, Priority.SOON),
        (0.6, Priority.URGENT),
        (1.0, Priority.URGENT),
    ],
)
def test_ai_priority_thresholds(likelihood: float, expected: Priority) -> None:
    assert ai_priority(likelihood, T) is expected


def test_no_likelihood_is_not_analysed_never_routine() -> None:
    d = decide_priority(None, T, ReferralUrgency.ROUTINE)
    assert d.priority is Priority.NOT_ANALYSED
    assert d.reasons


def test_referral_urgency_is_a_floor() -> None:
    d = decide_priority(0.01, T, ReferralUrgency.URGENT)
    assert d.priority is Priority.URGENT
    assert any("referral" in r for r in d.reasons)


def test_waiting_time_escalates() -> None:
    policy = WaitingPolicy(fds_days=28, escalate_within_days=7, urgent_within_days=3)
    assert decide_priority(0.0, T, days_waited=20, policy=policy).priority is Priority.ROUTINE
    assert decide_priority(0.0, T, days_waited=21, policy=policy).priority is Priority.SOON
    assert decide_priority(0.4, T, days_waited=24, policy=policy).priority is Priority.SOON
    assert decide_priority(0.4, T, days_waited=25, policy=policy).priority is Priority.URGENT
    assert decide_priority(0.0, T, days_waited=40, policy=policy).priority is Priority.URGENT
    with pytest.raises(ValueError, match="urgent_within_days"):
        WaitingPolicy(fds_days=28, escalate_within_days=2, urgent_within_days=3)


def test_invalid_thresholds_rejected() -> None:
    with pytest.raises(ValueError, match="soon <= urgent"):
        Thresholds(urgent=0.2, soon=0.5)


@given(
    a=st.floats(0, 1),
    b=st.floats(0, 1),
    referral=st.sampled_from(list(ReferralUrgency)),
    days=st.one_of(st.none(), st.integers(0, 60)),
)
def test_priority_monotone_in_likelihood(
    a: float, b: float, referral: ReferralUrgency, days: int | None
) -> None:
    lo, hi = sorted((a, b))
    p_lo = decide_priority(lo, T, referral, days).priority
    p_hi = decide_priority(hi, T, referral, days).priority
    assert _SEVERITY[p_hi] >= _SEVERITY[p_lo]


@given(likelihood=st.floats(0, 1), referral=st.sampled_from(list(ReferralUrgency)))
def test_ai_never_lowers_referral(likelihood: float, referral: ReferralUrgency) -> None:
    p = decide_priority(likelihood, T, referral).priority
    assert _SEVERITY[p] >= _SEVERITY[Priority(referral.value)]


def test_worklist_rank_puts_not_analysed_after_urgent() -> None:
    order = sorted(Priority, key=lambda p: p.rank)
    assert order == [Priority.URGENT, Priority.NOT_ANALYSED, Priority.SOON, Priority.ROUTINE]
