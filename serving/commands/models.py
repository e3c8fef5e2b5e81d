"""`radtriage models list|promote`: the model repository and its promotion state."""

from __future__ import annotations

import argparse
import inspect
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


def _run_gate(root: Path, ref: str) -> dict[str, Any] | None:
    """Call evaluation.promotion.check_promotion if it exists; None when it does not."""
    try:
        from evaluation.promotion import check_promotion  # type: ignore[import-not-found]
    except ImportError:
        return None
    name, _, version = ref.partition(":")
    offered = {"repository": root, "root": root, "ref": ref, "name": name, "version": version}
    params = inspect.signature(check_promotion).parameters
    kwargs = {k: v for k, v in offered.items() if k in params}
    result = check_promotion(**kwargs)
    if isinstance(result, bool):
        return {"passed": result, "reasons": []}
    if isinstance(result, dict):
        passed = bool(result.get("passed", result.get("ok", False)))
        return {**result, "passed": passed}
    passed = bool(getattr(result, "passed", getattr(result, "ok", False)))
    reasons = getattr(result, "reasons", None) or getattr(result, "message", "")
    return {"passed": passed, "reasons": reasons if isinstance(reasons, list) else [str(reasons)]}


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
    gate = _run_gate(repo.root, args.ref)
    if gate is None:
        log.warning("no evaluation gate available (evaluation.promotion); promoting %s unchecked",
                    args.ref)
        gate = {"passed": None, "reasons": ["no evaluation gate ran"]}
    elif not gate["passed"] and not args.force:
        raise ModelError(
            f"evaluation gate refused {args.ref}: {gate.get('reasons')}; fix the model or "
            "re-run with --force --reason TEXT"
        )
    entry = repo.promote(args.ref, reason=args.reason, forced=args.force, gate=gate)
    if args.json:
        print(json.dumps(entry, default=str))
    else:
        prev = entry["previous"] or "none"
        print(f"promoted {name}:{version} (was {prev}); gate: {gate}")
    return 0
