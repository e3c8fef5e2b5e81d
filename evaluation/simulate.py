"""Discrete-event simulation of an MRI reporting queue: FIFO vs referral-only vs AI priority.

Model (one event per patient arrival, one per reporting day):

- Scans arrive as a Poisson process (`arrivals_per_day`, every calendar day). Each patient has
  csPCa with probability `prevalence` and a referral urgency drawn from `referral_mix`. The NHS
  Faster Diagnosis Standard (FDS) clock started at referral, `referral_to_scan_days` before the
  scan, so a report later than `fds_days - referral_to_scan_days` days after the scan breaches.
- On each working day (Mon-Fri) radiologists report `reports_per_working_day` studies from the
  queue, in the order of the arm's rule:
  - `fifo`: scan order only;
  - `referral`: `core.priority.decide_priority` without AI (referral urgency floor and the FDS
    wait escalation), then scan order - today's practice;
  - `ai`: `core.priority.decide_priority` with the AI likelihood, then scan order.
- The AI likelihood of a patient is drawn either from measured per-case likelihoods of
  evaluated cases (by class) or from the model's measured sensitivity/specificity at the two
  thresholds (a likelihood inside the band the model would have put the study in).

The same patients (common random numbers) go through every arm, so arm differences are not
sampling noise. Arrivals stop after `days`; the queue is then drained so every patient counts,
and patients arriving in the first `warmup_days` are left out of the statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

import numpy as np

from core.domain import Priority, ReferralUrgency
from core.priority import (
    ESCALATE_WITHIN_DAYS,
    FDS_DAYS,
    URGENT_WITHIN_DAYS,
    Thresholds,
    WaitingPolicy,
    ai_priority,
    decide_priority,
)

ARMS = ("fifo", "referral", "ai")


@dataclass(frozen=True)
class SimulationParams:
    """Parameters of one simulation; defaults describe an NHS-like, near-capacity service."""

    days: int = 365
    warmup_days: int = 60
    arrivals_per_day: float = 20.0
    reports_per_working_day: float = 29.0
    initial_backlog: int = 300  # studies waiting on day 0: a standing ~2-week backlog
    prevalence: float = 0.35
    referral_mix: dict[str, float] = field(
        default_factory=lambda: {"urgent": 0.1, "soon": 0.2, "routine": 0.7}
    )
    referral_to_scan_days: int = 14
    fds_days: int = FDS_DAYS
    escalate_within_days: int = ESCALATE_WITHIN_DAYS
    urgent_within_days: int = URGENT_WITHIN_DAYS
    # the AI model: thresholds and measured operating points (from `radtriage evaluate`)
    urgent_threshold: float = 0.6
    soon_threshold: float = 0.3
    sensitivity_urgent: float = 0.75
    specificity_urgent: float = 0.90
    sensitivity_soon: float = 0.95
    specificity_soon: float = 0.50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.days <= 0 or not 0 <= self.warmup_days < self.days:
            raise ValueError("need days > 0 and 0 <= warmup_days < days")
        if self.arrivals_per_day <= 0 or self.reports_per_working_day <= 0:
            raise ValueError("arrivals_per_day and reports_per_working_day must be positive")
        if not 0 <= self.prevalence <= 1:
            raise ValueError("prevalence must be in [0, 1]")
        mix = self.referral_mix
        if set(mix) - {u.value for u in ReferralUrgency} or abs(sum(mix.values()) - 1) > 1e-6:
            raise ValueError("referral_mix must map urgent/soon/routine to fractions summing to 1")
        if not self.sensitivity_urgent <= self.sensitivity_soon:
            raise ValueError("sensitivity at urgent cannot exceed sensitivity at soon")
        if not self.specificity_soon <= self.specificity_urgent:
            raise ValueError("specificity at soon cannot exceed specificity at urgent")
        for name in (
            "sensitivity_urgent",
            "specificity_urgent",
            "sensitivity_soon",
            "specificity_soon",
        ):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1]")
        Thresholds(urgent=self.urgent_threshold, soon=self.soon_threshold)

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(urgent=self.urgent_threshold, soon=self.soon_threshold)

    @property
    def policy(self) -> WaitingPolicy:
        return WaitingPolicy(self.fds_days, self.escalate_within_days, self.urgent_within_days)

    @property
    def report_deadline_days(self) -> int:
        """Days from scan to report before the FDS clock breaches."""
        return self.fds_days - self.referral_to_scan_days


@dataclass(frozen=True, eq=False)
class Patients:
    arrival: np.ndarray  # days (float), sorted
    is_cspca: np.ndarray  # bool
    referral: tuple[ReferralUrgency, ...]
    likelihood: np.ndarray  # AI case likelihood 0..1


def _band_likelihood(band: Priority, t: Thresholds) -> float:
    """A likelihood inside the band (what the model output for a study put in that band)."""
    if band is Priority.URGENT:
        return (t.urgent + 1.0) / 2
    if band is Priority.SOON:
        return (t.soon + t.urgent) / 2
    return t.soon / 2


def generate_patients(
    p: SimulationParams,
    likelihoods: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Patients:
    """Arrivals, truth, referral urgency and AI likelihood; `likelihoods` = (csPCa, non-csPCa)."""
    rng = np.random.default_rng(p.seed)
    n = int(rng.poisson(p.arrivals_per_day * p.days))
    arrival = np.sort(rng.uniform(0.0, p.days, n))
    if p.initial_backlog:
        arrival = np.concatenate([-rng.uniform(0, 1, p.initial_backlog), arrival])
        arrival.sort()
        n = arrival.size
    cspca = rng.random(n) < p.prevalence
    names = sorted(p.referral_mix)
    picks = rng.choice(len(names), size=n, p=[p.referral_mix[k] for k in names])
    referral = tuple(ReferralUrgency(names[i]) for i in picks)
    u = rng.random(n)
    if likelihoods is not None:
        pos, neg = (np.asarray(v, dtype=float) for v in likelihoods)
        if pos.size == 0 or neg.size == 0:
            raise ValueError("need measured likelihoods for both csPCa and non-csPCa cases")
        lik = np.where(cspca, pos[rng.integers(0, pos.size, n)], neg[rng.integers(0, neg.size, n)])
    else:
        t = p.thresholds
        p_urgent = np.where(cspca, p.sensitivity_urgent, 1 - p.specificity_urgent)
        p_soon_or_more = np.where(cspca, p.sensitivity_soon, 1 - p.specificity_soon)
        band = np.where(u < p_urgent, 2, np.where(u < p_soon_or_more, 1, 0))
        values = np.array(
            [_band_likelihood(b, t) for b in (Priority.ROUTINE, Priority.SOON, Priority.URGENT)]
        )
        lik = values[band]
    return Patients(arrival, cspca, referral, lik)


def _working_day(day: int) -> bool:
    return day % 7 < 5  # day 0 is a Monday


def queue_rank(
    likelihood: float | None,
    thresholds: Thresholds,
    referral: ReferralUrgency,
    waited: int,
    policy: WaitingPolicy,
) -> int:
    """A patient's place in the queue: `core.priority.decide_priority`'s rank, the function
    the live waiting list (`triage.waiting_list`) ranks studies with."""
    return decide_priority(likelihood, thresholds, referral, waited, policy).rank


def run_arm(arm: str, patients: Patients, p: SimulationParams) -> np.ndarray:
    """Days from scan to report for every patient under the arm's ordering rule."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")
    thresholds, policy = p.thresholds, p.policy

    @cache
    def rank(band: Priority, referral: ReferralUrgency, waited: int) -> int:
        likelihood = 0.0 if arm == "referral" else _band_likelihood(band, thresholds)
        return queue_rank(likelihood, thresholds, referral, waited, policy)

    bands = [ai_priority(float(v), thresholds) for v in patients.likelihood]
    n = patients.arrival.size
    report = np.full(n, np.nan)
    queue: list[int] = []
    nxt = 0
    day = int(np.floor(patients.arrival.min())) if n else 0
    capacity_carry = 0.0
    while nxt < n or queue:
        while nxt < n and patients.arrival[nxt] < day:
            queue.append(nxt)
            nxt += 1
        if _working_day(day) and queue:
            capacity_carry += p.reports_per_working_day
            slots = int(capacity_carry)
            capacity_carry -= slots
            if arm != "fifo":
                cap = policy.fds_days + 1
                waited = p.referral_to_scan_days

                def key(i: int, d: int = day, w: int = waited, c: int = cap) -> tuple[int, float]:
                    days_waited = min(c, w + int(d - patients.arrival[i]))
                    return (rank(bands[i], patients.referral[i], days_waited), patients.arrival[i])

                queue.sort(key=key)
            done, queue = queue[:slots], queue[slots:]
            for i in done:
                report[i] = day + 1 - patients.arrival[i]  # reported by the end of the day
        day += 1
    return report


def _stats(wait: np.ndarray, deadline: int) -> dict[str, Any]:
    if wait.size == 0:
        return {
            "n": 0,
            "median_days": None,
            "p90_days": None,
            "mean_days": None,
            "fds_breaches": 0,
            "fds_breach_fraction": None,
        }
    breaches = int(np.sum(wait > deadline))
    return {
        "n": int(wait.size),
        "median_days": float(np.median(wait)),
        "p90_days": float(np.percentile(wait, 90)),
        "mean_days": float(np.mean(wait)),
        "fds_breaches": breaches,
        "fds_breach_fraction": breaches / wait.size,
    }


@dataclass(frozen=True, eq=False)
class SimulationResult:
    params: SimulationParams
    waits: dict[str, np.ndarray]  # arm -> days to report, per patient
    patients: Patients
    included: np.ndarray  # bool: arrived after warm-up
    likelihood_source: str

    def summary(self) -> dict[str, Any]:
        deadline = self.params.report_deadline_days
        cs, inc = self.patients.is_cspca, self.included
        arms = {
            arm: {
                "cspca": _stats(w[inc & cs], deadline),
                "non_cspca": _stats(w[inc & ~cs], deadline),
                "all": _stats(w[inc], deadline),
            }
            for arm, w in self.waits.items()
        }
        effect = {}
        for base in ("fifo", "referral"):
            if base in arms and "ai" in arms:
                effect[f"ai_vs_{base}"] = {
                    group: {
                        "median_days": _diff(arms["ai"][group], arms[base][group], "median_days"),
                        "p90_days": _diff(arms["ai"][group], arms[base][group], "p90_days"),
                        "fds_breaches": _diff(arms["ai"][group], arms[base][group], "fds_breaches"),
                    }
                    for group in ("cspca", "non_cspca", "all")
                }
        params = asdict(self.params)
        return {
            "params": params,
            "likelihood_source": self.likelihood_source,
            "report_deadline_days": deadline,
            "utilisation": self.params.arrivals_per_day
            * 7
            / (self.params.reports_per_working_day * 5),
            "arms": arms,
            "effect": effect,
        }


def _diff(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if a[key] is None or b[key] is None:
        return None
    return float(a[key] - b[key])


def simulate(
    params: SimulationParams | None = None,
    *,
    likelihoods: tuple[Sequence[float], Sequence[float]] | None = None,
    arms: Sequence[str] = ARMS,
) -> SimulationResult:
    """Run every arm on the same simulated patients."""
    p = params or SimulationParams()
    patients = generate_patients(p, likelihoods)
    waits = {arm: run_arm(arm, patients, p) for arm in arms}
    included = patients.arrival >= p.warmup_days
    source = "per-case likelihoods" if likelihoods is not None else "sensitivity/specificity"
    return SimulationResult(p, waits, patients, included, source)


def format_table(summary: dict[str, Any]) -> str:
    """Plain-text table of days-to-report and FDS breaches per arm and patient group."""
    lines = [
        f"{'arm':<9} {'group':<10} {'n':>6} {'median d':>9} {'p90 d':>7} {'FDS breaches':>13}",
    ]
    for arm, groups in summary["arms"].items():
        for group in ("cspca", "non_cspca"):
            s = groups[group]
            if not s["n"]:
                continue
            lines.append(
                f"{arm:<9} {group:<10} {s['n']:>6} {s['median_days']:>9.1f} {s['p90_days']:>7.1f}"
                f" {s['fds_breaches']:>6} ({s['fds_breach_fraction']:>5.1%})"
            )
    lines.append(
        f"utilisation {summary['utilisation']:.2f}; report deadline "
        f"{summary['report_deadline_days']} days after the scan (FDS)"
    )
    return "\n".join(lines)


def plot(result: SimulationResult, path: str | None = None) -> bytes:
    """ECDFs of days-to-report for csPCa and non-csPCa patients per arm; PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.summary()
    deadline = result.params.report_deadline_days
    colours = {"fifo": "tab:gray", "referral": "tab:blue", "ai": "tab:red"}
    labels = {"fifo": "FIFO", "referral": "referral urgency only", "ai": "AI priority"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    cs, inc = result.patients.is_cspca, result.included
    for ax, mask, title in (
        (axes[0], inc & cs, "csPCa patients"),
        (axes[1], inc & ~cs, "non-csPCa patients"),
    ):
        for arm, w in result.waits.items():
            x = np.sort(w[mask])
            if x.size:
                ax.step(
                    x,
                    np.arange(1, x.size + 1) / x.size,
                    where="post",
                    color=colours.get(arm),
                    label=labels.get(arm, arm),
                )
        ax.axvline(deadline, color="k", ls="--", lw=1)
        ax.text(deadline, 0.5, f" FDS\n deadline\n ({deadline} d)", fontsize=8)
        ax.set(
            title=title,
            xlabel="days from scan to report",
            ylabel="fraction reported",
            ylim=(0, 1.01),
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    ax = axes[2]
    arms = list(result.waits)
    width = 0.2
    for j, (group, hatch) in enumerate((("cspca", ""), ("non_cspca", "//"))):
        for k, stat in enumerate(("median_days", "p90_days")):
            vals = [summary["arms"][a][group][stat] or 0 for a in arms]
            pos = np.arange(len(arms)) + (j * 2 + k - 1.5) * width
            ax.bar(
                pos,
                vals,
                width,
                hatch=hatch,
                alpha=0.5 if stat == "median_days" else 0.9,
                color=[colours.get(a) for a in arms],
                label=f"{group.replace('_', '-')} {stat.split('_')[0]}",
            )
    ax.set_xticks(np.arange(len(arms)), [labels.get(a, a) for a in arms], fontsize=8)
    ax.axhline(deadline, color="k", ls="--", lw=1)
    ax.set(title="median / 90th percentile days", ylabel="days")
    ax.legend(fontsize=7, loc="upper left")
    p = result.params
    fig.suptitle(
        f"Simulated reporting queue: {p.arrivals_per_day:g} scans/day, "
        f"{p.reports_per_working_day:g} reports/working day, csPCa prevalence {p.prevalence:.0%}"
        f", AI from {result.likelihood_source} (seed {p.seed})",
        fontsize=10,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    data = buf.getvalue()
    if path:
        with open(path, "wb") as fh:
            fh.write(data)
    return data
