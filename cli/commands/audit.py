"""`radtriage audit verify`: walk the audit hash chain in the index, check each event's MAC
against the key file and the chain's end against the exported head file; exit 1 when broken."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("audit", help="verify the audit log's hash chain")
    sub = p.add_subparsers(dest="audit_command", metavar="ACTION")
    sub.required = True
    v = sub.add_parser("verify", help="recompute every event's hash; report the first bad one")
    v.add_argument("--config", type=Path, default=None, help="settings TOML")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    from core.settings import load_settings
    from store.index import Index
    from workspace.audit import verify_configured

    settings = load_settings(args.config)
    engine = Index(settings.storage.database_url).engine
    result = verify_configured(engine, settings.audit, settings.storage.root)
    if args.json:
        print(json.dumps(result.to_dict()))
    elif result.ok:
        print(f"audit chain intact: {result.events} events")
    else:
        print(
            f"audit chain BROKEN at event {result.first_bad_id}: {result.problem} "
            f"({result.events} events verified before it)"
        )
    return 0 if result.ok else 1
