"""`radtriage simulate`: waiting-list simulation, FIFO vs referral-only vs AI priority."""

from __future__ import annotations

import argparse
import json
from typing import Any

from core.errors import InputError


def register(subparsers: Any) -> None:
    d = _defaults()
    p = subparsers.add_parser(
        "simulate",
        help="discrete-event simulation of an MRI reporting queue with and without AI priority",
        description="Simulate a reporting queue (Poisson arrivals, daily reporting capacity, "
        "NHS 28-day Faster Diagnosis Standard clock) under FIFO, referral-urgency-only and AI "
        "priority (core.priority.decide_priority). Reports days-to-report for csPCa and "
        "non-csPCa patients and FDS breaches. See docs/simulation.md.",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="write the plot here")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--days", type=int, default=d.days, help="days with arrivals")
    p.add_argument("--warmup-days", type=int, default=d.warmup_days)
    p.add_argument("--arrivals-per-day", type=float, default=d.arrivals_per_day)
    p.add_argument(
        "--reports-per-day",
        type=float,
        default=d.reports_per_working_day,
        help="reports per working day (Mon-Fri)",
    )
    p.add_argument("--initial-backlog", type=int, default=d.initial_backlog)
    p.add_argument("--prevalence", type=float, default=d.prevalence, help="csPCa prevalence")
    p.add_argument(
        "--referral-mix",
        default=",".join(f"{k}={v}" for k, v in d.referral_mix.items()),
        help="fractions of referral urgency, e.g. urgent=0.1,soon=0.2,routine=0.7",
    )
    p.add_argument("--referral-to-scan-days", type=int, default=d.referral_to_scan_days)
    p.add_argument("--fds-days", type=int, default=d.fds_days)
    p.add_argument(
        "--escalate-within-days",
        type=int,
        default=d.escalate_within_days,
        help="raise to at least soon this many days before the FDS breach",
    )
    p.add_argument(
        "--urgent-within-days",
        type=int,
        default=d.urgent_within_days,
        help="raise to urgent this many days before the FDS breach",
    )
    p.add_argument("--urgent-threshold", type=float, default=d.urgent_threshold)
    p.add_argument("--soon-threshold", type=float, default=d.soon_threshold)
    p.add_argument("--sensitivity-urgent", type=float, default=d.sensitivity_urgent)
    p.add_argument("--specificity-urgent", type=float, default=d.specificity_urgent)
    p.add_argument("--sensitivity-soon", type=float, default=d.sensitivity_soon)
    p.add_argument("--specificity-soon", type=float, default=d.specificity_soon)
    p.add_argument(
        "--from-evaluation",
        metavar="EVAL.json",
        help="use the per-case likelihoods and thresholds of a `radtriage evaluate "
        "--json` output instead of the sensitivity/specificity arguments",
    )
    p.set_defaults(func=handle)


def _defaults() -> Any:
    from evaluation.simulate import SimulationParams

    return SimulationParams()


def _mix(text: str) -> dict[str, float]:
    try:
        pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError as exc:
        raise InputError(
            f"--referral-mix must look like urgent=0.1,soon=0.2,routine=0.7: {exc}"
        ) from exc


def handle(args: argparse.Namespace) -> int:
    from evaluation.simulate import SimulationParams, format_table, plot, simulate

    likelihoods = None
    thresholds: dict[str, float] = {}
    if args.from_evaluation:
        try:
            with open(args.from_evaluation) as fh:
                doc = json.load(fh)
            cases = doc["cases"]
            pos = [c["likelihood"] for c in cases if c["is_cspca"]]
            neg = [c["likelihood"] for c in cases if not c["is_cspca"]]
            t = doc.get("thresholds") or {}
            thresholds = {k: t[k]["threshold"] for k in ("urgent", "soon") if t.get(k)}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"cannot read per-case likelihoods from {args.from_evaluation}: "
                f"{exc}; pass the output of `radtriage evaluate --json`"
            ) from exc
        likelihoods = (pos, neg)
    try:
        params = SimulationParams(
            days=args.days,
            warmup_days=args.warmup_days,
            arrivals_per_day=args.arrivals_per_day,
            reports_per_working_day=args.reports_per_day,
            initial_backlog=args.initial_backlog,
            prevalence=args.prevalence,
            referral_mix=_mix(args.referral_mix),
            referral_to_scan_days=args.referral_to_scan_days,
            fds_days=args.fds_days,
            escalate_within_days=args.escalate_within_days,
            urgent_within_days=args.urgent_within_days,
            urgent_threshold=thresholds.get("urgent", args.urgent_threshold),
            soon_threshold=thresholds.get("soon", args.soon_threshold),
            sensitivity_urgent=args.sensitivity_urgent,
            specificity_urgent=args.specificity_urgent,
            sensitivity_soon=args.sensitivity_soon,
            specificity_soon=args.specificity_soon,
            seed=args.seed,
        )
        result = simulate(params, likelihoods=likelihoods)
    except ValueError as exc:
        raise InputError(f"invalid simulation parameters: {exc}") from exc
    summary = result.summary()
    if args.plot:
        plot(result, args.plot)
        summary["plot"] = args.plot
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0
