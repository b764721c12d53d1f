"""Sync benchmark: items per second delivered to the fleet receiver against a plain HTTP POST loop, the backlog of
a clinic day after the link comes back, and what a draining backlog costs a CT analysis and the web API.

Same run, same machine, same receiver (SQLite, one process, on loopback):
  baseline     a bare loop of JSON POSTs (requests, keep-alive) of the same summaries: no outbox, no
               de-identification, no leases; what the transport alone costs
  sync_clean   `SyncService.run_once` over the outbox (claims, de-identified summaries, sent marks)
               baseline and sync_clean alternate, `--rounds` times each, with fresh keys every round
  sync_faults  the same through tests/fault_proxy.py (drop, drop_after, delay, 500, 503, reset, truncate);
               then the delivery ratio (stored / queued) and duplicates (rows per key - 1) in the database
  backlog      a clinic day (200 studies: summary + SEG + SR each = 600 items, SEG and SR de-identified at
               send time) queued while the link was down all night; the service (`run_forever`, the
               default [sync] timings) is running; seconds from the receiver coming back to the first and
               to the last item stored (the first includes the link probe's backoff, capped at 30 s)
  interference a real `edgescreen worker` analyses a CT study (reference models) per run, in rotating order
               with no sync running, with `edgescreen sync` as shipped (niced, idle I/O, yielding to
               inference) and with the sync only niced (yield_to_inference = false), a backlog waiting each
               time; and the web API's latency (an `edgescreen serve` on the same store, polled meanwhile).
               The receiver runs at nice 19, idle I/O: it stands for the cloud, which is not on the box.
  tiles        the finer same-run A/B: stage 2's model (reference FP32, ONNX Runtime, the worker's threads)
               run on one tile batch after another in a child process, while one `edgescreen sync` drains a
               backlog in windows of `--window` seconds and is SIGSTOPped in the windows between (ABBA order,
               so a drift of the machine's load cancels); per-batch time and API latency by window state.

Writes section "sync" of bench/results.json (bench/results_io.py). Run: .venv/bin/python bench/bench_sync.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import stop_process  # noqa: E402
from bench.results_io import machine, write_section  # noqa: E402

EDGESCREEN = [sys.executable, "-m", "edgescreen.appliance.cli"]
ENV = {**os.environ, "EDGESCREEN_CONFIG": "", "PYTHONPATH": str(REPO)}
BODY = {"schema_version": 1, "pipeline": "pancreas", "triage": "suspicious", "abnormal_probability": 0.9,
        "threshold": 0.5, "lesions": [], "models": []}


def _service(data_dir: Path, url: str, **sync: object):  # noqa: ANN202
    from edgescreen.appliance.config.site import SiteConfig
    from edgescreen.appliance.context import AppContext
    from edgescreen.appliance.sync.service import SyncService

    config = SiteConfig.model_validate({"sync": {"url": url, "heartbeat_s": 86400, **sync}})
    return SyncService(AppContext(config=config, data_dir=data_dir))


def _count(db: Path, device: str | None = None) -> tuple[int, int]:
    where = "kind <> 'cloud.health'" + (f" AND device_id = '{device}'" if device else "")
    with sqlite3.connect(db, timeout=60) as conn:
        rows, keys = conn.execute(f"SELECT COUNT(*), COUNT(DISTINCT idempotency_key) FROM items WHERE {where}"
                                  ).fetchone()
    return rows, keys


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def _cloud(data_dir: Path, port: int, *, nice: int = 0) -> subprocess.Popen:
    """The fleet receiver; at `nice` 19 and idle I/O it stands for the cloud, which is not on the box."""
    data_dir.mkdir(parents=True, exist_ok=True)
    prefix = ["nice", "-n", str(nice), "ionice", "-c", "3"] if nice else []
    proc = subprocess.Popen([*prefix, *EDGESCREEN, "cloud-receiver", "--port", str(port), "--data-dir", str(data_dir),
                             "--allow-any-device"], stdout=subprocess.DEVNULL,
                            stderr=open(data_dir / "receiver.log", "ab"), env=ENV, cwd=REPO)  # noqa: SIM115
    _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc



def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


# -- throughput ------------------------------------------------------------------------------------------
def throughput(root: Path, src: Path, items: int, rounds: int) -> dict[str, object]:
    import requests

    from tests.test_sync_drill import queue_items

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    rec = _cloud(root / "cloud", port)
    baseline_s: list[float] = []
    clean_s: list[float] = []
    try:
        def baseline(r: int) -> None:
            session = requests.Session()
            session.headers["X-Edgescreen-Device"] = f"baseline-{r}"
            t0 = time.perf_counter()
            for i in range(items):
                resp = session.post(url + "/api/v1/items", json={"key": f"cloud.finding:b{i}", "kind": "cloud.finding",
                                                                 "body": BODY}, timeout=30)
                resp.raise_for_status()
            baseline_s.append(time.perf_counter() - t0)
            session.close()

        def clean(r: int) -> None:
            box = root / f"clean-{r}"
            queue_items(box, items, src, file_every=10**9, seed=100 + r)
            service = _service(box, url, device_id=f"clean-{r}", timeout_s=5)
            t0 = time.perf_counter()
            assert service.run_once() == 0
            clean_s.append(time.perf_counter() - t0)
            service.close()
            assert _count(root / "cloud" / "receiver.db", f"clean-{r}")[1] == items

        for r in range(rounds):  # alternate which goes first
            for run in ((baseline, clean) if r % 2 == 0 else (clean, baseline)):
                run(r)
            print(f"round {r + 1}: baseline {items / baseline_s[-1]:.1f}/s, sync {items / clean_s[-1]:.1f}/s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)

        # the sync service through the fault proxy
        from tests.fault_proxy import FaultProxy
        from tests.test_sync_drill import FAULTS

        faulty = root / "faults"
        keys, _ = queue_items(faulty, items, src, file_every=10**9, seed=2)
        with FaultProxy([port], faults=FAULTS, seed=3) as proxy:
            service = _service(faulty, proxy.url, device_id="faults", timeout_s=5, retry_base_s=0.05, retry_max_s=0.5)
            t0 = time.perf_counter()
            code = service.run_once(max_attempts=40)
            faults_s = time.perf_counter() - t0
            service.close()
            injected = {k: v for k, v in proxy.counts.items() if k != "pass"}
        rows, distinct = _count(root / "cloud" / "receiver.db", "faults")
    finally:
        stop_process(rec)
    per_round = [b / c for b, c in zip(baseline_s, clean_s, strict=True)]
    base, sync = _median(baseline_s), _median(clean_s)
    return {
        "items": items, "rounds": rounds,
        "baseline_items_per_s": round(items / base, 1),
        "sync_clean_items_per_s": round(items / sync, 1),
        "sync_clean_vs_baseline": round(base / sync, 3),
        "sync_clean_vs_baseline_per_round": [round(x, 3) for x in per_round],
        "sync_faults_items_per_s": round(items / faults_s, 1),
        "sync_faults_vs_baseline": round(base / faults_s, 3),
        "faults_injected": injected, "fault_run_exit": code,
        "delivery_ratio": round(distinct / len(keys), 4), "duplicates": rows - distinct,
    }


# -- a clinic day's backlog after the link comes back -------------------------------------------------
def backlog(root: Path, seg: Path, sr: Path, studies: int) -> dict[str, object]:
    from edgescreen.appliance.store import Store, outbox
    from edgescreen.appliance.store.outbox import OutboxItem

    box = root / "backlog"
    store = Store(box)
    items = []
    for s in range(studies):
        group = f"cloud:day-{s}"
        items += [OutboxItem("cloud.finding", f"cloud.finding:day{s}", {"study_uid": "1.2.3", "phi": False,
                             "findings": {**BODY, "study_uid": "1.2.3"}}, group),
                  OutboxItem("cloud.seg", f"cloud.seg:day{s}", {"study_uid": "1.2.3", "file": str(seg), "phi": False},
                             group),
                  OutboxItem("cloud.sr", f"cloud.sr:day{s}", {"study_uid": "1.2.3", "file": str(sr), "phi": False},
                             group)]
    with store.transaction() as conn:
        outbox.add_items(conn, items)
    port = _free_port()
    service = _service(box, f"http://127.0.0.1:{port}", device_id="backlog")  # the default timings
    service.link_failures = 20  # the link was down all night: the probe's backoff is at its cap
    thread = threading.Thread(target=service.run_forever, daemon=True)
    thread.start()
    time.sleep(2)
    rec = _cloud(root / "cloud2", port)
    back = time.perf_counter()
    first = None
    try:
        db = root / "cloud2" / "receiver.db"
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            stored = _count(db)[1]
            if stored and first is None:
                first = time.perf_counter() - back
            if stored >= len(items):
                break
            time.sleep(0.2)
        total = time.perf_counter() - back
    finally:
        service.stop.set()
        thread.join(timeout=60)
        service.close()
        stop_process(rec)
    rows, keys = _count(root / "cloud2" / "receiver.db")
    return {"backlog_studies": studies, "backlog_items": len(items), "backlog_delivered": keys,
            "backlog_duplicates": rows - keys,
            "backlog_seconds_to_first_item": round(first or -1, 2),
            "backlog_seconds_after_link_back": round(total, 2),
            "backlog_items_per_s_once_moving": round(len(items) / max(0.001, total - (first or 0)), 1)}


# -- does a draining backlog slow inference or the UI? -------------------------------------------------
ANALYSIS = """
import time
from pathlib import Path
from edgescreen.appliance.pipeline.analyze import AnalysisRequest, analyze_study
study, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = []
for i in range(2):
    t = time.perf_counter()
    f = analyze_study(AnalysisRequest([study], out / str(i)))
    runs.append(time.perf_counter() - t)
print(json.dumps({"cold_s": runs[0], "warm_s": runs[1], "triage": f["triage"]}))
"""


class ApiPoller:
    """GETs of the web API (worklist and system page data) every 0.2 s while it runs; latencies in seconds."""

    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token
        self.latencies: list[float] = []
        self.times: list[float] = []  # when each request started (time.time())
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        paths = ["/api/v1/studies", "/api/v1/system"]
        i = 0
        while not self.stop.is_set():
            req = urllib.request.Request(self.base + paths[i % 2], headers={"Authorization": f"Bearer {self.token}"})
            t0, w0 = time.perf_counter(), time.time()
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    resp.read()
                self.latencies.append(time.perf_counter() - t0)
                self.times.append(w0)
            except OSError:
                self.errors += 1
            i += 1
            self.stop.wait(0.2)

    def __enter__(self) -> ApiPoller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)


TILES = """
import time
import numpy as np
from edgescreen.appliance.pipeline.analyze import default_models_dir, load_models, resolve_models
seconds = float(sys.argv[1])
choices, _, _ = resolve_models(("pancreas.stage2",), default_models_dir(), None, "onnxruntime")
model = load_models(choices, None, 1)["pancreas.stage2"]
x = np.random.default_rng(0).random((1, 1, 96, 80, 96), dtype=np.float32)
model.predict({"ct": x})
samples, end = [], time.time() + seconds
while time.time() < end:
    t0, w0 = time.perf_counter(), time.time()
    model.predict({"ct": x})
    samples.append((w0, time.perf_counter() - t0))
print(json.dumps({"samples": samples}))
"""


def _backlog_items(tag: str, studies: int, seg: Path, sr: Path) -> list:
    from edgescreen.appliance.store.outbox import OutboxItem

    return [it for s in range(studies) for it in (
        OutboxItem("cloud.finding", f"cloud.finding:{tag}s{s}", {"study_uid": "1.2.3", "phi": False,
                   "findings": {**BODY, "study_uid": "1.2.3"}}, f"cloud:{tag}s{s}"),
        OutboxItem("cloud.seg", f"cloud.seg:{tag}s{s}", {"study_uid": "1.2.3", "file": str(seg), "phi": False},
                   f"cloud:{tag}s{s}"),
        OutboxItem("cloud.sr", f"cloud.sr:{tag}s{s}", {"study_uid": "1.2.3", "file": str(sr), "phi": False},
                   f"cloud:{tag}s{s}"))]


def tiles(root: Path, seg: Path, sr: Path, window_s: float, windows: int, studies: int) -> dict[str, object]:
    """Tile-batch time and API latency with the sync service draining (running) or not (SIGSTOPped)."""
    from bench.harness import run_child
    from edgescreen.appliance import accounts
    from edgescreen.appliance.store import Store, outbox

    box = root / "tiles-box"
    store = Store(box)
    accounts.create_user(store, "bench", "admin", "bench password 1", actor="bench")
    token = accounts.create_token(store, "bench", "bench", actor="bench")
    with store.transaction() as conn:
        outbox.add_items(conn, _backlog_items("t", studies, seg, sr))
    store.close()
    cloud_port, web_port = _free_port(), _free_port()
    cloud = _cloud(root / "cloud4", cloud_port, nice=19)
    web = subprocess.Popen([*EDGESCREEN, "--data-dir", str(box), "serve", "--port", str(web_port)], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=open(box / "serve.log", "ab"), env=ENV)  # noqa: SIM115
    cfg = root / "tiles-sync.toml"
    cfg.write_text(f'[sync]\nurl = "http://127.0.0.1:{cloud_port}"\ndevice_id = "tile-box"\nheartbeat_s = 86400\n'
                   "interval_s = 1\n")
    sync = subprocess.Popen(["ionice", "-c", "3", *EDGESCREEN, "--config", str(cfg), "--data-dir", str(box), "sync"],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=open(box / "sync.log", "ab"))  # noqa: SIM115
    plan: list[tuple[float, float, bool]] = []  # (start, end, sync running)
    result: dict = {}
    try:
        _wait_http(f"http://127.0.0.1:{web_port}/healthz", web)
        deadline = time.monotonic() + 120
        while _count(root / "cloud4" / "receiver.db", "tile-box")[1] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)  # the backlog is moving
        child = threading.Thread(target=lambda: result.update(run_child(TILES, str(window_s * windows + 20))))
        with ApiPoller(f"http://127.0.0.1:{web_port}", token) as poller:
            child.start()
            time.sleep(15)  # the child loads its model
            for w in range(windows):
                running = (w % 4) in (0, 3)  # ABBA: on, off, off, on, ...
                for proc in (sync, cloud):
                    proc.send_signal(signal.SIGCONT if running else signal.SIGSTOP)
                start = time.time()
                time.sleep(window_s)
                plan.append((start + 0.5, time.time(), running))  # the first half second settles
            for proc in (sync, cloud):
                proc.send_signal(signal.SIGCONT)
            child.join()
            api = list(zip(poller.times, poller.latencies, strict=True))
        delivered = _count(root / "cloud4" / "receiver.db", "tile-box")[1]
        left = Store(box).query_one("SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'sending')")[0]
    finally:
        for proc in (sync, cloud):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        stop_process(sync)
        stop_process(web)
        stop_process(cloud)

    def state_at(t: float) -> bool | None:
        return next((running for start, end, running in plan if start <= t < end), None)

    batch = {True: [], False: []}
    for t, dt in result["samples"]:
        if (s := state_at(t)) is not None:
            batch[s].append(dt)
    latency = {True: [], False: []}
    for t, dt in api:
        if (s := state_at(t)) is not None:
            latency[s].append(dt)
    per_pair = []
    for w in range(0, windows - 1, 2):  # (on, off) or (off, on) neighbours
        a = [dt for t, dt in result["samples"] if plan[w][0] <= t < plan[w][1]]
        b = [dt for t, dt in result["samples"] if plan[w + 1][0] <= t < plan[w + 1][1]]
        if a and b:
            on, off = (a, b) if plan[w][2] else (b, a)
            per_pair.append(round(_median(on) / _median(off), 3))
    return {
        "model": "pancreas.stage2 reference FP32 (ONNX Runtime), one 96x80x96 tile per call",
        "windows": windows, "window_s": window_s,
        "batches": [len(batch[True]), len(batch[False])],
        "batch_ms_median_quiet": round(_median(batch[False]) * 1000, 1),
        "batch_ms_median_with_sync": round(_median(batch[True]) * 1000, 1),
        "batch_with_sync_vs_quiet": round(_median(batch[True]) / _median(batch[False]), 3),
        "batch_with_sync_vs_quiet_per_pair": per_pair,
        "batch_ms_p95_quiet": round(_pct(batch[False], 0.95) * 1000, 1),
        "batch_ms_p95_with_sync": round(_pct(batch[True], 0.95) * 1000, 1),
        "api_p50_ms_quiet": round(_pct(latency[False], 0.5) * 1000, 1),
        "api_p95_ms_quiet": round(_pct(latency[False], 0.95) * 1000, 1),
        "api_p50_ms_with_sync": round(_pct(latency[True], 0.5) * 1000, 1),
        "api_p95_ms_with_sync": round(_pct(latency[True], 0.95) * 1000, 1),
        "sync_items_delivered": delivered, "sync_backlog_left_after": left,
    }


def _copy_study(src: Path, dst: Path) -> None:
    """The phantom study under new UIDs: another patient's study for each analysis (same pixels, same work)."""
    import pydicom
    from pydicom.uid import generate_uid

    dst.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(dst / f.name)


def interference(root: Path, slices: int, rounds: int, backlog_studies: int) -> dict[str, object]:
    """A real `edgescreen worker` analyses one study per run while, in turn, no sync runs ("quiet"), the sync
    service runs as shipped ("sync": it yields to inference) or with yield_to_inference = false ("niced_only":
    the nice and idle I/O class alone); the same backlog is waiting each time. The analysis time is the job's
    findings timings_s.total; the web API is polled meanwhile."""

    from bench.harness import ct_series, run_child
    from edgescreen.appliance import accounts
    from edgescreen.appliance.config.site import Dicom
    from edgescreen.appliance.dicom.ingest import Ingestor, ingest_file, queue_series
    from edgescreen.appliance.scheduler.scanner import set_manual
    from edgescreen.appliance.store import Store, outbox

    study = ct_series(slices)
    warm = root / "warmup"
    if not (warm / "1" / "seg.dcm").is_file():
        print("interference: a first analysis (its SEG and SR are the backlog's files) ...", flush=True)
        run_child(ANALYSIS, str(study), str(warm))
    seg, sr = warm / "1" / "seg.dcm", warm / "1" / "sr.dcm"
    box = root / "box"
    store = Store(box)
    accounts.create_user(store, "bench", "admin", "bench password 1", actor="bench")
    token = accounts.create_token(store, "bench", "bench", actor="bench")
    set_manual(store, "idle", "bench")  # no DICOM service here: staff say the scanner is idle
    ingestor = Ingestor(store, Dicom(min_free_mb=0))
    cloud_port, web_port = _free_port(), _free_port()
    cloud = _cloud(root / "cloud3", cloud_port, nice=19)
    cloud_db = root / "cloud3" / "receiver.db"
    worker_cfg = root / "worker.toml"
    worker_cfg.write_text("[scheduler]\nidle_grace_s = 0\nstore_quiet_s = 0\n")
    procs = {
        "web": subprocess.Popen([*EDGESCREEN, "--data-dir", str(box), "serve", "--port", str(web_port)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=open(box / "serve.log", "ab"), env=ENV),  # noqa: SIM115
        "worker": subprocess.Popen([*EDGESCREEN, "--config", str(worker_cfg), "--data-dir", str(box), "worker",
                                    "--poll", "0.2"], cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=open(box / "worker.log", "ab"), env=ENV),  # noqa: SIM115
    }
    contenders = ("quiet", "sync", "niced_only")
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    n = [0]

    def analyse() -> tuple[dict, ApiPoller]:
        """Ingest a new copy of the study and wait for the worker to finish it; the job's findings."""
        n[0] += 1
        folder = root / f"study-{n[0]}"
        _copy_study(study, folder)
        series = {ingest_file(store, ingestor.cfg, f, source="bench", ingestor=ingestor).series_uid
                  for f in sorted(folder.glob("*.dcm"))}
        with ApiPoller(f"http://127.0.0.1:{web_port}", token) as poller:
            queue_series(store, series)
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                row = store.query_one("SELECT j.state, r.findings FROM jobs j LEFT JOIN results r ON r.job_id = j.id "
                                      "WHERE j.series_uid = ?", (next(iter(series)),))
                if row is not None and row["state"] in ("done", "failed", "quarantined"):
                    break
                time.sleep(0.2)
        if row is None or row["state"] != "done":
            raise RuntimeError(f"the bench's job ended {row['state'] if row else 'never'}; see {box}/worker.log")
        shutil.rmtree(folder, ignore_errors=True)
        return json.loads(row["findings"]), poller

    try:
        _wait_http(f"http://127.0.0.1:{web_port}/healthz", procs["web"])
        first = analyse()[0]  # the worker loads (and caches) its models
        print(f"interference: the worker's first analysis took {first['timings_s']['total']:.1f} s", flush=True)
        for r in range(rounds):
            for name in contenders[r % 3:] + contenders[:r % 3]:  # rotate the order
                sync_proc = None
                if name != "quiet":
                    with store.transaction() as conn:  # a fresh backlog: summary + SEG + SR per study
                        outbox.add_items(conn, _backlog_items(f"r{r}{name}", backlog_studies, seg, sr))
                    cfg = root / f"sync-{name}.toml"
                    cfg.write_text(f'[sync]\nurl = "http://127.0.0.1:{cloud_port}"\ndevice_id = "busy-box"\n'
                                   f"heartbeat_s = 86400\ninterval_s = 1\nyield_to_inference = "
                                   f"{'true' if name == 'sync' else 'false'}\n")
                    before = _count(cloud_db, "busy-box")[1]
                    # as systemd runs it: the idle I/O class (IOSchedulingClass=idle); the service nices itself
                    sync_proc = subprocess.Popen(["ionice", "-c", "3", *EDGESCREEN, "--config", str(cfg),
                                                  "--data-dir", str(box), "sync"], cwd=REPO, env=ENV,
                                                 stdout=subprocess.DEVNULL,
                                                 stderr=open(box / "sync.log", "ab"))  # noqa: SIM115
                    deadline = time.monotonic() + 120
                    while _count(cloud_db, "busy-box")[1] < before + 3 and time.monotonic() < deadline:
                        time.sleep(0.2)  # the backlog is moving before the study arrives
                at = _count(cloud_db, "busy-box")[1]
                findings, poller = analyse()
                result = {"analysis_s": findings["timings_s"]["total"], "api_ms": [x * 1000 for x in poller.latencies],
                          "api_errors": poller.errors}
                if sync_proc is not None:
                    result["sync_items_during_analysis"] = _count(cloud_db, "busy-box")[1] - at
                    result["backlog_left_after"] = store.query_one(
                        "SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'sending')")[0]
                    stop_process(sync_proc)
                runs[name].append(result)
                print(f"round {r + 1} {name}: analysis {result['analysis_s']:.2f} s, API p50 "
                      f"{_pct(result['api_ms'], 0.5):.0f} ms (load {os.getloadavg()[0]:.1f})"
                      + (f", {result['sync_items_during_analysis']} items synced meanwhile, "
                         f"{result['backlog_left_after']} left" if sync_proc else ""), flush=True)
    finally:
        for proc in procs.values():
            stop_process(proc)
        stop_process(cloud)
        store.close()

    def med(name: str) -> float:
        return _median([x["analysis_s"] for x in runs[name]])

    def api(name: str, q: float) -> float:
        return round(_pct([ms for x in runs[name] for ms in x["api_ms"]], q), 1)

    out: dict[str, object] = {
        "study": f"{slices}-slice 512x512 CT phantom (seed 7, pdac), reference FP32 models, a real `edgescreen worker`",
        "rounds": rounds, "backlog_per_run": f"{backlog_studies} studies = {3 * backlog_studies} items (summary, SEG, "
                                             "SR; de-identified at send time)",
        "unit": "seconds of the job's findings timings_s.total (the worker's models cached), median over rounds",
        "analysis_s_quiet": round(med("quiet"), 2),
        "api_p50_ms_quiet": api("quiet", 0.5), "api_p95_ms_quiet": api("quiet", 0.95),
        "api_errors": sum(x["api_errors"] for v in runs.values() for x in v),
    }
    for name in ("sync", "niced_only"):
        out[f"analysis_s_{name}"] = round(med(name), 2)
        out[f"analysis_{name}_vs_quiet"] = round(med(name) / med("quiet"), 3)
        out[f"analysis_{name}_vs_quiet_per_round"] = [round(a["analysis_s"] / q["analysis_s"], 3)
                                                      for q, a in zip(runs["quiet"], runs[name], strict=True)]
        out[f"sync_items_during_analysis_{name}"] = [x["sync_items_during_analysis"] for x in runs[name]]
        out[f"api_p50_ms_{name}"], out[f"api_p95_ms_{name}"] = api(name, 0.5), api(name, 0.95)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=400, help="summaries per throughput run (default 400)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--studies", type=int, default=200, help="studies in the backlog run (default 200)")
    parser.add_argument("--slices", type=int, default=120, help="CT slices in the interference run (default 120)")
    parser.add_argument("--window", type=float, default=20.0, help="tiles: seconds per window (default 20)")
    parser.add_argument("--windows", type=int, default=12, help="tiles: windows, a multiple of 4 (default 12)")
    parser.add_argument("--only", choices=["throughput", "backlog", "interference", "tiles"], action="append",
                        help="run only these parts (repeatable; default all); the others keep their figures")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results.json alone")
    args = parser.parse_args()
    parts = args.only or ["throughput", "backlog", "interference", "tiles"]
    info = machine()

    from tests.test_sync_drill import patient_file

    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        root = Path(tmp)
        src = patient_file(root / "src")
        if "throughput" in parts:
            figures.update(throughput(root, src, args.items, args.rounds))
            print(json.dumps(figures), flush=True)
        if "interference" in parts:
            figures["interference"] = interference(root, args.slices, args.rounds, args.studies)
            print(json.dumps(figures["interference"]), flush=True)
        seg, sr = root / "warmup" / "1" / "seg.dcm", root / "warmup" / "1" / "sr.dcm"
        if {"backlog", "tiles"} & set(parts) and not seg.is_file():  # the files a backlog carries: a real SEG, SR
            from bench.harness import ct_series, run_child

            run_child(ANALYSIS, str(ct_series(args.slices)), str(root / "warmup"))
        if "tiles" in parts:
            figures["tiles"] = tiles(root, seg, sr, args.window, args.windows, 5 * args.studies)
            print(json.dumps(figures["tiles"]), flush=True)
        if "backlog" in parts:
            figures.update(backlog(root, seg, sr, args.studies))
    command = (f"{sys.executable} bench/bench_sync.py --items {args.items} --rounds {args.rounds} --studies "
               f"{args.studies} --slices {args.slices} --window {args.window:g} --windows {args.windows}"
               + "".join(f" --only {p}" for p in args.only or []))
    # each part keeps the run that measured it (a later --only run replaces only its own parts)
    figures["runs"] = {part: {"command": command, "load_avg_1m_at_start": info["load_avg_1m_at_start"],
                              "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "measured_at": info["measured_at"]}
                       for part in parts}
    print(json.dumps(figures, indent=2))
    if not args.no_write:
        if args.only:  # keep the figures of the parts not run
            from bench.results_io import RESULTS

            old = json.loads(RESULTS.read_text()).get("sync", {}) if RESULTS.exists() else {}
            runs = {**old.get("runs", {}), **figures["runs"]}
            figures = {**{k: v for k, v in old.items() if k not in ("machine", "command")}, **figures, "runs": runs}
        write_section("sync", figures, command=command, machine_info=info)
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
