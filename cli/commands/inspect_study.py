"""`radtriage inspect DIR [--json]`: the study as the server sees it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show the series found, the role chosen for each and why, and volume geometry",
        description="Scan a DICOM folder as the server would: series found, role per series "
        "(t2w/adc/hbv/other) with the reason, and the geometry of the selected volumes. "
        "Exit 0 when all roles are found, 2 otherwise.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="folder of DICOM files")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--rules", type=Path, default=None, help="selection rules JSON file")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from imaging.series_selection import load_rules
    from imaging.study_volumes import inspect_study

    report = inspect_study(args.directory, load_rules(args.rules) if args.rules else None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0 if report["error"] is None else 2


def format_report(report: dict[str, Any]) -> str:
    """Human-readable table of the `inspect` report."""
    lines = [f"Study {report['study_instance_uid'] or '?'}"]
    if report["series"]:
        lines.append(f"{'#':>4}  {'role':<5}  {'inst':>4}  {'description':<36}  reason")
        for s in report["series"]:
            number = "" if s["series_number"] is None else str(s["series_number"])
            lines.append(
                f"{number:>4}  {s['role']:<5}  {s['instances']:>4}  "
                f"{s['series_description'][:36]:<36}  {s['reason']}"
            )
    for role, g in report["volumes"].items():
        lines.append(
            f"{role:<4} size {g['size']} spacing {[round(v, 4) for v in g['spacing']]} "
            f"origin {[round(v, 3) for v in g['origin']]}"
        )
    if report["error"]:
        lines.append(f"error: {report['error']['code']}: {report['error']['message']}")
    return "\n".join(lines)
