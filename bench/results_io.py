"""One machine-readable benchmark report: every bench script merges its section into bench/results.json.

    from bench.results_io import write_section
    write_section("scale", {"store_instances": 1_000_000, "gate_read_ms": 1.2, ...}, command="...")

Each section records the machine it ran on (CPU model, cores, load average at the start) and the command
that reproduces it, so a figure is never quoted without its context. Writes are atomic and serialised
with a lock file, so two benchmarks finishing together never lose each other's section.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.json"


def machine() -> dict[str, Any]:
    """What a figure depends on: the CPU, its cores and how busy the machine was when the run started."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "host": platform.node(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_section(name: str, figures: dict[str, Any], *, command: str | None = None,
                  machine_info: dict[str, Any] | None = None, path: Path = RESULTS) -> dict[str, Any]:
    """Replace section `name` of results.json with `figures` plus `machine` and `command`; return the section.

    Take `machine_info` from `machine()` at the START of the run (the load average then is what matters).
    """
    section = {"machine": machine_info or machine(), "command": command or " ".join([sys.executable, *sys.argv]),
               **figures}
    lock = path.with_suffix(".lock")
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        doc[name] = section
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return section
