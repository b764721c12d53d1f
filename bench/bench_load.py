"""Load on one box (issue 16): receive, queue and API at once, bounded in time, on loopback.

    python bench/bench_load.py                 # the whole run (renders a 300-slice phantom once; ~10-20 min)
    python bench/bench_load.py --streams 4 --api-seconds 20   # a quicker look

1. Receive: N concurrent dcmtk storescu associations (default 20), each sending its own copy of the
   phantom generator's 300-slice 512 x 512 CT series to `edgescreen dicom`. Throughput, per-association
   wall time (median, p95), errors, and lost instances (every acknowledged instance indexed, whole).
   Same-run baseline: dcmtk's storescp receiving the same streams (it does not fsync: the appliance
   fsyncs every instance before answering, so the ratio is the price of durability plus Python).
2. Queue: a store with 10,000 jobs of which 1,000 are queued (bench/gen_store.py) and one real CT study
   marked urgent; the worker analyses it while the queue waits.
3. API: M concurrent clients (default 20; bearer token) looping over /api/v1/studies pages, /api/v1/jobs
   and /api/v1/system for a fixed time, first on the idle box, then while the analysis runs. p50/p95 per
   phase, requests per second, errors; ratio of the two p95s.

Figures go to the `load` section of bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results_io import machine, write_section  # noqa: E402

ENV = {**os.environ, "EDGESCREEN_CONFIG": "", "PYTHONPATH": str(REPO)}
CLI = [sys.executable, "-m", "edgescreen.appliance.cli"]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- sources -------------------------------------------------------------------------------------------
def series_copies(source: Path, out: Path, n: int) -> list[Path]:
    """n copies of a series with their own study, series and instance UIDs (same lengths, patched in place)."""
    import pydicom

    files = sorted(source.glob("CT*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    dirs = []
    for k in range(n):
        d = out / f"copy-{k:02d}"
        d.mkdir(parents=True, exist_ok=True)
        tag = f"{k + 101:03d}"
        study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        for f in files:
            data = f.read_bytes()
            sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for uid in (study, series, sop):
                data = data.replace(uid.encode(), (uid[:-3] + tag).encode())
            (d / f.name).write_bytes(data)
        dirs.append(d)
    return dirs


def run_streams(port: int, dirs: list[Path], aec: str) -> dict:
    """storescu per directory, all at once; wall time per stream and in total."""
    durations: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(d: Path, i: int) -> None:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/storescu", "-aet", f"CT_ROOM_{i}", "-aec", aec, "127.0.0.1", str(port),
                               str(d), "+sd", "+sp", "*.dcm"], env=DCMTK_ENV, capture_output=True, text=True,
                              timeout=1800)
        with lock:
            durations.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                errors.append(proc.stderr[-300:])

    threads = [threading.Thread(target=one, args=(d, i)) for i, d in enumerate(dirs)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    size = sum(f.stat().st_size for d in dirs for f in d.glob("*.dcm"))
    count = sum(1 for d in dirs for _ in d.glob("*.dcm"))
    return {"wall_s": round(wall, 2), "instances": count, "mb": round(size / 1e6, 1),
            "mb_per_s": round(size / 1e6 / wall, 1), "instances_per_s": round(count / wall, 1),
            "stream_median_s": round(statistics.median(durations), 2), "stream_p95_s": round(pct(durations, 0.95), 2),
            "errors": len(errors), "error_samples": errors[:2]}


def receive_phase(work: Path, dirs: list[Path]) -> dict:
    data_dir = work / "recv-data"
    port = free_port()
    cfg = work / "recv.toml"
    cfg.write_text(f"[dicom]\nmax_associations = {len(dirs) + 5}\nmin_free_mb = 0\n")
    proc = subprocess.Popen([*CLI, "--config", str(cfg), "--data-dir", str(data_dir), "dicom", "--port", str(port),
                             "--bind", "127.0.0.1", "--ae-title", "EDGE", "--allow-any-ae", "--stable-after", "3600"],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_echo(port)
        edge = run_streams(port, dirs, "EDGE")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    from edgescreen.appliance.store import Store

    store = Store(data_dir)
    rows = store.query("SELECT path, size FROM instances")
    whole = sum(1 for r in rows if (data_dir / r["path"]).is_file() and (data_dir / r["path"]).stat().st_size == r["size"])
    edge["indexed_whole"] = whole
    edge["lost"] = edge["instances"] - whole
    store.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    # baseline: dcmtk's storescp receiving the same streams (into a scratch directory, no fsync)
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen(["/usr/bin/storescp", "--fork", "-aet", "EDGE", "-od", str(out), str(port)],
                           env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_echo(port)
        base = run_streams(port, dirs, "EDGE")
    finally:
        scp.send_signal(signal.SIGTERM)
        scp.wait(timeout=30)
        shutil.rmtree(out, ignore_errors=True)
    return {"edgescreen": edge, "storescp_baseline": base,
            "wall_ratio_edgescreen_over_storescp": round(edge["wall_s"] / base["wall_s"], 2)}


def _wait_echo(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["/usr/bin/echoscu", "-aec", "EDGE", "127.0.0.1", str(port)], env=DCMTK_ENV,
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered C-ECHO on port {port}")


# -- API -------------------------------------------------------------------------------------------------
def api_clients(base: str, token: str, clients: int, seconds: float, pages: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = random.Random(i)
        paths = ["/api/v1/studies?page={}&per_page=50", "/api/v1/jobs", "/api/v1/system",
                 "/api/v1/studies?page={}&per_page=50&state=waiting"]
        while time.monotonic() < stop:
            path = rng.choice(paths).format(rng.randint(1, pages))
            req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    resp.read()
                    ok = resp.status == 200
            except (urllib.error.URLError, OSError) as exc:
                ok = False
                with lock:
                    errors.append(f"{path}: {exc}")
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                if ok:
                    latencies.append(dt)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"requests": len(latencies), "rps": round(len(latencies) / seconds, 1),
            "p50_ms": round(pct(latencies, 0.5), 1), "p95_ms": round(pct(latencies, 0.95), 1),
            "errors": len(errors), "error_samples": errors[:3]}


def queue_and_api_phase(work: Path, ct_dir: Path, clients: int, seconds: float, ct_slices: int) -> dict:
    from bench.gen_store import generate

    data_dir = work / "queue-data"
    gen = generate(data_dir, studies=10_000, ct_slices=ct_slices, files=True)
    subprocess.run([*CLI, "--data-dir", str(data_dir), "users", "add", "bench", "--role", "admin"], cwd=REPO, env=ENV,
                   check=True, capture_output=True)
    out = subprocess.run([*CLI, "--data-dir", str(data_dir), "users", "token", "bench", "--label", "load"], cwd=REPO,
                         env=ENV, check=True, capture_output=True, text=True).stdout
    token = out.strip().splitlines()[-1].strip()
    # the real study: ingested like an upload, queued, marked urgent so it runs ahead of the 1,000 waiting
    from edgescreen.appliance.config.site import Dicom
    from edgescreen.appliance.dicom.ingest import Ingestor, ingest_file, queue_series
    from edgescreen.appliance.store import Store, jobs

    store = Store(data_dir)
    ingestor = Ingestor(store, Dicom(min_free_mb=0))
    series = {ingest_file(store, ingestor.cfg, f, source="upload:bench", ingestor=ingestor).series_uid
              for f in sorted(ct_dir.glob("CT*.dcm"))}
    queue_series(store, series)
    marks = ",".join("?" * len(series))
    real = store.query_one(f"SELECT id FROM jobs WHERE series_uid IN ({marks})", tuple(series))
    if real is None:
        raise SystemExit(f"the phantom CT was not queued for analysis: {queue_series(store, series)}")
    jobs.set_flag(store, real["id"], "urgent", "bench")
    queued = store.query_one("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")[0]
    store.close()

    cfg = work / "queue.toml"
    cfg.write_text("[scheduler]\nidle_grace_s = 0\nstore_quiet_s = 0\nfailsafe = \"idle\"\n"
                   "[web]\nthreads = 8\n")
    port = free_port()
    web = subprocess.Popen([*CLI, "--config", str(cfg), "--data-dir", str(data_dir), "serve", "--host", "127.0.0.1",
                            "--port", str(port)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=2).read()
                break
            except OSError:
                time.sleep(0.3)
        pages = max(1, gen["studies"] // 50)
        idle = api_clients(base, token, clients, seconds, pages)
        worker = subprocess.Popen([*CLI, "--config", str(cfg), "--data-dir", str(data_dir), "worker", "--poll", "0.5"],
                                  cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(3)  # the worker has taken the urgent study and is analysing it
            busy = api_clients(base, token, clients, seconds, pages)
            state = Store(data_dir).query_one("SELECT state, stage, progress, error FROM jobs WHERE id = ?",
                                              (real["id"],))
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=300)
    finally:
        web.send_signal(signal.SIGTERM)
        web.wait(timeout=60)
    return {"store": gen, "queued_jobs": queued, "clients": clients, "seconds": seconds, "api_idle": idle,
            "api_while_analysing": busy, "analysis_state_at_end": dict(state) if state else None,
            "p95_ratio_busy_over_idle": round(busy["p95_ms"] / idle["p95_ms"], 2) if idle["p95_ms"] else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--api-seconds", type=float, default=60.0)
    parser.add_argument("--queue-ct-slices", type=int, default=40,
                        help="CT series length in the queue phase's store (10,000 studies and jobs either way)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temp dir, removed after)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--skip-receive", action="store_true", help="only the queue and API phase")
    args = parser.parse_args(argv)
    info = machine()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgescreen-load-"))
    try:
        from bench.bench_dicom_receive import make_series

        # the phantom series bench_dicom_receive.py renders and caches (minutes to render, once)
        ct_dir = make_series(Path(tempfile.gettempdir()) / "edgescreen-bench-ct" / f"s{args.slices}", args.slices)[0].parent
        figures: dict = {}
        if not args.skip_receive:
            dirs = series_copies(ct_dir, work / "copies", args.streams)
            figures["receive"] = receive_phase(work, dirs)
            shutil.rmtree(work / "copies", ignore_errors=True)
        figures["queue_and_api"] = queue_and_api_phase(work, ct_dir, args.clients, args.api_seconds,
                                                       args.queue_ct_slices)
        figures["streams"], figures["slices"] = args.streams, args.slices
        print(json.dumps(figures, indent=2))
        if not args.no_write:
            write_section("load", figures, machine_info=info)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if not re.search(r'"errors": [1-9]', json.dumps(figures)) else 1


if __name__ == "__main__":
    sys.exit(main())
