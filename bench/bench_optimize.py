"""Benchmark the optimiser: the selected artifact of every model against ONNX Runtime FP32, same run.

Two steps, both on this box:
1. `edgescreen optimize --profile x86-cpu` into bench/out/bundle (skipped with --bundle DIR), timed
   against the issue's budget (four models in 15 minutes on the 2-core CI machine);
2. for each model in the bundle, the selected artifact and the FP32 ONNX it came from are timed in
   alternating fresh processes (``--rounds`` rounds each, so slow drift of a shared machine hits
   both alike); the ratio of medians is the figure to quote, with peak RSS beside it. A tiled model
   (stage 1) is timed per tile at the bundle's tiles per call (the baseline at its own best of one tile
   per call and the bundle's), and over a whole held-out volume through the appliance's sliding window
   with the bundle's window against ORT FP32 run as the card tiles: the figure a study pays.

    .venv/bin/python bench/bench_optimize.py                      # optimise + measure
    .venv/bin/python bench/bench_optimize.py --bundle DIR         # measure an existing bundle

Writes the `models` section of bench/results.json.
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

from bench.harness import truncate  # noqa: E402
from bench.results_io import machine, write_section  # noqa: E402
from edgescreen.appliance.bundle import verify_bundle  # noqa: E402
from edgescreen.appliance.config import load_profile  # noqa: E402
from edgescreen.appliance.modelcard import load_card  # noqa: E402
from edgescreen.optimize.benchmark import BenchResult, run_in_subprocess  # noqa: E402
from edgescreen.optimize.calibration import build_cases  # noqa: E402
from edgescreen.optimize.run import fixed_input_shapes  # noqa: E402

OUT = REPO / "bench" / "out"
BUDGET_S = 15 * 60


def optimise(profile: str, data_dir: Path, out: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "edgescreen.appliance.cli", "--data-dir", str(data_dir), "optimize", "--profile", profile,
           "--out", str(out), "--cache", str(OUT / "cache"), *extra]
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"optimize exited {proc.returncode}")
    return elapsed


def _unit(card, role: str) -> str:  # noqa: ANN001
    pre = card.preprocessing
    if pre.patch_size:
        return "tile " + "x".join(map(str, pre.patch_size))
    if pre.crop_size:
        return "crop " + "x".join(map(str, pre.crop_size))
    return "image " + "x".join(map(str, pre.input_size_px or []))


def _rounds(rounds: int, jobs: dict[str, tuple]) -> dict[str, list[BenchResult]]:
    """Every job once per round, the order rotating, each in a fresh process."""
    names = list(jobs)
    out: dict[str, list[BenchResult]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            args, kwargs = jobs[name]
            out[name].append(run_in_subprocess(*args, **kwargs))
    return out


def measure(bundle: Path, data_dir: Path, rounds: int, runs: int) -> dict[str, dict]:
    manifest = verify_bundle(bundle, data_dir)
    profile = load_profile(manifest.profile)
    rows: dict[str, dict] = {}
    for role, entry in sorted(manifest.models.items()):
        extra = entry.model_extra or {}
        card_path = manifest.card_path(bundle, role)
        card = load_card(card_path)
        source = card_path.parent / card.file
        case = build_cases(card, "heldout", 1, cache_dir=OUT / "cache").cases[0]
        inputs = {n: case.inputs[n] for n in fixed_input_shapes(card)}
        batch = int(extra.get("batch") or 1)
        common = {"runs": runs, "warmup": 2, "work_dir": OUT}
        jobs = {"fp32": ((source, "onnxruntime", "CPU", "fp32", entry.threads, inputs),
                         {**common, "estimate_w": profile.watts.get("onnxruntime", 0.0)}),
                "selected": ((bundle / entry.artifact, entry.backend, entry.device, entry.precision, entry.threads,
                              inputs), {**common, "estimate_w": profile.watts.get(entry.backend, 0.0), "batch": batch})}
        if batch > 1:  # the baseline at the same tiles per call too: it keeps its better figure
            jobs["fp32_batched"] = (jobs["fp32"][0], {**jobs["fp32"][1], "batch": batch})
        print(f"{role}: {rounds} alternating rounds of {', '.join(jobs)}", flush=True)
        got = _rounds(rounds, jobs)
        base_runs = [min((r for r in rs), key=lambda r: r.latency_ms_p50)
                     for rs in zip(*[got[k] for k in got if k.startswith("fp32")], strict=True)]
        base = statistics.median(r.latency_ms_p50 for r in base_runs)
        sel = statistics.median(r.latency_ms_p50 for r in got["selected"])
        per_round = [b.latency_ms_p50 / s.latency_ms_p50 for b, s in zip(base_runs, got["selected"], strict=True)]
        base_1 = statistics.median(r.latency_ms_p50 for r in got["fp32"])  # one tile per call: as the FP32 pipeline runs
        gate = entry.gate.model_dump()
        rows[role] = {
            "backend": entry.backend, "device": entry.device, "precision": entry.precision, "method": extra.get("method"),
            "unit": _unit(card, role), "batch": batch, "ms": truncate(sel, 2), "baseline_ms": truncate(base, 2),
            "ratio": truncate(base / sel), "ratio_range": [truncate(min(per_round)), truncate(max(per_round))],
            "baseline_one_per_call_ms": truncate(base_1, 2), "ratio_vs_one_per_call": truncate(base_1 / sel),
            "cpu_ratio": truncate(statistics.median(r.cpu_ms_per_item for r in got["fp32"])
                                  / statistics.median(r.cpu_ms_per_item for r in got["selected"])),
            "peak_rss_mb": truncate(max(r.peak_rss_mb for r in got["selected"]), 1),
            "baseline_peak_rss_mb": truncate(max(r.peak_rss_mb for r in got["fp32"]), 1),
            "optimiser_speedup": entry.speedup,
            "gate": {k: v for k, v in gate.items() if v is not None and k != "reasons"} | {"reasons": gate.get("reasons")},
        }
        if extra.get("window"):
            rows[role]["volume"] = measure_volume(card, card_path, source, bundle, entry, extra, rounds, profile)
    return rows


def measure_volume(card, card_path: Path, source: Path, bundle: Path, entry, extra: dict, rounds: int,  # noqa: ANN001
                   profile) -> dict:  # noqa: ANN001
    """A whole held-out volume through the appliance's sliding window: the bundle's window and artifact
    against ORT FP32 as the card tiles it (one tile per call), alternating fresh processes."""
    from edgescreen.optimize.window import Window, volume_cases

    case = volume_cases(card, 1, OUT / "cache")[0]
    inputs = {k: v[None] for k, v in case.image.items()}
    ref = Window.of_card(card, 1)
    win = extra["window"]
    common = {"runs": 2, "warmup": 1, "work_dir": OUT}
    jobs = {"fp32": ((source, "onnxruntime", "CPU", "fp32", entry.threads, inputs),
                     {**common, "estimate_w": profile.watts.get("onnxruntime", 0.0),
                      "window": {"card": str(card_path), **ref.to_dict()}}),
            "selected": ((bundle / entry.artifact, entry.backend, entry.device, entry.precision, entry.threads, inputs),
                         {**common, "estimate_w": profile.watts.get(entry.backend, 0.0),
                          "window": {"card": str(card_path), **win}})}
    print(f"{card.role}: whole volume {list(case.truth.shape)}, {rounds} alternating rounds", flush=True)
    got = _rounds(rounds, jobs)
    base = statistics.median(r.latency_ms_p50 for r in got["fp32"])
    sel = statistics.median(r.latency_ms_p50 for r in got["selected"])
    per_round = [b.latency_ms_p50 / s.latency_ms_p50 for b, s in zip(got["fp32"], got["selected"], strict=True)]
    wg = extra.get("window_gate") or {}
    return {"shape": list(case.truth.shape), "seed": case.seed, "window": win, "reference_window": ref.to_dict(),
            "ms": truncate(sel, 1), "baseline_ms": truncate(base, 1), "ratio": truncate(base / sel),
            "ratio_range": [truncate(min(per_round)), truncate(max(per_round))],
            "cpu_ratio": truncate(statistics.median(r.cpu_ms_per_item for r in got["fp32"])
                                  / statistics.median(r.cpu_ms_per_item for r in got["selected"])),
            "gate": {k: wg.get(k) for k in ("passed", "dice_vs_fp32", "dice_vs_truth_drop", "ood_flag_rate",
                                            "heldout_cases") if wg.get(k) is not None}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="measure this bundle instead of building one")
    parser.add_argument("--profile", default="x86-cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("extra", nargs="*", help="more arguments for optimize (after --)")
    args = parser.parse_args()
    info = machine()
    data_dir = OUT / "data"
    elapsed = None
    bundle = args.bundle
    if bundle is None:
        bundle = OUT / "bundle"
        elapsed = optimise(args.profile, data_dir, bundle, args.extra)
    rows = measure(bundle, data_dir, args.rounds, args.runs)
    manifest = json.loads((bundle / "manifest.json").read_text())
    section = {"bundle": manifest["bundle_id"], "profile": manifest["profile"], "optimise_s": truncate(elapsed, 1)
               if elapsed is not None else None, "optimise_budget_s": BUDGET_S, "rounds": args.rounds,
               "runs_per_round": args.runs, "baseline": "ONNX Runtime FP32 (CPU) of the same model, same inputs",
               "models": rows}
    stage1 = rows.get("pancreas.stage1", {})
    if stage1:
        best = (stage1.get("volume") or {}).get("ratio") or stage1["ratio"]
        section.update({"stage1_aim_ratio": 5.0, "aim_met": best >= 5.0})
    cmd = ".venv/bin/python bench/bench_optimize.py" + (f" --bundle {args.bundle}" if args.bundle else "") + \
        f" --rounds {args.rounds} --runs {args.runs}"
    write_section("models", section, machine_info=info, command=cmd)
    print(f"\nselected artifact vs ONNX Runtime FP32, same run, {args.rounds} alternating rounds x {args.runs} runs "
          f"(median of p50s), bundle {bundle}")
    print(f"{'model':<17}{'selected':<22}{'per':<18}{'fp32 ms':>9}{'sel ms':>9}{'ratio':>8}{'rss MB':>8}  gate")
    for role, r in rows.items():
        g = r["gate"]
        figures = ", ".join(f"{k}={v:.4f}" for k, v in g.items() if isinstance(v, float))
        print(f"{role:<17}{r['backend'] + '/' + r['precision']:<22}{r['unit']:<18}{r['baseline_ms']:>9.1f}{r['ms']:>9.1f}"
              f"{r['ratio']:>7.2f}x{r['peak_rss_mb']:>8.0f}  {'passed' if g.get('passed') else 'FAILED'} {figures}")
        if r.get("volume"):
            v = r["volume"]
            print(f"{'':<17}whole volume {v['shape']}: {v['baseline_ms']:.0f} -> {v['ms']:.0f} ms, {v['ratio']:.2f}x")
    if elapsed is not None:
        print(f"optimise wall time: {elapsed:.0f} s for {len(rows)} model(s) (budget {BUDGET_S} s for four)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
