"""The DICOM fast receive path against pynetdicom's stock acceptor it replaces, same series, same run.

    .venv/bin/python bench/bench_fastpath.py [--rounds 5] [--slices 300]

One 300-slice 512 x 512 phantom CT series (cached, as bench_dicom_receive.py makes it) is sent by dcmtk's
storescu to `edgescreen dicom --receive-path fast` and `--receive-path stock`, rounds alternating which
goes first so a drifting machine load biases neither. The figure is the median over rounds of
stock seconds / fast seconds (above 1: the fast path is faster), with both medians and the per-instance
cost. The pynetdicom release measured is recorded: the fast path runs only on the releases it was
validated against (appliance/dicom/fastpath.py VALIDATED). Written to the `dicom_fastpath` section.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_dicom_receive import free_port as _free_port  # noqa: E402
from bench.bench_dicom_receive import make_series, send, stop, wait_echo  # noqa: E402
from bench.results_io import machine, write_section  # noqa: E402


def run(series_dir: Path, data: Path, path: str) -> float:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgescreen.appliance.cli", "--data-dir", str(data), "--log-level", "warning",
                             "dicom", "--port", str(port), "--ae-title", "EDGE", "--allow-any-ae", "--min-free-mb", "0",
                             "--stable-after", "3600", "--receive-path", path],
                            cwd=REPO, env={"EDGESCREEN_CONFIG": "", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_echo(port, proc, timeout=120)
        return send(series_dir, port)
    finally:
        stop(proc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--series-dir", type=Path, default=Path(tempfile.gettempdir()) / "edgescreen-bench-ct")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    info = machine()
    import pynetdicom

    from edgescreen.appliance.dicom import fastpath

    if not fastpath.available():
        print(f"pynetdicom {pynetdicom.__version__} is not a release the fast path was validated against "
              f"({', '.join(fastpath.VALIDATED)}): the service would run the stock path; nothing to compare",
              file=sys.stderr)
        return 2
    series = make_series(args.series_dir / f"s{args.slices}", args.slices)
    mb = sum(p.stat().st_size for p in series) / 1e6
    times: dict[str, list[float]] = {"fast": [], "stock": []}
    ratios = []
    with tempfile.TemporaryDirectory(prefix="bench-fastpath-") as work:
        for r in range(args.rounds):
            order = ("fast", "stock") if r % 2 == 0 else ("stock", "fast")
            got = {}
            for path in order:
                got[path] = run(series[0].parent, Path(work) / f"{path}-{r}", path)
                times[path].append(got[path])
            ratios.append(got["stock"] / got["fast"])
            print(f"round {r + 1}: fast {got['fast']:.2f} s, stock {got['stock']:.2f} s, "
                  f"stock/fast {ratios[-1]:.2f}", flush=True)
            time.sleep(0.5)
    figures = {
        "pynetdicom": pynetdicom.__version__, "validated": list(fastpath.VALIDATED), "instances": len(series),
        "mb": round(mb, 1), "rounds": args.rounds,
        "fast_median_s": round(statistics.median(times["fast"]), 3),
        "stock_median_s": round(statistics.median(times["stock"]), 3),
        "fast_ms_per_instance": round(statistics.median(times["fast"]) / len(series) * 1000, 2),
        "stock_ms_per_instance": round(statistics.median(times["stock"]) / len(series) * 1000, 2),
        "speedup_stock_over_fast_median": round(statistics.median(ratios), 2),
        "speedup_min": round(min(ratios), 2), "speedup_max": round(max(ratios), 2),
    }
    print(figures)
    if not args.no_write:
        write_section("dicom_fastpath", figures, machine_info=info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
