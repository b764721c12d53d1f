"""`edgescreen scheduler pause [--reason TEXT] | resume | status`: stop and restart all analysis (audited)."""

from __future__ import annotations

import argparse
import getpass
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["pause", "resume", "status"],
                        help="pause: no job starts and a running one stops at its next safe point; resume: the "
                             "scanner and power rules decide again; status: paused or not, by whom, since when")
    parser.add_argument("--reason", help="why (shown to staff while paused)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def run(args: argparse.Namespace, ctx) -> int:
    from edgescreen.appliance.scheduler import control

    actor = f"cli:{getpass.getuser()}"
    if args.action == "pause":
        state = control.pause(ctx.store, actor, args.reason)
    elif args.action == "resume":
        state = control.resume(ctx.store, actor)
    else:
        state = control.status(ctx.store)
    print(json.dumps(state, indent=2) if args.json else state["text"])
    return 0
