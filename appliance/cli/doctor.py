"""`edgescreen doctor`: the technician's diagnosis, a table of named checks (OK / WARN / FAIL, each not-OK with its
fix); `--json` gives the same list as {name, status, detail, fix} for the cloud heartbeat and scripts.
Exit 1 when any check fails."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the checks as a JSON list")
    parser.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                        help="look for the systemd units in this staging root (as provision --root wrote them)")


def run(args: argparse.Namespace, ctx) -> int:  # noqa: ANN001 - AppContext
    from edgescreen.appliance.doctor import run_checks

    checks = run_checks(ctx, root=args.root)
    failed = [c for c in checks if c.status == "fail"]
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
        return 1 if failed else 0
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.status.upper():<4}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.status != "ok":
            print(textwrap.indent(textwrap.fill(f"fix: {c.fix}", 100), " " * (width + 8)))
    warned = sum(c.status == "warn" for c in checks)
    print(f"\n{len(checks) - len(failed) - warned} ok, {warned} warning(s), {len(failed)} failed")
    return 1 if failed else 0
