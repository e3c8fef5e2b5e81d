"""`radtriage infer DIR --out OUT`: analyse one study offline, same code path as the server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "infer",
        help="analyse one study folder offline (result.json, sr.dcm, seg.dcm)",
        description="Run the triage analysis on one DICOM study folder without a server or "
        "network and write OUT/result.json, OUT/sr.dcm and (when analysed) OUT/seg.dcm. "
        "Exit 0 whenever a result was written, including `not_analysed`.",
    )
    p.add_argument("dir", type=Path, help="folder with the study's DICOM files")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--detector",
        "--model",
        dest="model",
        default=None,
        help="detector NAME[:VERSION] (default: config)",
    )
    p.add_argument("--gland", default=None, help="gland model NAME[:VERSION] (default: config)")
    p.add_argument("--repository", type=Path, default=None, help="model repository root")
    p.add_argument("--config", type=Path, default=None, help="settings TOML (optional)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--json", action="store_true", help="print result.json to stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cli.composition import build_analyser, build_engine
    from core.errors import InputError, ModelNotFoundError
    from core.settings import load_settings
    from imaging.study_reader import scan_study

    if not args.dir.is_dir():
        raise InputError(f"{args.dir} is not a folder; give the folder holding the study's files")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} exists and is not a folder")
    settings = load_settings(args.config)
    updates = {
        k: v
        for k, v in {
            "detector": args.model,
            "gland": args.gland,
            "repository": args.repository,
        }.items()
        if v is not None
    }
    models = settings.models.model_copy(update=updates)
    try:
        engine = build_engine(models, args.device or settings.serving.device)
    except ModelNotFoundError as exc:
        raise InputError(f"{exc.message} (check --model/--gland/--repository)") from exc
    analysis = build_analyser(settings, engine).analyse(scan_study(args.dir), args.out)
    result = analysis.result
    if args.json:
        print(json.dumps(result.to_json_dict()))
    else:
        likelihood = "" if result.case_likelihood is None else f" (AI {result.case_likelihood:.2f})"
        reason = f": {result.reason['message']}" if result.reason else ""
        print(f"{result.priority.value}{likelihood} [{result.status.value}]{reason} -> {args.out}")
    return 0
