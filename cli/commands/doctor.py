"""`radtriage doctor --config FILE [--repair] [--json]`: check the index against the spool, the
outbox and the results (`dicom_node.doctor`), and show the one outbox (every channel: counts by
state, dead letters, stuck items); exit 0 when nothing is left to fix, 1 when problems remain.
Run it with the server stopped."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor", help="check index vs spool vs outbox vs results; --repair fixes what it can"
    )
    p.add_argument("--config", type=Path, default=None, help="settings TOML")
    p.add_argument("--repair", action="store_true", help="repair what can be repaired")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from core.settings import load_settings
    from dicom_node.doctor import examine
    from store.index import Index
    from store.spool import Spool

    settings = load_settings(args.config)
    index = Index(settings.storage.database_url, settings.node_id, settings.site_id)
    try:
        spool = Spool(settings.storage.root)
        report = examine(spool, index, spool.root / "results", repair=args.repair)
    finally:
        index.close()
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        for p in report.problems:
            state = "repaired" if p.repaired else "PROBLEM"
            where = p.study_instance_uid or p.path or ""
            print(f"{state:8s} {p.check:22s} {where}: {p.detail}")
        _print_outbox(report.outbox)
        print(
            f"{len(report.problems)} found, {len(report.problems) - len(report.unrepaired)} "
            f"repaired, {len(report.unrepaired)} left; checked {report.checked}"
        )
    return 0 if report.ok else 1


def _print_outbox(view: dict[str, Any]) -> None:
    """The one outbox: counts by channel and state, then the dead letters and stuck items."""
    for channel, states in view.get("counts", {}).items():
        counts = ", ".join(f"{n} {state}" for state, n in states.items())
        print(f"outbox   {channel:6s} {counts}")
    for title, key in (("DEAD", "dead_letters"), ("STUCK", "stuck")):
        for item in view.get(key, []):
            name = item.get("file") or item.get("item_uid")
            print(
                f"{title:8s} {item['channel']}/{item['kind']} to {item['destination']} "
                f"{item['study_instance_uid']} {name}: {item.get('last_error') or ''}"
            )
