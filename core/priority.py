"""Priority policy (pure): AI likelihood + referral urgency + days waited -> waiting-list flag.

Rules, in order:
1. No AI result -> `not_analysed` (never silent, never `routine`). Its *rank* still gets rules 3
   and 4: a STAT study the AI could not analyse is flagged `not_analysed` but ranks with the
   urgent ones (`PriorityDecision.rank`).
2. AI priority from the model's calibrated thresholds (`urgent` >= t_urgent > `soon` >= t_soon).
3. The referral's own urgency is a floor: AI raises, never lowers.
4. Waiting time against the NHS 28-day Faster Diagnosis Standard: within `escalate_within_days`
   of the breach a study is at least `soon`; within `urgent_within_days` of it (or past it) it is
   `urgent`. Escalating only to `soon` does nothing once the AI puts most studies at `soon` or
   above, so a study about to breach must jump the whole queue. A suspected-cancer referral
   still waiting past the 62-day pathway target says so in its reasons.

Every decision names its drivers (`Driver`): the rules that set the final flag, first the one
that set it (its headline, e.g. "Urgent: waited 26 of 28 days (FDS)"), so no output blames the
AI for what the wait clock or the referral decided. The AI's own opinion (`ai_priority`) stays a
separate field. A radiologist's override (`Override`) replaces the AI, referral and gate; a
later wait-clock breach still escalates the study above it, and says so.

Days waited are a function of time (`days_waited`): the waiting list recomputes the decision
from the order's request date and today's date (an injectable clock), so a study routine on
day 5 is urgent on day 26 without being analysed again. Thresholds come from the model's
metadata (chosen by `radtriage evaluate`), never from code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from enum import StrEnum

from core.domain import Priority, ReferralUrgency, most_urgent

#: A request older than this is an archive study re-sent, not a waiting patient.
STALE_REQUEST_DAYS = 365

# The waiting standards' defaults, in one place (`WaitingPolicy`, `[triage]`, the simulation):
FDS_DAYS = 28  #: NHS Faster Diagnosis Standard: diagnosis within 28 days of referral
ESCALATE_WITHIN_DAYS = 7  #: at least `soon` this many days before the FDS breach
URGENT_WITHIN_DAYS = 3  #: `urgent` this many days before the breach (or past it)
PATHWAY_DAYS = 62  #: suspected-cancer pathway target, referral to treatment


@dataclass(frozen=True)
class Thresholds:
    """Case-likelihood operating points of one model version."""

    urgent: float
    soon: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.soon <= self.urgent <= 1.0:
            raise ValueError(
                f"thresholds must satisfy 0 <= soon <= urgent <= 1, got soon={self.soon}, "
                f"urgent={self.urgent}"
            )


@dataclass(frozen=True)
class WaitingPolicy:
    """The site's waiting-list rules (`[triage]`)."""

    fds_days: int = FDS_DAYS
    escalate_within_days: int = ESCALATE_WITHIN_DAYS
    urgent_within_days: int = URGENT_WITHIN_DAYS
    pathway_days: int = PATHWAY_DAYS

    def __post_init__(self) -> None:
        if not 0 <= self.urgent_within_days <= self.escalate_within_days <= self.fds_days:
            raise ValueError(
                "need 0 <= urgent_within_days <= escalate_within_days <= fds_days, got "
                f"{self.urgent_within_days}, {self.escalate_within_days}, {self.fds_days}"
            )
        if self.pathway_days < self.fds_days:
            raise ValueError(
                f"pathway_days ({self.pathway_days}) must be >= fds_days ({self.fds_days})"
            )

    @property
    def soon_from_day(self) -> int:
        """Days waited from which a study is at least `soon`."""
        return self.fds_days - self.escalate_within_days

    @property
    def urgent_from_day(self) -> int:
        """Days waited from which a study is `urgent` (its escalation date)."""
        return self.fds_days - self.urgent_within_days

    def wait_floor(self, days: int | None) -> Priority:
        if days is None or days < self.soon_from_day:
            return Priority.ROUTINE
        return Priority.URGENT if days >= self.urgent_from_day else Priority.SOON


class Driver(StrEnum):
    """What set a study's flag (coded in every output: `core.codes.DRIVER_CODES`)."""

    AI_SUSPICION = "ai_suspicion"
    REFERRAL_FLOOR = "referral_floor"
    WAIT_CLOCK = "wait_clock"
    LOW_CONFIDENCE = "low_confidence"
    NOT_ANALYSED = "not_analysed"
    HUMAN_OVERRIDE = "human_override"


#: Words for a referral urgency in a headline ("Urgent: STAT referral").
REFERRAL_WORDS = {
    ReferralUrgency.URGENT: "STAT referral",
    ReferralUrgency.SOON: "expedited referral",
    ReferralUrgency.ROUTINE: "routine referral",
}
_AI_WORDS = {
    Priority.URGENT: "AI suspects csPCa",
    Priority.SOON: "AI intermediate csPCa suspicion",
    Priority.ROUTINE: "AI low csPCa suspicion",
}
FLAG_WORDS = {
    Priority.URGENT: "Urgent",
    Priority.SOON: "Soon",
    Priority.ROUTINE: "Routine",
    Priority.NOT_ANALYSED: "Not analysed",
}


@dataclass(frozen=True)
class Override:
    """A radiologist's flag for a study, with who set it and why."""

    priority: Priority
    by: str
    reason: str = ""

    def __post_init__(self) -> None:
        if self.priority is Priority.NOT_ANALYSED:
            raise ValueError("an override sets urgent, soon or routine")
        if not self.by:
            raise ValueError("an override needs the user who made it")


@dataclass(frozen=True)
class PriorityDecision:
    """The flag shown, the rank used for ordering (lowest first), what set it and why.

    `drivers`: the rules that set the final flag, the deciding one first; `headline`: the flag
    in words naming that driver; `ai_priority`: the AI's own opinion (None when not analysed).
    """

    priority: Priority
    reasons: tuple[str, ...]
    rank: int
    drivers: tuple[Driver, ...] = ()
    headline: str = ""
    ai_priority: Priority | None = None

    def __post_init__(self) -> None:
        if self.rank > self.priority.rank:
            raise ValueError(f"rank {self.rank} is below the flag's own rank ({self.priority})")


def days_waited(request_date: date | None, today: date) -> int | None:
    """Days from the imaging request to `today`: the waiting-list clock. None without a date,
    for a date in the future, or for a request over `STALE_REQUEST_DAYS` old."""
    if request_date is None or request_date > today:
        return None
    days = (today - request_date).days
    return None if days > STALE_REQUEST_DAYS else days


def ai_priority(likelihood: float, thresholds: Thresholds) -> Priority:
    """The AI's own opinion, before referral urgency and waiting time."""
    if not 0.0 <= likelihood <= 1.0:
        raise ValueError(f"likelihood must be in [0, 1], got {likelihood}")
    if likelihood >= thresholds.urgent:
        return Priority.URGENT
    if likelihood >= thresholds.soon:
        return Priority.SOON
    return Priority.ROUTINE


def decide_priority(
    likelihood: float | None,
    thresholds: Thresholds | None,
    referral: ReferralUrgency = ReferralUrgency.ROUTINE,
    days_waited: int | None = None,
    policy: WaitingPolicy = WaitingPolicy(),
    *,
    suspected_cancer_pathway: bool = False,
    low_confidence: bool = False,
    ai_opinion: Priority | None = None,
    override: Override | None = None,
    not_analysed_reason: str = "",
) -> PriorityDecision:
    """Combine the inputs; `reasons` says which rule set the result, `drivers` codes it.

    The AI's opinion is `ai_opinion` when given (recorded at analysis, so a re-decision never
    re-reads thresholds), else the likelihood against `thresholds`. `low_confidence` (the
    model's domain gate): an analysed study is at least `soon`, never lowered. `override`: a
    radiologist's flag, below only a wait-clock escalation. `not_analysed_reason`: words for
    the headline of a study the AI could not analyse.
    """
    reasons: list[str] = []
    floor = referral.floor
    wait_floor = policy.wait_floor(days_waited)
    wait_reason = f"waited {days_waited} days against the {policy.fds_days}-day standard"
    wait_words = f"waited {days_waited} of {policy.fds_days} days (FDS)"
    candidates: list[tuple[Driver, Priority, str]] = []  # (driver, its level, headline words)
    ai: Priority | None = None
    if override is not None:
        result = override.priority
        why = f": {override.reason}" if override.reason else ""
        reasons.append(f"set to {result.value} by {override.by}{why}")
        candidates.append((Driver.HUMAN_OVERRIDE, result, f"set by {override.by}"))
        if likelihood is not None or ai_opinion is not None:
            ai = ai_opinion or ai_priority(likelihood or 0.0, _required(thresholds))
        if most_urgent(result, wait_floor) is not result:
            result = wait_floor
            reasons.append(wait_reason + " (escalated above the override)")
            candidates.append((Driver.WAIT_CLOCK, wait_floor, wait_words))
        rank = result.rank
    elif likelihood is None and ai_opinion is None:
        reasons.append("AI could not analyse this study")
        words = not_analysed_reason or "AI could not analyse this study"
        candidates.append((Driver.NOT_ANALYSED, Priority.NOT_ANALYSED, words))
        rank = Priority.NOT_ANALYSED.rank
        if floor.rank < rank:
            rank = floor.rank
            reasons.append(f"referral urgency {referral.value} ranks it")
            candidates.append((Driver.REFERRAL_FLOOR, Priority.NOT_ANALYSED, ""))
        if wait_floor.rank < rank:
            rank = wait_floor.rank
            reasons.append(wait_reason)
            candidates.append((Driver.WAIT_CLOCK, Priority.NOT_ANALYSED, ""))
        result = Priority.NOT_ANALYSED
    else:
        if ai_opinion is not None:
            ai = ai_opinion
            shown = f"{likelihood:.2f}" if likelihood is not None else "recorded"
            reasons.append(f"AI csPCa likelihood {shown} -> {ai.value}")
        else:
            assert likelihood is not None
            t = _required(thresholds)
            ai = ai_priority(likelihood, t)
            reasons.append(
                f"AI csPCa likelihood {likelihood:.2f} -> {ai.value} "
                f"(thresholds urgent>={t.urgent:.2f}, soon>={t.soon:.2f})"
            )
        score = f" ({likelihood:.2f})" if likelihood is not None else ""
        candidates.append((Driver.AI_SUSPICION, ai, _AI_WORDS[ai] + score))
        result = ai
        if most_urgent(result, floor) is not result:
            result = floor
            reasons.append(f"referral urgency {referral.value} is the floor")
        candidates.append((Driver.REFERRAL_FLOOR, floor, REFERRAL_WORDS[referral]))
        if most_urgent(result, wait_floor) is not result:
            result = wait_floor
            reasons.append(wait_reason)
        if wait_floor is not Priority.ROUTINE:
            candidates.append((Driver.WAIT_CLOCK, wait_floor, wait_words))
        if low_confidence and most_urgent(result, Priority.SOON) is not result:
            result = Priority.SOON
            reasons.append("low confidence: the study lies near the edge of the model's domain")
        if low_confidence:
            candidates.append((Driver.LOW_CONFIDENCE, Priority.SOON, "AI result of low confidence"))
        rank = result.rank
    if suspected_cancer_pathway and days_waited is not None and days_waited >= policy.pathway_days:
        reasons.append(f"past the {policy.pathway_days}-day suspected-cancer pathway target")
    drivers, headline = _drivers(result, candidates)
    return PriorityDecision(result, tuple(reasons), rank, drivers, headline, ai)


def _required(thresholds: Thresholds | None) -> Thresholds:
    if thresholds is None:
        raise ValueError("an AI likelihood needs the model's thresholds to set a priority")
    return thresholds


def _drivers(
    result: Priority, candidates: list[tuple[Driver, Priority, str]]
) -> tuple[tuple[Driver, ...], str]:
    """The drivers whose level is the final flag, the deciding one first, and the headline.

    Precedence when several reach the flag: a human, then the AI when its own opinion is the
    flag (the clinical finding), the referral, the wait clock, the gate; a routine flag is the
    AI's (or the human's) alone. A not-analysed study's drivers also name what ranks it."""
    order = [
        Driver.HUMAN_OVERRIDE,
        Driver.NOT_ANALYSED,
        Driver.AI_SUSPICION,
        Driver.REFERRAL_FLOOR,
        Driver.WAIT_CLOCK,
        Driver.LOW_CONFIDENCE,
    ]
    if result is Priority.ROUTINE:
        order = [Driver.HUMAN_OVERRIDE, Driver.AI_SUSPICION]
    reached = [c for c in candidates if c[1] is result]
    reached.sort(key=lambda c: order.index(c[0]) if c[0] in order else len(order))
    reached = [c for c in reached if c[0] in order]
    if not reached:  # cannot happen: some rule set the flag
        raise ValueError(f"no rule reached {result.value}")
    words = reached[0][2]
    return tuple(c[0] for c in reached), f"{FLAG_WORDS[result]}: {words}"
