"""`radtriage serve --config FILE.toml`: DICOM node + Ray Serve models + HTTP API/worklist."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the DICOM node, model serving and the HTTP API/worklist",
        description="Receive studies over DICOM, analyse them on Ray Serve, send SR/SEG to the "
        "configured destinations and serve /healthz, /readyz, /metrics, /api/* and /worklist. "
        "SIGTERM stops gracefully (in-flight analysis and sends finish first).",
    )
    p.add_argument("--config", type=Path, default=None, help="settings TOML (see configs/)")
    p.add_argument(
        "--local",
        action="store_true",
        help="run the models in this process instead of Ray Serve (no batching across studies)",
    )
    p.add_argument(
        "--promotion-poll-s",
        type=float,
        default=30.0,
        help="how often to look for newly promoted model versions",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cli.composition import RadtriageApp
    from core.log_events import configure_json_logging
    from core.settings import load_settings

    settings = load_settings(args.config)
    configure_json_logging()
    app = RadtriageApp(settings, backend="local" if args.local else "ray")
    app.serve_forever(promotion_poll_s=args.promotion_poll_s)
    if app.backend == "ray":
        # Everything durable is closed by now (DICOM node, index, outbox, HL7) and Ray is left;
        # what remains is Ray's native teardown at interpreter exit, seconds of a Ctrl-C that
        # write nothing. Flush and leave.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
