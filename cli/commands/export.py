"""`radtriage export`: a training checkpoint -> ONNX model version (parity-checked) + metadata."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a training checkpoint to ONNX in the model repository",
        description="Export OUT/<model>/checkpoint.pt of `radtriage train` to "
        "<repository>/<model>/<version>/ (ONNX opset >= 17, dynamic batch, offline-optimised), "
        "after checking ONNX Runtime against PyTorch on real validation inputs (fails > 1e-3).",
    )
    p.add_argument("--config", type=Path, required=True, help="the training TOML used")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt to export")
    p.add_argument("--model", required=True, choices=["cspca_detector", "prostate_gland"])
    p.add_argument("--version", default=None, help="version to write (default: config's)")
    p.add_argument("--repository", type=Path, default=None, help="target (default: config's)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from core.errors import InputError
    from models.networks import NetworkConfig, build_network
    from training.train import export_trained, load_config, load_data

    config = load_config(args.config)
    if args.version:
        config = dataclasses.replace(config, version=args.version)
    mc = next((m for m in config.models if m.name == args.model), None)
    if mc is None:
        raise InputError(f"{args.config} has no [models.{args.model}] section")
    if not args.checkpoint.is_file():
        raise InputError(f"checkpoint {args.checkpoint} does not exist; run `radtriage train`")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    net = build_network(NetworkConfig.from_dict(state["network"]))
    net.load_state_dict(state["model"])
    metrics: dict = {}
    log_path = args.checkpoint.parent / "log.jsonl"
    if log_path.is_file():
        finals = [json.loads(x) for x in log_path.read_text().splitlines() if '"final"' in x]
        metrics = {k: v for k, v in (finals[-1] if finals else {}).items() if k != "final"}
    _, val = load_data(config)
    version = export_trained(
        config,
        mc,
        net,
        metrics,
        val,
        repository=args.repository or config.repository,
        overwrite=args.overwrite,
    )
    md = version.metadata
    out = {
        "name": md.name,
        "version": md.version,
        "path": str(version.path),
        "sha256": md.sha256,
        "size_bytes": md.size_bytes,
        "parity_max_abs_diff": md.parity.max_abs_diff if md.parity else None,
    }
    print(json.dumps(out) if args.json else f"exported {md.name}:{md.version} -> {version.path}")
    return 0
