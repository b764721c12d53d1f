"""`edgescreen jobs [list] | urgent ID | run-now ID | retry ID`: the queue, and the staff's overrides (audited)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="list", choices=["list", "urgent", "run-now", "retry"],
                        help="list the queue (default); mark a job urgent or run-now; put a failed job back in the queue")
    parser.add_argument("job_id", nargs="?", type=int, help="job id for urgent / run-now / retry")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")


def _detail(job: dict) -> str:
    from edgescreen.appliance.store.jobs import stage_position

    if job["state"] == "running":
        pos = stage_position(job["pipeline"], job["stage"])
        pct = f", {job['progress'] * 100:.0f}%" if job["progress"] is not None else ""
        return f"running stage {pos[0]} of {pos[1]} ({job['stage']}{pct})" if pos else (job["stage"] or "running")
    return job["error"] if job["state"] in ("failed", "quarantined") else (job["waiting_reason"] or job["stage"] or "")


def run(args: argparse.Namespace, ctx) -> int:
    from edgescreen.appliance.store import InvalidTransition, jobs

    if args.action == "list":
        rows = jobs.list_jobs(ctx.store)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            flags = "".join(f for f, on in (("U", r["urgent"]), ("!", r["run_now"])) if on)
            print(f"{r['id']:5d} {r['pipeline']:9} {r['state']:11} {flags:2} {_detail(r)}")
        return 0
    if args.job_id is None:
        print(f"edgescreen jobs {args.action}: give the job id (see `edgescreen jobs`)", file=sys.stderr)
        return 2
    actor = f"cli:{getpass.getuser()}"
    try:
        if args.action == "retry":
            jobs.retry(ctx.store, args.job_id, actor)
            print(f"job {args.job_id} queued again")
            return 0
        jobs.set_flag(ctx.store, args.job_id, "urgent" if args.action == "urgent" else "run_now", actor=actor)
    except InvalidTransition as exc:
        print(f"edgescreen jobs: {exc}", file=sys.stderr)
        return 2
    print(f"job {args.job_id} marked {args.action}")
    return 0
