"""Benchmark the optimiser: the selected artifact of every model against ONNX Runtime FP32, same run.

Two steps, both on this box:
1. `edgescreen optimize --profile x86-cpu` into bench/out/bundle (skipped with --bundle DIR), timed
   against the issue's budget (four models in 15 minutes on the 2-core CI machine);
2. for each model in the bundle, the selected artifact and the FP32 ONNX it came from are timed in
   alternating fresh processes (``--rounds`` rounds each, so slow drift of a shared machine hits
   both alike); the ratio of medians is the figure to quote, with peak RSS beside it.

    .venv/bin/python bench/bench_optimize.py                      # optimise + measure
    .venv/bin/python bench/bench_optimize.py --bundle DIR         # measure an existing bundle
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.bundle import verify_bundle  # noqa: E402
from appliance.config import load_profile  # noqa: E402
from appliance.modelcard import load_card  # noqa: E402
from optimize.benchmark import run_in_subprocess  # noqa: E402
from optimize.calibration import build_cases  # noqa: E402
from optimize.run import fixed_input_shapes  # noqa: E402

OUT = REPO / "bench" / "out"
BUDGET_S = 15 * 60


def optimise(profile: str, data_dir: Path, out: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "optimize.cli", "--data-dir", str(data_dir), "--profile", profile, "--out", str(out),
           "--cache", str(OUT / "cache"), *extra]
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"optimize exited {proc.returncode}")
    return elapsed


def measure(bundle: Path, data_dir: Path, rounds: int, runs: int) -> list[dict]:
    manifest = verify_bundle(bundle, data_dir)
    profile = load_profile(manifest.profile)
    rows = []
    for role, entry in sorted(manifest.models.items()):
        card_path = manifest.card_path(bundle, role)
        card = load_card(card_path)
        source = card_path.parent / card.file
        case = build_cases(card, "heldout", 1, cache_dir=OUT / "cache").cases[0]
        inputs = {n: case.inputs[n] for n in fixed_input_shapes(card)}
        fp32, chosen = [], []
        for _ in range(rounds):
            for sink, (artifact, backend, device, precision) in (
                (fp32, (source, "onnxruntime", "CPU", "fp32")),
                (chosen, (bundle / entry.artifact, entry.backend, entry.device, entry.precision)),
            ):
                sink.append(run_in_subprocess(artifact, backend, device, precision, entry.threads, inputs, runs=runs,
                                              warmup=2, estimate_w=profile.watts.get(backend, 0.0), work_dir=OUT))
        base = statistics.median(r.latency_ms_p50 for r in fp32)
        sel = statistics.median(r.latency_ms_p50 for r in chosen)
        rows.append({"role": role, "selected": f"{entry.backend}/{entry.device}/{entry.precision}",
                     "fp32_p50_ms": base, "selected_p50_ms": sel, "ratio": base / sel,
                     "selected_p95_ms": statistics.median(r.latency_ms_p95 for r in chosen),
                     "fp32_rss_mb": max(r.peak_rss_mb for r in fp32), "selected_rss_mb": max(r.peak_rss_mb for r in chosen),
                     "optimiser_speedup": entry.speedup, "gate": entry.gate.model_dump(include={"passed", "dice_vs_fp32",
                     "dice_vs_truth_drop", "auc_drop", "decision_agreement"})})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="measure this bundle instead of building one")
    parser.add_argument("--profile", default="x86-cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("extra", nargs="*", help="more arguments for optimize (after --)")
    args = parser.parse_args()
    data_dir = OUT / "data"
    elapsed = None
    bundle = args.bundle
    if bundle is None:
        bundle = OUT / "bundle"
        elapsed = optimise(args.profile, data_dir, bundle, args.extra)
    rows = measure(bundle, data_dir, args.rounds, args.runs)
    print(f"\nselected artifact vs ONNX Runtime FP32, same run, {args.rounds} alternating rounds x {args.runs} runs "
          f"(median of p50s), bundle {bundle}")
    print(f"{'model':<17}{'selected':<22}{'fp32 ms':>9}{'sel ms':>9}{'ratio':>8}{'sel p95':>9}{'rss MB':>8}  gate")
    for r in rows:
        g = r["gate"]
        figures = ", ".join(f"{k}={v:.4f}" for k, v in g.items() if isinstance(v, float))
        print(f"{r['role']:<17}{r['selected']:<22}{r['fp32_p50_ms']:>9.1f}{r['selected_p50_ms']:>9.1f}"
              f"{r['ratio']:>7.2f}x{r['selected_p95_ms']:>9.1f}{r['selected_rss_mb']:>8.0f}  "
              f"{'passed' if g['passed'] else 'FAILED'} {figures}")
    if elapsed is not None:
        print(f"optimise wall time: {elapsed:.0f} s for {len(rows)} model(s) (budget {BUDGET_S} s for four)")
    (OUT / "bench_optimize.json").write_text(json.dumps({"elapsed_s": elapsed, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
