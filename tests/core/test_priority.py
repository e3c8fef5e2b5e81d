from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.domain import Priority, ReferralUrgency
from core.priority import Thresholds, WaitingPolicy, ai_priority, decide_priority

T = Thresholds(urgent=0.6, soon=0.3)


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
    assert p_hi.severity >= p_lo.severity


@given(likelihood=st.floats(0, 1), referral=st.sampled_from(list(ReferralUrgency)))
def test_ai_never_lowers_referral(likelihood: float, referral: ReferralUrgency) -> None:
    p = decide_priority(likelihood, T, referral).priority
    assert p.severity >= referral.floor.severity


def test_worklist_rank_puts_not_analysed_after_urgent() -> None:
    order = sorted(Priority, key=lambda p: p.rank)
    assert order == [Priority.URGENT, Priority.NOT_ANALYSED, Priority.SOON, Priority.ROUTINE]


def test_not_analysed_keeps_its_flag_but_ranks_by_the_referral_floor() -> None:
    stat = decide_priority(None, T, ReferralUrgency.URGENT)
    assert stat.priority is Priority.NOT_ANALYSED
    assert stat.rank == Priority.URGENT.rank
    plain = decide_priority(None, T, ReferralUrgency.ROUTINE)
    assert plain.rank == Priority.NOT_ANALYSED.rank
    breaching = decide_priority(None, T, ReferralUrgency.ROUTINE, days_waited=26)
    assert breaching.rank == Priority.URGENT.rank and breaching.priority is Priority.NOT_ANALYSED


def test_rank_of_an_analysed_study_is_its_flag_rank() -> None:
    for likelihood in (0.0, 0.4, 0.9):
        d = decide_priority(likelihood, T, ReferralUrgency.SOON, days_waited=3)
        assert d.rank == d.priority.rank


def test_one_urgency_ranking() -> None:
    assert [u.rank for u in ReferralUrgency] == [
        Priority.URGENT.rank,
        Priority.SOON.rank,
        Priority.ROUTINE.rank,
    ]
    assert sorted(Priority, key=lambda p: p.rank) == [
        Priority.URGENT,
        Priority.NOT_ANALYSED,
        Priority.SOON,
        Priority.ROUTINE,
    ]


@pytest.mark.parametrize(
    ("hl7", "fhir", "dicom", "expected"),
    [
        ("S", "stat", "STAT", ReferralUrgency.URGENT),
        ("A", "asap", "MEDIUM", ReferralUrgency.SOON),
        ("R", "urgent", "ROUTINE", None),
        ("", "routine", "", ReferralUrgency.ROUTINE),
    ],
)
def test_urgency_from_each_source(
    hl7: str, fhir: str, dicom: str, expected: ReferralUrgency | None
) -> None:
    if expected is None:  # FHIR urgent < asap: soon; HL7 R / DICOM ROUTINE: routine
        assert ReferralUrgency.from_fhir(fhir) is ReferralUrgency.SOON
        assert ReferralUrgency.from_hl7(hl7) is ReferralUrgency.ROUTINE
        return
    assert ReferralUrgency.from_hl7(hl7) is expected
    assert ReferralUrgency.from_fhir(fhir) is expected
    assert ReferralUrgency.from_dicom(dicom) is expected


def test_days_waited_is_a_function_of_today() -> None:
    from datetime import date

    from core.priority import days_waited

    requested = date(2026, 11, 1)
    assert days_waited(requested, date(2026, 11, 6)) == 5
    assert days_waited(requested, date(2026, 11, 27)) == 26
    assert days_waited(requested, date(2026, 10, 30)) is None  # in the future
    assert days_waited(requested, date(2027, 12, 1)) is None  # over a year: an archive study
    assert days_waited(None, date(2026, 11, 6)) is None


def test_policy_needs_a_pathway_at_least_as_long_as_the_fds() -> None:
    with pytest.raises(ValueError, match="pathway_days"):
        WaitingPolicy(fds_days=28, pathway_days=20)
    d = decide_priority(0.0, T, days_waited=70, suspected_cancer_pathway=True)
    assert any("62-day" in r for r in d.reasons)


def test_bad_triage_section_fails_at_start_up() -> None:
    from core.errors import ConfigError
    from core.settings import load_settings

    with pytest.raises(ConfigError, match="urgent_within_days"):
        load_settings(environ={"RADTRIAGE_TRIAGE__URGENT_WITHIN_DAYS": "9"})
    with pytest.raises(ConfigError, match="today"):
        load_settings(environ={"RADTRIAGE_TRIAGE__TODAY": "26/11/2026"})
    s = load_settings(environ={"RADTRIAGE_TRIAGE__TODAY": "2026-11-26"})
    assert s.triage.current_date().isoformat() == "2026-11-26"
    assert load_settings(environ={"RADTRIAGE_TRIAGE__TODAY": ""}).triage.today is None


def test_low_confidence_raises_an_analysed_study_to_soon_and_never_lowers() -> None:
    t = Thresholds(urgent=0.6, soon=0.3)
    low = decide_priority(0.1, t, low_confidence=True)
    assert low.priority is Priority.SOON
    assert any("low confidence" in r for r in low.reasons)
    assert decide_priority(0.9, t, low_confidence=True).priority is Priority.URGENT
    assert decide_priority(None, t, low_confidence=True).priority is Priority.NOT_ANALYSED


# --- drivers: every flag names what set it (issue 22) ---------------------------------------

from core.priority import Driver, Override  # noqa: E402

_T = Thresholds(urgent=0.7, soon=0.3)


def test_wait_clock_not_the_ai_drives_an_escalated_negative() -> None:
    d = decide_priority(0.0, _T, days_waited=26)
    assert d.priority is Priority.URGENT and d.ai_priority is Priority.ROUTINE
    assert d.drivers == (Driver.WAIT_CLOCK,)
    assert d.headline == "Urgent: waited 26 of 28 days (FDS)"


def test_referral_floor_drives_and_the_ai_opinion_stays_apart() -> None:
    d = decide_priority(0.5, _T, ReferralUrgency.URGENT)
    assert (d.priority, d.ai_priority) == (Priority.URGENT, Priority.SOON)
    assert d.drivers == (Driver.REFERRAL_FLOOR,) and d.headline == "Urgent: STAT referral"
    soon = decide_priority(0.1, _T, ReferralUrgency.SOON)
    assert soon.headline == "Soon: expedited referral"


def test_ai_drives_when_its_opinion_is_the_flag() -> None:
    d = decide_priority(0.81, _T, days_waited=27)
    assert d.drivers == (Driver.AI_SUSPICION, Driver.WAIT_CLOCK)
    assert d.headline == "Urgent: AI suspects csPCa (0.81)"


def test_low_confidence_gate_drives_a_routine_ai_to_soon() -> None:
    d = decide_priority(0.1, _T, low_confidence=True)
    assert d.priority is Priority.SOON and d.drivers == (Driver.LOW_CONFIDENCE,)
    assert d.headline == "Soon: AI result of low confidence"


def test_recorded_ai_opinion_needs_no_thresholds() -> None:
    d = decide_priority(0.2, None, ai_opinion=Priority.ROUTINE, days_waited=22)
    assert d.priority is Priority.SOON and d.drivers == (Driver.WAIT_CLOCK,)


def test_override_is_a_driver_and_a_breach_still_escalates_it() -> None:
    o = Override(Priority.ROUTINE, by="dr.jones", reason="benign on review")
    d = decide_priority(0.9, _T, days_waited=3, override=o)
    assert d.priority is Priority.ROUTINE and d.drivers == (Driver.HUMAN_OVERRIDE,)
    assert d.headline == "Routine: set by dr.jones" and d.ai_priority is Priority.URGENT
    late = decide_priority(0.9, _T, days_waited=26, override=o)
    assert late.priority is Priority.URGENT and late.drivers == (Driver.WAIT_CLOCK,)
    assert "escalated above the override" in " ".join(late.reasons)


def test_not_analysed_names_its_reason_and_what_ranks_it() -> None:
    d = decide_priority(None, None, ReferralUrgency.URGENT, not_analysed_reason="No ADC series")
    assert d.priority is Priority.NOT_ANALYSED and d.rank == Priority.URGENT.rank
    assert d.drivers == (Driver.NOT_ANALYSED, Driver.REFERRAL_FLOOR)
    assert d.headline == "Not analysed: No ADC series"
