"""`edgescreen jobs [list] | urgent ID | run-now ID`: the queue, and the staff's overrides (audited)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="list", choices=["list", "urgent", "run-now"])
    parser.add_argument("job_id", nargs="?", type=int, help="job id for urgent / run-now")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")


def run(args: argparse.Namespace, ctx) -> int:
    from appliance.store import InvalidTransition, jobs

    if args.action == "list":
        rows = jobs.list_jobs(ctx.store)
        if args.json:
            print(json.dumps(rows, indent=2))
        for r in [] if args.json else rows:
            flags = "".join(f for f, on in (("U", r["urgent"]), ("!", r["run_now"])) if on)
            detail = r["waiting_reason"] or r["error"] or r["stage"] or ""
            print(f"{r['id']:5d} {r['pipeline']:9} {r['state']:11} {flags:2} {detail}")
        return 0
    if args.job_id is None:
        print(f"edgescreen jobs {args.action}: give the job id (see `edgescreen jobs`)", file=sys.stderr)
        return 2
    try:
        jobs.set_flag(ctx.store, args.job_id, "urgent" if args.action == "urgent" else "run_now",
                      actor=f"cli:{getpass.getuser()}")
    except InvalidTransition as exc:
        print(f"edgescreen jobs: {exc}", file=sys.stderr)
        return 2
    print(f"job {args.job_id} marked {args.action}")
    return 0
