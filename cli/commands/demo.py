"""`radtriage demo`: end to end on synthetic studies, with a real PACS when one is installed."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="end-to-end demo on synthetic studies",
        description="Generate phantom studies, start radtriage and a PACS (Orthanc when "
        "installed), push the studies over DICOM, wait for the SRs in the PACS, print the "
        "results and keep serving until Ctrl-C.",
    )
    p.add_argument("--once", action="store_true", help="exit after the results table")
    p.add_argument("--workdir", type=Path, default=Path("var/demo"), help="default: var/demo")
    p.add_argument("--no-orthanc", action="store_true", help="use the in-process PACS")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument(
        "--local", action="store_true", help="run the models in-process instead of on Ray Serve"
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for all SRs (default 600)"
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # `radtriage --verbose demo` sets it too
        help="also print the libraries' INFO lines (pynetdicom logs every association and "
        "C-STORE); the server's own log is always in WORKDIR/serve.log",
    )
    p.set_defaults(func=run)


def quiet_logging(verbose: bool) -> None:
    """The demo prints its steps, the table and the sign-in; the libraries' per-instance INFO
    lines (pynetdicom: several per C-STORE) only with --verbose. Warnings always show."""
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:  # an in-process SCP mutes pynetdicom's per-message lines: --verbose wants them
        from pynetdicom import _config

        _config.LOG_HANDLER_LEVEL = "standard"
        logging.getLogger("pynetdicom").setLevel(logging.NOTSET)


def run(args: argparse.Namespace) -> int:
    import shutil

    from cli.demo import run_demo

    quiet_logging(getattr(args, "verbose", False))
    if args.workdir.exists():
        shutil.rmtree(args.workdir)  # a demo starts clean: same studies, same results
    return run_demo(
        args.workdir.resolve(),
        once=args.once,
        use_orthanc=not args.no_orthanc,
        http_port=args.http_port,
        backend="local" if args.local else "ray",
        timeout=args.timeout,
    )
