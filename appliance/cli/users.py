"""`edgescreen users add|list|disable|enable|reset-password|role|token`: accounts for the web UI and API (audited).

A password is read from --password-file (never from the command line, where `ps` and the shell
history would show it); without one a password is generated and printed once, and the user must
change it at first login.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="create a user")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=["clinician", "technician", "admin"])
    add.add_argument("--password-file", help="read the password from this file (first line); default: generate one")
    lst = sub.add_parser("list", help="list users")
    lst.add_argument("--json", action="store_true", help="print as JSON")
    for name, text in (("disable", "disable a user (sessions and tokens stop at once)"), ("enable", "re-enable a user")):
        p = sub.add_parser(name, help=text)
        p.add_argument("name")
    reset = sub.add_parser("reset-password", help="set a new password the user must change at next login")
    reset.add_argument("name")
    reset.add_argument("--password-file", help="read the new password from this file; default: generate one")
    role = sub.add_parser("role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("role", choices=["clinician", "technician", "admin"])
    token = sub.add_parser("token", help="create an API token for a user's scripts (printed once)")
    token.add_argument("name")
    token.add_argument("--label", required=True, help="what uses the token, e.g. 'ris-export'")


def _read_password(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SystemExit(f"edgescreen users: cannot read {path}: {exc.strerror}") from None
    line = text.splitlines()[0] if text.splitlines() else ""
    return line.rstrip("\r\n")


def run(args: argparse.Namespace, ctx) -> int:
    import time

    from edgescreen.appliance import accounts

    actor = f"cli:{getpass.getuser()}"
    store = ctx.store
    try:
        if args.action == "add":
            password = accounts.create_user(store, args.name, args.role, _read_password(args.password_file), actor=actor)
            if args.password_file is None:
                print(f"user {args.name} ({args.role}) created; one-time password (shown once, to be changed at "
                      f"first login): {password}")
            else:
                print(f"user {args.name} ({args.role}) created")
        elif args.action == "list":
            users = accounts.list_users(store)
            if args.json:
                print(json.dumps(users, indent=2))
                return 0
            if not users:
                print("no users yet; `edgescreen serve` creates the first admin, or `edgescreen users add NAME --role admin`")
            for u in users:
                last = time.strftime("%Y-%m-%d %H:%M", time.localtime(u["last_login_at"])) if u["last_login_at"] else "never"
                flags = ", ".join(f for f, on in (("disabled", u["disabled"]),
                                                  ("must change password", u["must_change_password"])) if on)
                print(f"{u['username']:<24} {u['role']:<11} last login {last:<16} tokens {u['tokens']}"
                      + (f"  ({flags})" if flags else ""))
        elif args.action in ("disable", "enable"):
            accounts.disable_user(store, args.name, actor=actor, disabled=args.action == "disable")
            print(f"user {args.name} {args.action}d")
        elif args.action == "reset-password":
            password = accounts.reset_password(store, args.name, _read_password(args.password_file), actor=actor)
            if args.password_file is None:
                print(f"new one-time password for {args.name} (shown once, to be changed at next login): {password}")
            else:
                print(f"password of {args.name} reset; it must be changed at next login")
        elif args.action == "role":
            accounts.set_role(store, args.name, args.role, actor=actor)
            print(f"user {args.name} is now {args.role}")
        elif args.action == "token":
            token = accounts.create_token(store, args.name, args.label, actor=actor)
            print(f"API token for {args.name} ({args.label}), shown once; send it as 'Authorization: Bearer TOKEN':")
            print(token)
    except accounts.AccountError as exc:
        print(f"edgescreen users: {exc}", file=sys.stderr)
        return 2
    return 0
