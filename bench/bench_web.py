"""Web UI and API under a clinic-year store: worklist, API, study page, slice scrolling, and 20 API clients while
a CT analysis runs (issue 11's performance targets). Writes the "web" section of bench/results.json.

    python bench/bench_web.py                  # 10,000 studies (3,000 CT x 300 slices), rows + small files
    python bench/bench_web.py --no-files       # rows only (the worklist never opens an instance file)
    python bench/bench_web.py --studies 2000   # a quick look

Everything is measured over HTTP against a real `edgescreen serve` (waitress) on loopback, with an API token.
Same-run baselines: the pre-issue-11 listing (appliance.store.instances.list_studies, one query per study, the
whole store in one response) on the same store; and the 20 clients' p95 with the box idle. Slices are rendered
from a real 300-slice phantom CT ingested into the same store (the generated files are 8x8 pixels) and
analysed by a real `edgescreen worker`, which is also the analysis the 20 clients run against.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results_io import machine, write_section  # noqa: E402

EDGESCREEN = [sys.executable, "-m", "appliance.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": round(pct(values, 0.5) * 1000, 1), "p95_ms": round(pct(values, 0.95) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1)}


class Client:
    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token

    def get(self, path: str) -> tuple[float, bytes]:
        req = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {self.token}"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as resp:
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{path}: {resp.status}")
        return time.perf_counter() - t0, body


def timed(client: Client, path: str, n: int) -> dict:
    client.get(path)  # warm the process (imports, the first-use trigger check)
    return ms([client.get(path)[0] for _ in range(n)])


def prepare(data: Path, studies: int, files: bool) -> dict:
    from appliance import accounts
    from appliance.config.site import Dicom
    from appliance.dicom.ingest import Ingestor, ingest_file, queue_series
    from appliance.store import Store
    from bench.gen_store import generate
    from models.phantom.ct import write_ct_study

    t0 = time.perf_counter()
    counts = generate(data, studies=studies, ct_slices=300, files=files)
    gen_s = time.perf_counter() - t0
    store = Store(data)
    with store.transaction() as conn:  # the generated queue is not analysable (8x8 files): only the phantom runs
        conn.execute("UPDATE jobs SET state = 'failed', error = 'bench: generated' WHERE state IN ('queued', 'running')")
    phantom = data.parent / "phantom-ct"
    write_ct_study(phantom, 3, lesion="pdac", slices=300)
    ingestor = Ingestor(store, Dicom(min_free_mb=0))
    series = {ingest_file(store, ingestor.cfg, p, source="bench", ingestor=ingestor).series_uid
              for p in sorted(phantom.glob("*.dcm"))}
    queue_series(store, series)
    from appliance.scheduler.scanner import set_manual

    # no DICOM service runs here, so the gate's fail-safe would read the scanner as busy: staff say it is idle
    set_manual(store, "idle", "bench")
    accounts.create_user(store, "bench", "admin", "bench password 1", actor="bench")
    token = accounts.create_token(store, "bench", "bench", actor="bench")
    study = store.query_one("SELECT study_uid, series_uid FROM series WHERE series_uid = ?", (next(iter(series)),))
    t0 = time.perf_counter()
    from appliance.store.instances import list_studies

    baseline_rows = len(list_studies(store))  # the old /api/studies: every study, a query per study
    baseline_s = time.perf_counter() - t0
    store.close()
    return {"counts": counts, "generate_s": gen_s, "token": token, "study": study["study_uid"],
            "series": study["series_uid"], "baseline_list_s": baseline_s, "baseline_rows": baseline_rows}


def _serve(data: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([*EDGESCREEN, "--data-dir", str(data), "serve", "--port", str(port)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(data / "serve.log", "w"),  # noqa: SIM115
                            env={**os.environ, "EDGESCREEN_CONFIG": ""})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.2)
    raise RuntimeError("serve did not listen")


def concurrent(client: Client, paths: list[str], clients: int, seconds: float) -> tuple[list[float], int]:
    """`clients` threads, each cycling through `paths` for `seconds`; returns latencies and errors."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            try:
                dt, _ = client.get(paths[i % len(paths)])
                with lock:
                    latencies.append(dt)
            except Exception:
                with lock:
                    errors[0] += 1
            i += 1

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--no-files", action="store_true", help="rows only (minutes faster; the worklist reads none)")
    parser.add_argument("--n", type=int, default=60, help="requests per sequential figure")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--keep", type=Path, help="keep the store in this directory")
    args = parser.parse_args(argv)
    info = machine()
    root = Path(tempfile.mkdtemp(prefix="bench-web-"))
    data = args.keep or root / "data"
    print(f"generating {args.studies} studies in {data} ...", flush=True)
    prep = prepare(data, args.studies, not args.no_files)
    port = _free_port()
    server = _serve(data, port)
    client = Client(f"http://127.0.0.1:{port}", prep["token"])
    figures: dict = {"studies": prep["counts"].get("studies"), "instances": prep["counts"].get("instances"),
                     "files": not args.no_files, "generate_s": round(prep["generate_s"], 1)}
    try:
        # -- the worklist and the API, sequential --------------------------------------------------------
        figures["worklist_page"] = timed(client, "/worklist", args.n)
        figures["worklist_filtered"] = timed(client, "/worklist?state=failed&modality=CT&sort=patient", args.n)
        figures["worklist_page_100"] = timed(client, "/worklist?page=100", args.n)
        figures["worklist_search"] = timed(client, "/worklist?q=PATIENT", args.n)
        figures["api_studies"] = timed(client, "/api/v1/studies", args.n)
        figures["api_studies_triage"] = timed(client, "/api/v1/studies?triage=suspicious&sort=received&dir=asc",
                                              args.n)
        figures["baseline_list_studies_s"] = round(prep["baseline_list_s"], 3)
        figures["speedup_api_vs_baseline_listing"] = round(prep["baseline_list_s"] /
                                                           (figures["api_studies"]["p50_ms"] / 1000), 1)
        # -- the study page: first slice, scrolling ------------------------------------------------------
        base = f"/studies/{prep['study']}"
        series = f"{base}/series/{prep['series']}"
        first = []
        for k in range(10):  # the page, then its first slice, cold (a new slice each time)
            t_page, _ = client.get(base)
            t_slice, png = client.get(f"{series}/slices/{100 + k}.png?preset=soft")
            first.append(t_page + t_slice)
        figures["study_first_slice"] = ms(first)
        figures["slice_png_kb"] = round(len(png) / 1024, 1)
        cold = [client.get(f"{series}/slices/{i}.png?preset=pancreas")[0] for i in range(150, 250)]
        figures["scroll_cold"] = {**ms(cold), "slices_per_s": round(len(cold) / sum(cold), 1)}
        warm = [client.get(f"{series}/slices/{i}.png?preset=pancreas")[0] for i in range(150, 250)]
        figures["scroll_cached"] = {**ms(warm), "slices_per_s": round(len(warm) / sum(warm), 1)}
        # -- 20 clients, idle box, then while the phantom CT is analysed -----------------------------------
        paths = ["/api/v1/studies", "/api/v1/studies?state=done&page=3", "/api/v1/jobs?state=running",
                 f"/api/v1/studies/{prep['study']}", "/api/v1/studies?q=PATIENT&sort=patient"]
        idle, idle_err = concurrent(client, paths, args.clients, 20)
        figures["clients_idle"] = {**ms(idle), "errors": idle_err, "clients": args.clients}
        worker = subprocess.Popen([*EDGESCREEN, "--data-dir", str(data), "worker", "--once", "--poll", "0.5"],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(root / "worker.log", "w"),  # noqa: SIM115
                                  env={**os.environ, "EDGESCREEN_CONFIG": ""})
        deadline = time.monotonic() + 120
        started = False
        while time.monotonic() < deadline and not started:  # measure only while the analysis really runs
            state = json.loads(client.get("/api/v1/jobs?state=running&limit=5")[1])["jobs"]
            started = any(j["study_uid"] == prep["study"] for j in state)
            time.sleep(0.5)
        busy, busy_err = concurrent(client, paths, args.clients, 40)
        still_running = worker.poll() is None
        figures["clients_during_analysis"] = {**ms(busy), "errors": busy_err, "clients": args.clients,
                                              "analysis_started_before": started,
                                              "analysis_running_throughout": still_running}
        figures["p95_ratio_during_vs_idle"] = round(pct(busy, 0.95) / pct(idle, 0.95), 2)
        worker.wait(timeout=1800)
        job = json.loads(client.get(f"/api/v1/studies/{prep['study']}")[1])["jobs"][-1]
        figures["analysis"] = {"state": job["state"], "error": job["error"],
                               "seconds": round((job["finished_at"] or 0) - (job["started_at"] or 0), 1)}
        # -- overlays after the analysis, cold ---------------------------------------------------------------
        overlays = []
        for i in range(120, 160):
            overlays.append(client.get(f"{series}/overlays/organs/{i}.png")[0])
        figures["overlay_organs_cold"] = ms(overlays)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
    figures["targets"] = {
        "worklist_p95_under_200ms": figures["worklist_page"]["p95_ms"] < 200,
        "api_studies_p95_under_200ms": figures["api_studies"]["p95_ms"] < 200,
        "first_slice_p95_under_300ms": figures["study_first_slice"]["p95_ms"] < 300,
        "scroll_10_per_s_cold": figures["scroll_cold"]["slices_per_s"] >= 10,
        "clients_p95_under_500ms_during_analysis": figures["clients_during_analysis"]["p95_ms"] < 500,
    }
    section = write_section("web", figures, machine_info=info)
    print(json.dumps(section, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
