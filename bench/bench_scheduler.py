"""The scheduler over the shipped clinic-day traces: `edgescreen simulate` through the real policy.

    .venv/bin/python bench/bench_scheduler.py [--profile x86-cpu]

Each trace in appliance/scheduler/traces/ is replayed with a virtual clock through the real scheduler
(appliance.scheduler.simulate), so its figures are deterministic and need no baseline round: the
invariant figure is `overlap_seconds` (inference while the scanner was busy: must be 0); the others
are waiting and turnaround times, preemptions and the estimated energy per study. The replay's own
wall time is measured too (how long the policy takes to decide a whole day). Writes the `scheduler`
section of bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import OUT, REPO, truncate  # noqa: E402
from bench.results_io import machine, write_section  # noqa: E402

TRACES = REPO / "appliance" / "scheduler" / "traces"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="x86-cpu")
    args = ap.parse_args()
    info = machine()
    work = OUT / "scheduler"
    work.mkdir(parents=True, exist_ok=True)
    traces = {}
    for trace in sorted(TRACES.glob("*.json")):
        out = work / f"{trace.stem}.json"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "edgescreen.appliance.cli", "--data-dir", str(work / "data"), "--profile",
                               args.profile, "simulate", str(trace), "--json", str(out), "--svg",
                               str(work / f"{trace.stem}.svg")], capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
        if proc.returncode not in (0, 1) or not out.is_file():
            print(f"simulate {trace.name} failed ({proc.returncode}): {proc.stderr[-1500:]}", file=sys.stderr)
            return 1
        figures = json.loads(out.read_text())
        figures["replay_wall_s"] = truncate(wall, 2)
        traces[trace.stem] = figures
        print(f"{trace.stem}: overlap {figures['overlap_seconds']} s, {figures['jobs_done']}/{figures['jobs_total']} "
              f"jobs, wait median {figures['wait_s_median']} s, preemptions {figures['preemptions']}, "
              f"energy {figures['energy_j_per_study']} J/study, replay {wall:.1f} s")
    section = {
        "profile": args.profile, "baseline": "none: a virtual-clock replay is deterministic; the invariant is "
        "overlap_seconds == 0 (no inference while the scanner is busy)",
        "overlap_seconds_total": sum(t["overlap_seconds"] for t in traces.values()),
        "all_jobs_done": all(t["jobs_done"] == t["jobs_total"] for t in traces.values()),
        "traces": traces,
    }
    write_section("scheduler", section, machine_info=info,
                  command=f".venv/bin/python bench/bench_scheduler.py --profile {args.profile}")
    return 0 if section["overlap_seconds_total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
