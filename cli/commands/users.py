"""`radtriage users add|token|list|disable`: the workspace's users, in the index."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.errors import InputError
from workspace.roles import ROLES


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("users", help="add, list or disable users; issue API tokens")
    sub = p.add_subparsers(dest="users_command", metavar="ACTION")
    sub.required = True

    def action(name: str, help: str) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=help)
        a.add_argument("--config", type=Path, default=None, help="settings TOML")
        a.add_argument("--json", action="store_true")
        return a

    add = action("add", "add a user (the password is read from stdin)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument(
        "--password-stdin", action="store_true", required=True, help="read the password from stdin"
    )
    add.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="SITE",
        help="a site the user may work at (repeatable); default: this node's site "
        "([site] id, else the node id)",
    )
    add.set_defaults(func=run_add)
    token = action(
        "token",
        "print a new bearer token for NAME (shown once); NAME's older tokens are revoked, and "
        "tokens expire after [http] token_ttl_days",
    )
    token.add_argument("name")
    token.set_defaults(func=run_token)
    action("list", "every user, role and whether disabled").set_defaults(func=run_list)
    dis = action("disable", "disable NAME: sessions end and tokens stop at once")
    dis.add_argument("name")
    dis.set_defaults(func=run_disable)


def _engine(args: argparse.Namespace) -> Any:
    from core.settings import load_settings
    from store.index import Index

    return Index(load_settings(args.config).storage.database_url).engine


def _accounts(args: argparse.Namespace) -> Any:
    from core.settings import load_settings
    from workspace.accounts import Accounts

    settings = load_settings(args.config)
    http = settings.http
    # the CLI manages the users of its config's site (an ICS runs it once per hospital)
    return Accounts(
        _engine(args), http.session_ttl_s, http.token_ttl_days * 86400.0, settings.site_id
    )


def _audit(args: argparse.Namespace, action: str, name: str, **detail: Any) -> None:
    from core.settings import load_settings
    from workspace.audit import AuditTrail, anchor_from_settings

    settings = load_settings(args.config)
    anchor = anchor_from_settings(settings.audit, settings.storage.root, create=True)
    AuditTrail(_engine(args), anchor, site_id=settings.site_id).append(
        action, user="cli", role="admin", address="cli", detail={"name": name, **detail}
    )


def run_add(args: argparse.Namespace) -> int:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise InputError("no password on stdin")
    accounts = _accounts(args)
    sites = list(dict.fromkeys(args.site)) or [accounts.site_id]
    accounts.add_user(args.name, args.role, password, sites=sites)
    _audit(args, "user_added", args.name, role=args.role, sites=sites)
    out = {"added": args.name, "role": args.role, "sites": sites}
    print(json.dumps(out) if args.json else f"added {args.name} ({args.role})")
    return 0


def run_token(args: argparse.Namespace) -> int:
    accounts = _accounts(args)
    token = accounts.new_token(args.name)
    _audit(args, "token_issued", args.name, expires_in_days=accounts.token_ttl_s / 86400.0)
    print(json.dumps({"name": args.name, "token": token}) if args.json else token)
    return 0


def run_list(args: argparse.Namespace) -> int:
    users = _accounts(args).list_users()
    if args.json:
        print(json.dumps({"users": users}))
        return 0
    for u in users:
        print(f"{u['name']}\t{u['role']}\t{'disabled' if u['disabled'] else 'enabled'}")
    return 0


def run_disable(args: argparse.Namespace) -> int:
    _accounts(args).disable(args.name)
    _audit(args, "user_disabled", args.name)
    print(json.dumps({"disabled": args.name}) if args.json else f"disabled {args.name}")
    return 0
