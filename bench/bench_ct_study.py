"""A whole CT study: the bundle against the all-FP32 ONNX Runtime pipeline, same study, same run.

    .venv/bin/python bench/bench_ct_study.py [--bundle bench/out/bundle] [--rounds 3] [--slices 300]

The study is a 300-slice 512x512 phantom (seed 7, a PDAC). Each round runs, in a fresh process per
pipeline (alternating which goes first), `analyze_study` twice on the same study: the first ("cold")
pays the model loading and OpenVINO compilation, the second ("warm") is what the worker pays for every
study after its first, with the sessions cached. The figure is the ratio of the medians of
findings.json's `timings_s.total` (the analysis itself: series grouping, loading, three stages, the
domain gate, key images, DICOM SEG/SR/PDF; not the interpreter's start). Peak RSS is the child's VmHWM.
Writes the `ct_study` section of bench/results.json (aim: the bundle in a quarter of the FP32 time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import OUT, alternate, ct_series, median, run_child, truncate  # noqa: E402
from bench.results_io import machine, write_section  # noqa: E402

CHILD = """
import time
from pathlib import Path
from edgescreen.appliance.pipeline.analyze import AnalysisRequest, analyze_study
study, out, bundle = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] or None
runs = []
for i in range(2):
    t = time.perf_counter()
    f = analyze_study(AnalysisRequest([study], out / str(i), bundle_dir=Path(bundle) if bundle else None))
    runs.append({"wall_s": time.perf_counter() - t, "timings": f["timings_s"], "triage": f["triage"],
                 "models": [m["backend"] + "/" + m["precision"] for m in f["models"]],
                 "refused": sum(len(m.get("refused") or []) for m in f["models"])})
print(json.dumps({"cold_s": runs[0]["timings"]["total"], "warm_s": runs[1]["timings"]["total"],
                  "cold": runs[0], "warm": runs[1], "peak_rss_mb": _hwm()}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=OUT / "bundle")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    args = ap.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        print(f"{args.bundle}: no bundle; run bench/bench_optimize.py first (make bench does)", file=sys.stderr)
        return 2
    study = ct_series(args.slices)
    bundle_id = json.loads((args.bundle / "manifest.json").read_text())["bundle_id"]
    info = machine()
    work = OUT / "ct_study"
    results = alternate(args.rounds, {
        "fp32": lambda: run_child(CHILD, str(study), str(work / "fp32"), ""),
        "bundle": lambda: run_child(CHILD, str(study), str(work / "bundle"), str(args.bundle)),
    })
    figures = {}
    for name, runs in results.items():
        warm = median([r["warm_s"] for r in runs])
        pick = min(runs, key=lambda r: abs(r["warm_s"] - warm))  # the run whose total is the median's
        figures[name] = {"warm_s": truncate(warm), "cold_s": truncate(median([r["cold_s"] for r in runs])),
                         "warm_timings_s": pick["warm"]["timings"], "models": pick["warm"]["models"],
                         "triage": pick["warm"]["triage"], "peak_rss_mb": truncate(max(r["peak_rss_mb"] for r in runs), 1),
                         "runs_warm_s": [truncate(r["warm_s"]) for r in runs]}
    ratio = figures["fp32"]["warm_s"] / figures["bundle"]["warm_s"]
    ratio_cold = figures["fp32"]["cold_s"] / figures["bundle"]["cold_s"]
    per_round = [f["warm_s"] / b["warm_s"] for f, b in zip(results["fp32"], results["bundle"], strict=True)]
    section = {
        "study": f"{args.slices}-slice 512x512 CT phantom (seed 7, pdac)", "bundle": bundle_id, "rounds": args.rounds,
        "baseline": "all-FP32 ONNX Runtime pipeline (reference models, no bundle)",
        "baseline_s": figures["fp32"]["warm_s"], "bundle_s": figures["bundle"]["warm_s"],
        "ratio": truncate(ratio), "ratio_range": [truncate(min(per_round)), truncate(max(per_round))],
        "ratio_cold": truncate(ratio_cold), "aim_ratio": 4.0, "aim_met": ratio >= 4.0,
        "peak_rss_mb": max(figures["fp32"]["peak_rss_mb"], figures["bundle"]["peak_rss_mb"]),
        "aim_peak_rss_mb": 1024, "fp32": figures["fp32"], "with_bundle": figures["bundle"],
        "unit": "seconds of findings.json timings_s.total, warm (sessions cached), median over rounds",
    }
    write_section("ct_study", section, machine_info=info,
                  command=f".venv/bin/python bench/bench_ct_study.py --rounds {args.rounds} --slices {args.slices}")
    print(f"\nwhole study ({args.slices} slices), warm: FP32 {figures['fp32']['warm_s']:.2f} s, bundle "
          f"{figures['bundle']['warm_s']:.2f} s, ratio {ratio:.2f}x (per round {', '.join(f'{r:.2f}' for r in per_round)}; "
          f"aim 4x); cold ratio {ratio_cold:.2f}x; peak RSS {section['peak_rss_mb']:.0f} MB")
    for name in ("fp32", "bundle"):
        print(f"  {name:6} {figures[name]['warm_timings_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
