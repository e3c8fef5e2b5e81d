"""`radtriage` command line. Subcommands live in `cli.commands.<name>`."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

from core.errors import InputError, RadtriageError

#: Subcommand modules, in the order `radtriage --help` lists them.
COMMANDS = (
    "serve",
    "demo",
    "phantom",
    "inspect_study",
    "infer",
    "train",
    "export",
    "evaluate",
    "simulate",
    "models",
    "users",
    "audit",
    "feedback",
    "doctor",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radtriage",
        description="AI triage server for prostate MRI (NOT for clinical use with demo models).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"cli.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except RadtriageError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": exc.to_dict()}))
        else:
            print(f"radtriage {args.command}: error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InputError) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
