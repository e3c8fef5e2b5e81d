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

Days waited are a function of time (`days_waited`): the waiting list recomputes the decision
from the order's request date and today's date (an injectable clock), so a study routine on
day 5 is urgent on day 26 without being analysed again. Thresholds come from the model's
metadata (chosen by `radtriage evaluate`), never from code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from core.domain import Priority, ReferralUrgency, most_urgent

#: A request older than this is an archive study re-sent, not a waiting patient.
STALE_REQUEST_DAYS = 365


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

    fds_days: int = 28
    escalate_within_days: int = 7
    urgent_within_days: int = 3
    pathway_days: int = 62

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


@dataclass(frozen=True)
class PriorityDecision:
    """The flag shown, the rank used for ordering (lowest first) and why."""

    priority: Priority
    reasons: tuple[str, ...]
    rank: int

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
) -> PriorityDecision:
    """Combine the three inputs; `reasons` says which rule set the result. `low_confidence`
    (the model's domain gate): an analysed study is at least `soon`, never lowered."""
    reasons: list[str] = []
    floor = referral.floor
    wait_floor = policy.wait_floor(days_waited)
    wait_reason = f"waited {days_waited} days against the {policy.fds_days}-day standard"
    if likelihood is None:
        reasons.append("AI could not analyse this study")
        rank = Priority.NOT_ANALYSED.rank
        if floor.rank < rank:
            rank = floor.rank
            reasons.append(f"referral urgency {referral.value} ranks it")
        if wait_floor.rank < rank:
            rank = wait_floor.rank
            reasons.append(wait_reason)
        result = Priority.NOT_ANALYSED
    else:
        if thresholds is None:
            raise ValueError("an AI likelihood needs the model's thresholds to set a priority")
        ai = ai_priority(likelihood, thresholds)
        reasons.append(
            f"AI csPCa likelihood {likelihood:.2f} -> {ai.value} "
            f"(thresholds urgent>={thresholds.urgent:.2f}, soon>={thresholds.soon:.2f})"
        )
        result = ai
        if most_urgent(result, floor) is not result:
            result = floor
            reasons.append(f"referral urgency {referral.value} is the floor")
        if most_urgent(result, wait_floor) is not result:
            result = wait_floor
            reasons.append(wait_reason)
        if low_confidence and most_urgent(result, Priority.SOON) is not result:
            result = Priority.SOON
            reasons.append("low confidence: the study lies near the edge of the model's domain")
        rank = result.rank
    if suspected_cancer_pathway and days_waited is not None and days_waited >= policy.pathway_days:
        reasons.append(f"past the {policy.pathway_days}-day suspected-cancer pathway target")
    return PriorityDecision(result, tuple(reasons), rank)
