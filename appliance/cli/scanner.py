"""`edgescreen scanner busy|idle|auto|status`: the staff's manual switch, and what the gate sees now."""

from __future__ import annotations

import argparse
import getpass
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", choices=["busy", "idle", "auto", "status"],
                        help="busy/idle override every other source; auto hands back to them; status shows the gate")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def run(args: argparse.Namespace, ctx) -> int:
    from edgescreen.appliance.scheduler.live import LiveGate
    from edgescreen.appliance.scheduler.scanner import set_manual

    if args.mode != "status":
        set_manual(ctx.store, args.mode, actor=f"cli:{getpass.getuser()}")
    obs = LiveGate(ctx).observe(record=False)  # a look, not the worker's reading: no event on the timeline
    status = {
        "scanner_busy": obs.scanner.busy,
        "scanner_reason": obs.scanner.reason,
        "signals": [{"source": s.source, "busy": s.busy, "stale": s.stale, "reason": s.reason} for s in obs.scanner.signals],
        "power": None if obs.power is None else {"on_mains": obs.power.on_mains, "battery_percent": obs.power.battery_percent,
                                                 "stale": obs.power.stale, "error": obs.power.error},
        "gate_open": obs.decision.run,
        "decision": obs.decision.reason,
    }
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(obs.scanner.reason)
        print(obs.decision.reason)
    return 0
