"""What the benchmarks share: the phantom studies they measure on, a child process that reports JSON, medians.

Every figure is a same-run ratio: baseline and candidate alternate round by round (who goes first
alternates too), each in a fresh process, so a shared machine's load drifts over both alike. The
machine (CPU, cores, load average at the start) is taken before the first round and stored with the
figures by bench.results_io.write_section.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def ct_series(slices: int = 300, seed: int = 7, lesion: str | None = "pdac") -> Path:
    """A 512x512 phantom CT series with `slices` slices, written once under bench/out and reused."""
    target = OUT / "ct_load" / f"ct{slices}" if (seed, lesion) == (7, "pdac") else OUT / f"ct{slices}-{seed}-{lesion}"
    marker = target / "done.json"
    if not marker.is_file():
        from edgescreen.models.phantom.ct import generate_ct_volume, write_ct_series

        ph = generate_ct_volume(seed, lesion, slices=slices)
        write_ct_series(ph, target, seed)
        marker.write_text(json.dumps({"slices": slices, "seed": seed, "lesion": lesion,
                                      "spacing": [float(s) for s in ph.spacing_mm]}))
    return target


def mg_exam(seed: int = 11, finding: str | None = "malignant") -> Path:
    """A four-view mammography phantom exam (RCC, LCC, RMLO, LMLO) as DICOM, written once and reused."""
    target = OUT / f"mg-{seed}-{finding}"
    marker = target / "done.json"
    if not marker.is_file():
        from edgescreen.models.phantom.mg import write_mg_exam

        write_mg_exam(target, seed, finding)
        marker.write_text(json.dumps({"seed": seed, "finding": finding}))
    return target


def run_child(code: str, *args: str, timeout: float = 3600) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; its last stdout line is JSON. Adds the child's peak RSS (VmHWM)."""
    prologue = (f"import sys, json\nsys.path.insert(0, {str(REPO)!r})\n"
                "def _hwm():\n    for l in open('/proc/self/status'):\n        if l.startswith('VmHWM:'):\n"
                "            return int(l.split()[1]) / 1024\n")
    proc = subprocess.run([sys.executable, "-c", prologue + code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(rounds: int, contenders: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Each contender once per round, in rotating order; returns every run's result per contender."""
    names = list(contenders)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            results[name].append(contenders[name]())
            print(f"round {r + 1} {name}: {summary(results[name][-1])}", flush=True)
    return results


def summary(result: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                     if not isinstance(v, (dict, list)))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def truncate(value: float, digits: int = 3) -> float:
    """Figures are reported as measured, truncated, never rounded up (a 3.9996x is not 4.0x): the optimiser's
    own rule (optimize.run.truncated), one copy."""
    from edgescreen.optimize.run import truncated

    return float(truncated(value, digits))


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM a service the bench started and wait for its clean stop (kill it after 30 s)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
