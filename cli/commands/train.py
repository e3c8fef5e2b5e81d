"""`radtriage train --config FILE.toml [--out DIR] [--resume] [--init-from NAME:VERSION]`:
train (or fine-tune from a repository version), export, register."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the detector and gland models (MONAI), export them to the model repository",
        description="Train the models listed in a training TOML (see training/configs/), "
        "checkpointing to OUT/<model>/checkpoint.pt and logging to OUT/<model>/log.jsonl, then "
        "export each to ONNX with a parity check into the model repository.",
    )
    p.add_argument("--config", type=Path, required=True, help="training TOML")
    p.add_argument("--out", type=Path, default=Path("var/train"), help="checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue from OUT's checkpoints")
    p.add_argument(
        "--init-from",
        action="append",
        default=[],
        metavar="NAME:VERSION",
        help="fine-tune model NAME from that version's weights in the repository (repeat per "
        "model); refused when its network, grid, spacing or channels differ from the config",
    )
    p.add_argument("--repository", type=Path, default=None, help="export target (else config)")
    p.add_argument("--no-export", action="store_true", help="train only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.train import load_config, run_training

    config = load_config(args.config)
    summary = run_training(
        config,
        args.out,
        resume=args.resume,
        export=not args.no_export,
        repository=args.repository,
        overwrite=args.overwrite,
        progress=True,  # on stderr; stdout keeps the results (and --json)
        init_from=args.init_from,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        for name, entry in summary["models"].items():
            where = entry.get("path", "(not exported)")
            parent = f" (fine-tuned from {entry['init_from']})" if "init_from" in entry else ""
            print(f"{name}{parent}: {entry['metrics']} -> {where}")
    return 0
