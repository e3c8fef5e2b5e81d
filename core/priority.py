"""Priority policy (pure): AI likelihood + referral urgency + days waited -> waiting-list flag.

Rules, in order:
1. No AI result -> `not_analysed` (never silent, never `routine`).
2. AI priority from the model's calibrated thresholds (`urgent` >= t_urgent > `soon` >= t_soon).
3. The referral's own urgency is a floor: AI raises, never lowers.
4. Waiting time against the NHS 28-day Faster Diagnosis Standard: within `escalate_within_days`
   of the breach a study is at least `soon`; within `urgent_within_days` of it (or past it) it is
   `urgent`. Escalating only to `soon` does nothing once the AI puts most studies at `soon` or
   above, so a study about to breach must jump the whole queue.

Thresholds come from the model's metadata (chosen by `radtriage evaluate`), never from code.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.domain import Priority, ReferralUrgency

_ORDER = (Priority.ROUTINE, Priority.SOON, Priority.URGENT)  # increasing urgency


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
    fds_days: int = 28
    escalate_within_days: int = 7
    urgent_within_days: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.urgent_within_days <= self.escalate_within_days <= self.fds_days:
            raise ValueError(
                "need 0 <= urgent_within_days <= escalate_within_days <= fds_days, got "
                f"{self.urgent_within_days}, {self.escalate_within_days}, {self.fds_days}"
            )


@dataclass(frozen=True)
class PriorityDecision:
    priority: Priority
    reasons: tuple[str, ...]


def ai_priority(likelihood: float, thresholds: Thresholds) -> Priority:
    """The AI's own opinion, before referral urgency and waiting time."""
    if not 0.0 <= likelihood <= 1.0:
        raise ValueError(f"likelihood must be in [0, 1], got {likelihood}")
    if likelihood >= thresholds.urgent:
        return Priority.URGENT
    if likelihood >= thresholds.soon:
        return Priority.SOON
    return Priority.ROUTINE


def _max(a: Priority, b: Priority) -> Priority:
    return a if _ORDER.index(a) >= _ORDER.index(b) else b


def decide_priority(
    likelihood: float | None,
    thresholds: Thresholds,
    referral: ReferralUrgency = ReferralUrgency.ROUTINE,
    days_waited: int | None = None,
    policy: WaitingPolicy = WaitingPolicy(),
) -> PriorityDecision:
    """Combine the three inputs; `reasons` says which rule set the result."""
    if likelihood is None:
        return PriorityDecision(Priority.NOT_ANALYSED, ("AI could not analyse this study",))
    ai = ai_priority(likelihood, thresholds)
    reasons = [
        f"AI csPCa likelihood {likelihood:.2f} -> {ai.value} "
        f"(thresholds urgent>={thresholds.urgent:.2f}, soon>={thresholds.soon:.2f})"
    ]
    result = ai
    floor = Priority(referral.value)
    if _max(result, floor) != result:
        result = floor
        reasons.append(f"referral urgency {referral.value} is the floor")
    if days_waited is not None:
        if days_waited >= policy.fds_days - policy.urgent_within_days:
            wait_floor = Priority.URGENT
        elif days_waited >= policy.fds_days - policy.escalate_within_days:
            wait_floor = Priority.SOON
        else:
            wait_floor = Priority.ROUTINE
        if _max(result, wait_floor) != result:
            result = wait_floor
            reasons.append(f"waited {days_waited} days against the {policy.fds_days}-day standard")
    return PriorityDecision(result, tuple(reasons))
