"""`radtriage models list|promote`: the model repository and its promotion state."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list or promote model versions")
    p.add_argument("--repository", type=Path, default=None, help="default: the bundled one")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True
    lst = sub.add_parser("list", help="every model version, promoted ones marked")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=run_list)
    pro = sub.add_parser(
        "promote",
        help="make NAME:VERSION the version NAME resolves to",
        description="Runs the evaluation gate (evaluation.promotion.check_promotion) when "
        "available; a failed gate refuses unless --force with --reason.",
    )
    pro.add_argument("ref", help="NAME:VERSION")
    pro.add_argument("--force", action="store_true", help="promote despite a failed gate")
    pro.add_argument("--reason", default="", help="why (required with --force)")
    pro.add_argument("--data", default=None, help="labelled cases for the gate (see evaluate)")
    pro.add_argument("--json", action="store_true")
    pro.set_defaults(func=run_promote)


def run_list(args: argparse.Namespace) -> int:
    from models.repository import ModelRepository

    repo = ModelRepository(args.repository)
    rows = repo.listing()
    if args.json:
        print(json.dumps({"repository": str(repo.root), "models": rows}))
        return 0
    print(f"repository: {repo.root}")
    for r in rows:
        mark = "*" if r["promoted"] else " "
        size = f"{(r['size_bytes'] or 0) / 1e6:.2f} MB"
        use = "clinical" if r["clinical_use"] else "NOT FOR CLINICAL USE"
        print(f"{mark} {r['name']}:{r['version']}  {r['task']}  {size}  {use}  {r['sha256'][:12]}")
    return 0


def _run_gate(root: Path, ref: str, data: str | None, force_reason: str | None) -> Any:
    """The evaluation gate's verdict (evaluation.promotion.check_promotion); None when that
    module is not installed."""
    try:
        from evaluation.promotion import check_promotion
    except ImportError:
        return None
    from core.errors import InputError
    from models.repository import ModelRepository

    name, _, version = ref.partition(":")
    current = ModelRepository(root).promoted(name)
    if data is None and current not in (None, version):
        if force_reason is None:
            raise InputError(
                f"{name}:{current} is promoted: give --data (e.g. a labelled folder or "
                "phantoms:N:SEED) so the evaluation gate can compare, or --force --reason TEXT"
            )
        return None
    return check_promotion(root, name, version, data or "", force_reason=force_reason)


def run_promote(args: argparse.Namespace) -> int:
    from core.errors import InputError, ModelError
    from models.repository import ModelRepository, parse_ref

    name, version = parse_ref(args.ref)
    if version is None:
        raise InputError(f"promote needs NAME:VERSION, got {args.ref!r}")
    if args.force and not args.reason.strip():
        raise InputError("--force needs --reason TEXT saying why the gate is overridden")
    repo = ModelRepository(args.repository)
    repo.verify(args.ref)
    force_reason = args.reason if args.force else None
    verdict = _run_gate(repo.root, args.ref, args.data, force_reason)
    if verdict is None:
        log.warning("no evaluation gate ran for %s; promoting without one", args.ref)
        gate: dict[str, Any] = {"allowed": None, "reason": "no evaluation gate ran"}
    else:
        gate = verdict.to_dict()
        if not verdict.allowed:
            raise ModelError(f"evaluation gate refused {args.ref}: {verdict.reason}")
    entry = repo.promote(args.ref, reason=args.reason, forced=args.force, gate=gate)
    if args.json:
        print(json.dumps(entry, default=str))
    else:
        prev = entry["previous"] or "none"
        print(f"promoted {name}:{version} (was {prev}); gate: {gate['reason']}")
    return 0
