"""`radtriage models list|import|promote|rollback|log|shadow-report|monitor`: the repository,
models from the field, the one promotion gate, shadow comparison and monitoring."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list, import, promote or monitor model versions")
    p.add_argument("--repository", type=Path, default=None, help="default: the bundled one")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True
    lst = sub.add_parser("list", help="every model version, promoted ones marked")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=run_list)

    imp = sub.add_parser(
        "import",
        help="import a MONAI bundle folder or an ONNX file as a detector version",
        description="Checks the model fits the grid and channels of --like, exports/verifies "
        "ONNX with a parity check, writes model.onnx, metadata.json (sha256) and a model card. "
        "Nothing is promoted: use `models promote` (the gate) after `evaluate`.",
    )
    imp.add_argument("source", type=Path, help="MONAI bundle folder, or a .onnx file")
    imp.add_argument(
        "--pipeline",
        type=Path,
        help="declared pipeline TOML for an ONNX model (e.g. configs/models/taps.toml)",
    )
    imp.add_argument("--metadata", type=Path, help="bundle-style metadata JSON (ONNX imports)")
    imp.add_argument("--like", default="cspca_detector", help="model whose grid it must fit")
    imp.add_argument("--name", default=None, help="default: bundle's radtriage.name or --like's")
    imp.add_argument("--version", default=None, help="default: the bundle's version")
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(func=run_import)

    pic = sub.add_parser(
        "import-picai-unet",
        help="import PI-CAI baseline U-Net fold checkpoints (unet_F0.pt ... unet_F4.pt)",
        description="Each fold is checked against picai_baseline's default U-Net, exported to "
        "ONNX with a parity check and recorded with its checkpoint's sha256; missing folds are "
        "recorded. The version declares the PI-CAI algorithm's pipeline. Nothing is promoted.",
    )
    pic.add_argument("dir", type=Path, help="folder with unet_F<k>.pt checkpoints")
    pic.add_argument("--name", required=True)
    pic.add_argument("--version", required=True)
    pic.add_argument("--json", action="store_true")
    pic.set_defaults(func=run_import_picai)

    pro = sub.add_parser(
        "promote",
        help="make NAME:VERSION the version NAME resolves to (through the gate)",
        description="The one promotion gate (evaluation.promotion.gate): the candidate must not "
        "be worse than the promoted version beyond the bootstrap CI, offline (--data) and/or "
        "live (--shadow with --outcomes). Refused without evidence or when worse, unless "
        "--force --reason TEXT. Every promotion is appended to promotions.jsonl.",
    )
    pro.add_argument("ref", help="NAME:VERSION")
    pro.add_argument("--data", default=None, help="labelled cases (see evaluate --data)")
    pro.add_argument("--shadow", type=Path, default=None, help="stored shadow results folder")
    pro.add_argument("--outcomes", type=Path, default=None, help="outcome marksheet CSV")
    pro.add_argument("--force", action="store_true", help="promote despite a refusal")
    pro.add_argument("--reason", default="", help="why (required with --force)")
    pro.add_argument("--bootstrap", type=int, default=1000)
    pro.add_argument("--json", action="store_true")
    pro.set_defaults(func=run_promote)

    rb = sub.add_parser("rollback", help="back to a version promoted before (needs --reason)")
    rb.add_argument("ref", help="NAME:VERSION (a version once promoted through the gate)")
    rb.add_argument("--reason", required=True)
    rb.add_argument("--json", action="store_true")
    rb.set_defaults(func=run_rollback)

    lg = sub.add_parser("log", help="the promotion log of NAME (append-only)")
    lg.add_argument("name")
    lg.add_argument("--json", action="store_true")
    lg.set_defaults(func=run_log)

    sh = sub.add_parser("shadow-report", help="compare stored shadow results with the live model")
    sh.add_argument("--shadow", type=Path, required=True, help="folder holding shadow.jsonl")
    sh.add_argument("--outcomes", type=Path, default=None, help="outcome marksheet CSV")
    sh.add_argument("--candidate", default=None, help="only this shadow NAME:VERSION")
    sh.add_argument("--bootstrap", type=int, default=1000)
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=run_shadow_report)

    mo = sub.add_parser(
        "monitor",
        help="likelihood/priority distributions per model version over time, not_analysed "
        "share by reason, agreement with outcomes, alerts",
    )
    mo.add_argument("--results", type=Path, required=True, help="folder of result.json files")
    mo.add_argument("--outcomes", type=Path, default=None, help="outcome marksheet CSV")
    mo.add_argument("--config", type=Path, default=None, help="TOML with a [monitoring] table")
    mo.add_argument("--period", choices=["day", "week", "month"], default="week")
    mo.add_argument("--json", action="store_true")
    mo.set_defaults(func=run_monitor)


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
        seal = f"digest {r['digest'][:12]}" + ("" if r["sealed"] else " (unsealed)")
        origin = f"  from {r['derived_from']}" if r["derived_from"] else ""
        print(
            f"{mark} {r['name']}:{r['version']}  {r['task']}  {size}  {use}  "
            f"sha256 {r['sha256'][:12]}  {seal}{origin}"
        )
    return 0


def _print_import(args: argparse.Namespace, version: Any) -> int:
    md = version.metadata
    members = md.inference.members
    doc = {
        "name": md.name,
        "version": md.version,
        "path": str(version.path),
        "sha256": md.sha256,
        "parity_max_abs_diff": md.parity.max_abs_diff if md.parity else None,
        "members": [m.model_dump(mode="json") for m in members],
        "training": md.training,
        "promoted": False,
    }
    if args.json:
        print(json.dumps(doc))
    else:
        print(
            f"imported {md.name}:{md.version} -> {version.path} (sha256 {md.sha256[:12]}, "
            f"{max(1, len(members))} network(s)); not promoted: evaluate it, then models promote"
        )
    return 0


def run_import_picai(args: argparse.Namespace) -> int:
    from training.picai_import import import_picai_unet

    version = import_picai_unet(
        args.dir, name=args.name, version=args.version, repository=args.repository
    )
    return _print_import(args, version)


def run_import(args: argparse.Namespace) -> int:
    from core.errors import InputError
    from training.bundle_import import import_bundle, import_onnx

    if args.pipeline is not None:
        from training.onnx_pipeline_import import import_declared_onnx

        if not (args.source.is_file() and args.name and args.version):
            raise InputError("--pipeline imports an ONNX file and needs --name and --version")
        version = import_declared_onnx(
            args.source,
            args.pipeline,
            name=args.name,
            version=args.version,
            repository=args.repository,
        )
        return _print_import(args, version)
    common = {
        "repository": args.repository,
        "like": args.like,
        "name": args.name,
        "version": args.version,
    }
    if args.source.is_dir():
        version = import_bundle(args.source, **common)
    elif args.source.suffix.lower() == ".onnx" and args.source.is_file():
        if args.metadata is None:
            raise InputError("an ONNX import needs --metadata META.json (see docs/models.md)")
        version = import_onnx(args.source, args.metadata, **common)
    else:
        raise InputError(f"{args.source}: give a MONAI bundle folder or a .onnx file")
    md = version.metadata
    doc = {
        "name": md.name,
        "version": md.version,
        "path": str(version.path),
        "sha256": md.sha256,
        "parity_max_abs_diff": md.parity.max_abs_diff if md.parity else None,
        "promoted": False,
    }
    if args.json:
        print(json.dumps(doc))
    else:
        print(
            f"imported {md.name}:{md.version} -> {version.path} (sha256 {md.sha256[:12]}, parity "
            f"{doc['parity_max_abs_diff']:.1e}); not promoted: evaluate it, then models promote"
        )
    return 0


def _shadow_records(folder: Path | None) -> Any:
    if folder is None:
        return None
    from models.shadow_log import ShadowLog

    return list(ShadowLog(folder).records())


def run_promote(args: argparse.Namespace) -> int:
    from core.errors import InputError
    from evaluation.outcomes import read_outcomes
    from evaluation.promotion import gate
    from models.repository import ModelRepository, PromotionRefusedError, parse_ref

    name, version = parse_ref(args.ref)
    if version is None:
        raise InputError(f"promote needs NAME:VERSION, got {args.ref!r}")
    if args.force and not args.reason.strip():
        raise InputError("--force needs --reason TEXT saying why the gate is overridden")
    if args.outcomes is not None and args.shadow is None:
        raise InputError("--outcomes judges shadow results: give --shadow DIR too")
    repo = ModelRepository(args.repository)
    repo.verify(args.ref)
    decision = gate(
        repo,
        name,
        version,
        data=args.data,
        shadow=_shadow_records(args.shadow),
        outcomes=read_outcomes(args.outcomes) if args.outcomes else (),
        force_reason=args.reason if args.force else None,
        n_bootstrap=args.bootstrap,
    )
    if not decision.allowed:
        raise PromotionRefusedError(f"the promotion gate refused {args.ref}: {decision.reason}")
    entry = repo.promote(args.ref, decision, reason=args.reason)
    if args.json:
        print(json.dumps(entry, default=str))
    else:
        prev = entry["previous"] or "none"
        print(f"promoted {name}:{version} (was {prev}); gate {decision.outcome}: {decision.reason}")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from core.errors import InputError
    from evaluation.promotion import rollback_decision
    from models.repository import ModelRepository, parse_ref

    name, version = parse_ref(args.ref)
    if version is None:
        raise InputError(f"rollback needs NAME:VERSION, got {args.ref!r}")
    repo = ModelRepository(args.repository)
    decision = rollback_decision(repo, name, version, args.reason)
    entry = repo.promote(args.ref, decision, reason=args.reason)
    if args.json:
        print(json.dumps(entry, default=str))
    else:
        print(f"rolled back {name} to {version} (was {entry['previous']}): {args.reason}")
    return 0


def run_log(args: argparse.Namespace) -> int:
    from models.repository import ModelRepository

    entries = ModelRepository(args.repository).promotion_log(args.name)
    if args.json:
        print(json.dumps({"name": args.name, "promotions": entries}, default=str))
        return 0
    for e in entries:
        gate = e.get("gate") or {}
        print(
            f"{e['promoted_at']} {e['name']}:{e['version']} (was {e['previous']}) by {e['user']}: "
            f"{gate.get('outcome', 'legacy')}; {e.get('reason', '')}"
        )
    return 0


def run_shadow_report(args: argparse.Namespace) -> int:
    from evaluation.outcomes import read_outcomes
    from evaluation.shadow_report import compare_shadow, shadow_text

    doc = compare_shadow(
        _shadow_records(args.shadow) or [],
        read_outcomes(args.outcomes) if args.outcomes else (),
        candidate=args.candidate,
        n_bootstrap=args.bootstrap,
    )
    print(json.dumps(doc, indent=2) if args.json else shadow_text(doc))
    return 0


def run_monitor(args: argparse.Namespace) -> int:
    from evaluation.monitoring import load_monitoring_settings, monitoring_report, monitoring_text
    from evaluation.outcomes import read_outcomes

    settings = load_monitoring_settings(args.config)
    doc = monitoring_report(
        args.results,
        read_outcomes(args.outcomes) if args.outcomes else (),
        settings,
        period=args.period,
    )
    print(json.dumps(doc, indent=2) if args.json else monitoring_text(doc))
    return 3 if doc["alerts"] else 0  # 3: alerts raised (cron-friendly), 2: errors
