"""CT series loading: ctload vs a plain sequential pydicom loop, same files, same run; peak RSS of analyze.

Writes the `ct_load` section of bench/results.json: the headline ratio is against the issue's baseline,
the bare sequential read-and-stack loop (`baseline_raw`), with the HU-and-sort loop beside it.

    .venv/bin/python bench/bench_ct_load.py [--slices 300] [--repeats 3] [--workers N] [--skip-analyze]

Writes a 512x512 phantom series once into bench/out/ (kept for later runs), reads every file once so
both contenders start from a warm page cache, then alternates baseline and ctload runs and reports
the median throughput (MB of DICOM files per second) of each and their ratio. Finally it runs a whole
`analyze_study` in a child process (reference models when trained, otherwise the tests' tiny models)
and prints that child's peak RSS, the figure the 2 GB memory budget is about.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUT = REPO / "bench" / "out" / "ct_load"


def phantom_series(slices: int) -> list[Path]:
    """A seed-7 phantom with a PDAC at 512x512 and `slices` slices, written once and reused."""
    from bench.harness import ct_series

    return sorted(ct_series(slices).glob("*.dcm"))


def baseline(paths: list[Path]) -> np.ndarray:
    """What a first implementation does: read each file whole, decode, rescale, sort by position, stack."""
    import pydicom

    slices = []
    for path in paths:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        slices.append((float(np.dot(np.asarray(ds.ImagePositionPatient, float), np.cross(row, col))), hu))
    slices.sort(key=lambda item: item[0])
    return np.stack([s[1] for s in slices])


def baseline_raw(paths: list[Path]) -> np.ndarray:
    """The barest loop: read, decode, stack stored values (no HU, no sorting): a floor for any reader."""
    import pydicom

    return np.stack([pydicom.dcmread(path).pixel_array for path in paths])


def contender(paths: list[Path], workers: int | None) -> np.ndarray:
    from edgescreen.appliance.pipeline.ctload import load_ct_series

    return load_ct_series(paths, workers=workers).hu


CPU: dict[str, list[float]] = {}


def timed(fn, *args) -> tuple[float, np.ndarray]:  # noqa: ANN001
    """Wall seconds (and CPU seconds of all threads, kept in CPU: robust when the box is shared)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    CPU.setdefault(fn.__name__, []).append(time.process_time() - c0)
    return time.perf_counter() - t0, out


def peak_rss_of_analyze(paths: list[Path]) -> tuple[float, str, dict]:
    """Run one whole analysis in a child process; its ru_maxrss is the peak RSS of the analysis alone."""
    reference = all((REPO / "models" / f"pancreas.stage{i}.json").is_file() for i in (1, 2, 3))
    models = REPO / "models" if reference else OUT / "test_models"
    code = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
if not {reference!r}:
    from tests.test_pancreas_pipeline import write_test_models
    write_test_models(Path({str(models)!r}))
from edgescreen.appliance.pipeline.analyze import AnalysisRequest, analyze_study
paths = [Path(p) for p in json.loads(sys.argv[1])]
f = analyze_study(AnalysisRequest(paths, Path({str(OUT / 'analyze')!r}), models_dir=Path({str(models)!r})))
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(json.dumps({{"timings": f["timings_s"], "triage": f["triage"], "lesions": len(f["lesions"]),
                  "hwm_kb": int(hwm[0].split()[1]) if hwm else None}}))
"""
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([str(p) for p in paths])], capture_output=True,
                          text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"analyze child failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # VmHWM is the child's own high-water mark; ru_maxrss of children would also count the parent's pages
    # the child shared between fork and exec (this parent holds two 300-slice volumes by then).
    peak_kb = result["hwm_kb"] or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak_kb / 1024.0, "reference" if reference else "tests' tiny", result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--skip-analyze", action="store_true")
    args = parser.parse_args()

    from bench.harness import truncate as _trunc
    from bench.results_io import machine, write_section

    info = machine()
    paths = phantom_series(args.slices)
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    for p in paths:  # warm the page cache for both contenders
        p.read_bytes()
    base_times, raw_times, ours_times = [], [], []
    for _ in range(args.repeats):
        t, ref = timed(baseline, paths)
        base_times.append(t)
        t, _ = timed(baseline_raw, paths)
        raw_times.append(t)
        t, got = timed(contender, paths, args.workers)
        ours_times.append(t)
    if not np.array_equal(np.maximum(ref, -1024), got.astype(np.float32)):
        raise SystemExit("ctload and the baseline disagree on the HU values")
    base, ours = statistics.median(base_times), statistics.median(ours_times)
    print(f"series: {len(paths)} files 512x512, {megabytes:.1f} MB; median of {args.repeats} alternating runs, warm cache")
    best_base, best_ours = min(base_times), min(ours_times)
    print(f"baseline sequential pydicom loop: median {base:.3f} s {megabytes / base:7.1f} MB/s | best {best_base:.3f} s")
    print(f"ctload ({args.workers or 'default'} workers):         median {ours:.3f} s {megabytes / ours:7.1f} MB/s | "
          f"best {best_ours:.3f} s")
    raw = statistics.median(raw_times)
    print(f"bare read+stack loop (no HU):     median {raw:.3f} s {megabytes / raw:7.1f} MB/s | best {min(raw_times):.3f} s")
    print(f"ratio ctload / baseline: median {base / ours:.2f}x, best {best_base / best_ours:.2f}x; "
          f"vs bare loop: median {raw / ours:.2f}x (output dtype {got.dtype}, {got.nbytes / 1e6:.0f} MB)")
    cpu = {name: statistics.median(v) for name, v in CPU.items()}
    print(f"CPU seconds (all threads, median): baseline {cpu['baseline']:.3f}, bare loop {cpu['baseline_raw']:.3f}, "
          f"ctload {cpu['contender']:.3f}")
    section = {
        "series": f"{len(paths)} files 512x512, {megabytes:.1f} MB, warm page cache", "repeats": args.repeats,
        "baseline": "bare sequential pydicom read-and-stack loop (dcmread + pixel_array + np.stack)",
        "baseline_s": _trunc(raw), "ctload_s": _trunc(ours), "ratio": _trunc(raw / ours),
        "ratio_best": _trunc(min(raw_times) / min(ours_times)), "aim_ratio": 1.5, "aim_met": raw / ours >= 1.5,
        "hu_sort_loop_s": _trunc(base), "ratio_vs_hu_sort_loop": _trunc(base / ours),
        "cpu_s": {"bare_loop": _trunc(cpu["baseline_raw"]), "hu_sort_loop": _trunc(cpu["baseline"]),
                  "ctload": _trunc(cpu["contender"])},
        "output_dtype": str(got.dtype),
    }
    if not args.skip_analyze:
        rss_mb, which, result = peak_rss_of_analyze(paths)
        print(f"analyze_study peak RSS ({which} models): {rss_mb:.0f} MB; timings {result['timings']}")
        section["analyze_peak_rss_mb"] = _trunc(rss_mb, 1)
    write_section("ct_load", section, machine_info=info,
                  command=f".venv/bin/python bench/bench_ct_load.py --repeats {args.repeats} --slices {args.slices}"
                  + (" --skip-analyze" if args.skip_analyze else ""))
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
