"""`edgescreen purge [--dry-run]`: apply the retention policy ([retention] in the site config) now.

The worker applies the same policy by itself when idle; this is for a technician freeing a full disk,
or checking what the policy would delete (`--dry-run`) before trusting it.
"""

from __future__ import annotations

import argparse
import getpass
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="show what the policy deletes, delete nothing")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def run(args: argparse.Namespace, ctx) -> int:  # noqa: ANN001 - AppContext, imported lazily by the CLI
    from edgescreen.appliance.store.retention import purge

    policy = ctx.config.retention
    done = purge(ctx.store, policy, dry_run=args.dry_run, actor=f"cli:{getpass.getuser()}")
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **done.as_dict()}, indent=2))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"retention policy: images {policy.images_days:g} days and result files {policy.results_days:g} days "
          f"after delivery and review; audit {policy.audit_days:g} days; quarantine {policy.quarantine_days:g} days")
    for s in done.images:
        print(f"  {verb} images of study {s.study_uid}: {s.files} file(s), {_mb(s.bytes)} ({s.why})")
    for o in done.outputs:
        print(f"  {verb} result files of job {o.job_id} (study {o.study_uid}): {_mb(o.bytes)}")
    if done.quarantine:
        print(f"  {verb} {len(done.quarantine)} quarantined instance(s), "
              f"{_mb(sum(q[2] for q in done.quarantine))}")
    if done.audit_rows or done.event_rows:
        print(f"  {verb} {done.audit_rows} audit row(s) and {done.event_rows} event row(s) past their time")
    for reason, n in sorted(done.kept.items()):
        print(f"  kept {n} study(ies): {reason}")
    print(f"{verb} {_mb(done.bytes)} in all" if not done.empty() else "nothing is due for deletion")
    if done.empty() and any(not reason.startswith("within") for reason in done.kept):
        print("studies are kept until every result is reviewed and delivered: review them in the web UI, and "
              "check `edgescreen outbox` for exports that did not go")
    return 0
