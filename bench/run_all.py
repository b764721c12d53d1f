"""`make bench`: every benchmark in one run, then bench/REPORT.md rendered from bench/results.json.

    .venv/bin/python bench/run_all.py [--only NAME[,NAME]] [--bundle DIR]

Order: the performance benchmarks of issue 15 first (DICOM receive, CT loading, the optimiser, which
builds bench/out/bundle, then the whole CT study and the mammography exam on that bundle, then the
scheduler), then every other bench/bench_*.py with its defaults (web, sync, scale, load, ...), each of
which writes its own section. A benchmark that fails is reported and the others still run; the exit
status says whether all passed. The report is rendered last, from whatever results.json then holds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PERFORMANCE = ("bench_dicom_receive", "bench_ct_load", "bench_optimize", "bench_ct_study", "bench_mammo_exam",
               "bench_scheduler")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated script names (e.g. bench_ct_study,bench_mammo_exam)")
    ap.add_argument("--bundle", type=Path, help="use this bundle instead of optimising (ct_study, mammo_exam, models)")
    args = ap.parse_args()
    others = sorted(p.stem for p in HERE.glob("bench_*.py") if p.stem not in PERFORMANCE)
    names = [*PERFORMANCE, *others]
    if args.only:
        wanted = {n.strip().removesuffix(".py") for n in args.only.split(",")}
        names = [n for n in names if n in wanted]
    failed = []
    for name in names:
        cmd = [sys.executable, str(HERE / f"{name}.py")]
        if args.bundle and name in ("bench_optimize", "bench_ct_study", "bench_mammo_exam"):
            cmd += ["--bundle", str(args.bundle)]
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        start = time.monotonic()
        code = subprocess.run(cmd, cwd=REPO).returncode
        print(f"=== {name}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    subprocess.run([sys.executable, str(HERE / "report.py")], cwd=REPO, check=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
