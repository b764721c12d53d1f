"""Benchmark one artifact in a fresh process: latency p50/p95, throughput, peak RSS, energy per inference.

Why a subprocess per candidate: peak RSS is a per-process high-water mark, so measuring several
candidates in one process would report the worst of them for all; a fresh interpreter per candidate
makes the figure that artifact's own (interpreter + numpy + its runtime + the model), which is what
the box pays when the worker loads it. It also keeps one runtime's thread pools and caches from
slowing the next.

Energy: the appliance's meter (INA3221 on a Jetson, RAPL on x86 where readable) is sampled around the
timed loop; without one, the profile's watts for that backend times the measured time, flagged
``energy_estimated``. RAPL sees the CPU package only, and on a shared box it also sees other work:
treat it as an upper bound for the model alone.

Units: ``latency_ms_*`` are per *item*: per input case at ``batch`` 1, per call divided by ``batch``
when several cases go through one call (a tiled model's tiles per call), so a ratio of two figures is
always work against the same work. With a ``window`` (a tiled model's patch, overlap, tiles per call)
the item is one whole volume run through the appliance's sliding window, activation and accumulation
included: what stage 1 costs a study.

Usage of the child (the parent builds the command): python -m edgescreen.optimize.benchmark SPEC.json
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

_RESULT_PREFIX = "BENCH_RESULT "


@dataclass
class BenchResult:
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_mean: float
    throughput_per_s: float
    runs: int
    warmup: int
    load_s: float
    peak_rss_mb: float
    energy_j_per_inference: float | None
    energy_estimated: bool
    energy_source: str
    batch: int = 1
    unit: str = "inference"
    cpu_ms_per_item: float | None = None  # CPU time of all threads per item: steadier than wall time on a shared box

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _meter(estimate_w: float) -> Any:
    """The appliance's power meter; a minimal RAPL reader if that module is missing; else the estimate."""
    try:
        from edgescreen.appliance.power.meters import detect_meter
    except ImportError:
        return None
    return detect_meter(estimate_w)


def peak_rss_kib() -> int:
    """This process's high-water RSS. VmHWM belongs to the address space made at exec, whereas
    ru_maxrss survives exec and would report the *parent's* size at fork (the optimiser's, ~600 MB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def measure(artifact: Path, backend: str, device: str, precision: str, threads: int | None,
            inputs: dict[str, np.ndarray], runs: int, warmup: int, estimate_w: float, batch: int = 1,
            window: dict[str, Any] | None = None) -> BenchResult:
    """Load, warm up, time ``runs`` calls; called inside the child process.

    ``batch`` > 1 stacks that many copies of the case into one call. ``window`` ({"card": path, "patch",
    "overlap", "batch"}) times a whole volume (``inputs``, batch axis dropped) through the sliding window.
    """
    from edgescreen.appliance.runtime import get_backend

    start = time.perf_counter()
    session = get_backend(backend).load(artifact, device=device, precision=precision, threads=threads)
    if window is not None:
        call, unit, per_call = _window_call(session, inputs, window), "volume", 1
    else:
        feed = {k: np.concatenate([v] * batch) if batch > 1 else v for k, v in inputs.items()}

        def call() -> None:
            session.run(feed)

        unit, per_call = "inference", batch
    for _ in range(warmup):
        call()
    load_s = time.perf_counter() - start
    meter = _meter(estimate_w)
    if meter is not None:
        meter.sample()
    times = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(runs):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    joules, estimated, source = None, True, "none"
    if meter is not None:
        s = meter.sample()
        joules, estimated, source = s.joules, s.estimated, s.source
    if joules is None:  # no meter module or a failed read: the profile estimate
        joules, estimated, source = estimate_w * wall, True, f"estimate:{estimate_w:g}W"
    session.close()
    ms = np.array(times) * 1000.0 / per_call
    items = runs * per_call
    rss_kb = peak_rss_kib()
    return BenchResult(
        latency_ms_p50=float(np.percentile(ms, 50)), latency_ms_p95=float(np.percentile(ms, 95)),
        latency_ms_mean=float(ms.mean()), throughput_per_s=float(items / wall), runs=runs, warmup=warmup,
        load_s=load_s, peak_rss_mb=rss_kb / 1024.0, energy_j_per_inference=joules / items,
        energy_estimated=bool(estimated), energy_source=source, batch=per_call if window is None else window["batch"],
        unit=unit, cpu_ms_per_item=cpu * 1000.0 / items,
    )


def _window_call(session: Any, inputs: dict[str, np.ndarray], window: dict[str, Any]) -> Any:
    from edgescreen.appliance.modelcard import load_card
    from edgescreen.optimize.window import Window, predictor, run_volume

    card = load_card(Path(window["card"]), verify_file=False)
    win = Window(tuple(window["patch"]), float(window["overlap"]), int(window["batch"]))
    image = {k: v[0] for k, v in inputs.items()}  # (1, C, Z, Y, X) -> (C, Z, Y, X)
    predict = predictor(session, card)

    def call() -> None:
        run_volume(predict, card, image, win)

    return call


def run_in_subprocess(artifact: Path, backend: str, device: str, precision: str, threads: int | None,
                      inputs: dict[str, np.ndarray], *, runs: int, warmup: int, estimate_w: float, work_dir: Path,
                      timeout_s: float = 900, batch: int = 1, window: dict[str, Any] | None = None) -> BenchResult:
    """Benchmark in a fresh interpreter and return its figures; raises RuntimeError with its stderr."""
    work_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    inputs_path = work_dir / f"bench-inputs-{tag}.npz"
    np.savez(inputs_path, **inputs)
    spec = {"artifact": str(artifact), "backend": backend, "device": device, "precision": precision,
            "threads": threads, "inputs": str(inputs_path), "runs": runs, "warmup": warmup, "estimate_w": estimate_w,
            "batch": batch, "window": window}
    spec_path = work_dir / f"bench-spec-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "edgescreen.optimize.benchmark", str(spec_path)], capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    finally:
        inputs_path.unlink(missing_ok=True)
        spec_path.unlink(missing_ok=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return BenchResult(**json.loads(line[len(_RESULT_PREFIX):]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"benchmark of {Path(artifact).name} exited {proc.returncode}: {' | '.join(tail)}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    with np.load(spec["inputs"]) as z:
        inputs = {k: z[k] for k in z.files}
    result = measure(Path(spec["artifact"]), spec["backend"], spec["device"], spec["precision"], spec["threads"],
                     inputs, spec["runs"], spec["warmup"], spec["estimate_w"], spec.get("batch", 1), spec.get("window"))
    print(_RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
