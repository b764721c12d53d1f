"""`edgescreen doctor`: a table of checks; exit 1 when any required check fails."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def run(args: argparse.Namespace, ctx) -> int:
    from appliance.doctor import run_checks

    checks = run_checks(ctx)
    if args.json:
        print(json.dumps([{"check": c.name, "status": c.status, "detail": c.detail} for c in checks], indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.status:<5} {c.name:<{width}}  {c.detail}")
    failed = [c for c in checks if c.status == "FAIL"]
    if not args.json:
        print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0
