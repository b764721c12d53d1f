"""`edgescreen simulate TRACE`: replay a clinic day through the real scheduler with a virtual clock."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", type=Path, help="trace JSON (see docs/traces.md; shipped ones in "
                        "appliance/scheduler/traces/)")
    parser.add_argument("--json", dest="json_out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--svg", type=Path, help="write the timeline as SVG here")


def run(args: argparse.Namespace, ctx) -> int:
    from edgescreen.appliance.scheduler.simulate import TraceError, load_trace, render_svg, simulate
    from edgescreen.appliance.store.files import atomic_write_text

    try:
        trace = load_trace(args.trace)
    except TraceError as exc:
        print(f"edgescreen simulate: {exc}", file=sys.stderr)
        return 2
    result = simulate(trace, ctx.profile)
    summary = {**result.summary(trace), "profile": ctx.profile.name}
    for key, value in summary.items():
        print(f"{key:36} {value}")
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(summary, indent=2) + "\n")
    if args.svg:
        atomic_write_text(args.svg, render_svg(result, trace))
    return 0 if summary["overlap_seconds"] == 0 else 1
