"""The store at a clinic's year (issue 16): each hot query's milliseconds at 1 M instances / 10,000 jobs.

    python bench/bench_scale.py                      # generates /tmp/edgescreen-scale-1m once (minutes), reuses it
    python bench/bench_scale.py --data-dir D --studies 1000

Measured on the synthetic store of bench/gen_store.py, each as the median and p95 of repeated runs:

* gate read: everything the worker reads at every poll and every tile batch (LiveGate.read: the staff
  switch, the DICOM heartbeat, MPPS steps, the newest network arrival); target < 5 ms;
* worklist: the first page of appliance.store.worklist (what the UI and /api/v1/studies show), and a
  filtered page; target < 100 ms;
* next-job pick: the query that chooses the job, and jobs.claim_next as a whole (the guarded claim, its
  audit row, the worklist triggers and the durable commit, an fsync), and the queue summary the worker
  reads between jobs; target < 10 ms;
* DICOM service start: `edgescreen dicom` spawned until it answers C-ECHO, after a clean stop (its last
  heartbeat bounds the recovery) and after a crash with no durable heartbeat (recovery in a thread);
  target < 5 s;
* the doctor's file check (Store.check_files: changed series directories and a random sample of rows),
  with the heartbeat the service left and with none (then bounded by its time budget).

Same-run baselines: the queries as they were before the indexes (NOT INDEXED forces the old plan), the
old recovery (Store.recover: every path loaded, all of files/ walked), the imports under the service's
process start, and one tiny durable commit (the fsync floor under every claim).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results_io import machine, write_section  # noqa: E402


def timed(fn, repeat: int) -> dict:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {"median_ms": round(statistics.median(samples), 3),
            "p95_ms": round(samples[min(len(samples) - 1, int(0.95 * len(samples)))], 3), "runs": repeat}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dicom_start(data_dir: Path, log_path: Path) -> dict:
    """Spawn `edgescreen dicom`, time until it answers C-ECHO, wait for its start-up recovery (a thread beside
    the listening service) to finish, then SIGTERM it (a clean stop)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    port = _free_port()
    env = {**os.environ, "EDGESCREEN_CONFIG": "", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edgescreen.appliance.cli", "--data-dir", str(data_dir), "dicom", "--port",
                                 str(port), "--bind", "127.0.0.1", "--allow-any-ae", "--stable-after", "3600"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"edgescreen dicom exited: {log_path.read_text()[-2000:]}")
            assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
            if assoc.is_established:
                status = assoc.send_c_echo()
                assoc.release()
                if status and status.Status == 0:
                    break
            time.sleep(0.02)
        ready_s = time.perf_counter() - t0
        deadline = time.monotonic() + 1800
        while "start-up recovery" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    out = log_path.read_text()
    recovery = [line.split("msg=", 1)[-1] for line in out.splitlines() if "start-up recovery" in line]
    listening = [line for line in out.splitlines() if "DICOM service listening" in line]
    start_s = float(listening[0].split("start_s=")[1].split()[0]) if listening and "start_s=" in listening[0] else None
    # ready_s: process spawn to the first answered C-ECHO (imports included); start_s: DicomService.start()
    # itself; recovery: the thread that re-checks the store while the service already answers
    return {"ready_s": round(ready_s, 3), "start_s": start_s, "recovery": recovery[:1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/edgescreen-scale-1m"))
    parser.add_argument("--studies", type=int, default=10_000, help="for a new store (default: 1 M instances)")
    parser.add_argument("--ct-slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--no-write", action="store_true", help="print the figures without updating bench/results.json")
    args = parser.parse_args(argv)
    info = machine()

    from bench.gen_store import generate

    if not (args.data_dir / "edgescreen.db").exists():
        print(f"generating {args.studies} studies in {args.data_dir} ...", file=sys.stderr)
        print(json.dumps(generate(args.data_dir, studies=args.studies, ct_slices=args.ct_slices)), file=sys.stderr)

    from edgescreen.appliance.config.site import SiteConfig
    from edgescreen.appliance.context import AppContext
    from edgescreen.appliance.scheduler.live import LiveGate
    from edgescreen.appliance.store import Store, jobs
    from edgescreen.appliance.store.worklist import WorklistQuery, query_worklist

    t0 = time.perf_counter()
    store = Store(args.data_dir)
    open_ms = (time.perf_counter() - t0) * 1000
    size = {t: store.query_one(f"SELECT COUNT(*) FROM {t}")[0] for t in ("instances", "studies", "series", "jobs")}
    size["queued_jobs"] = store.query_one("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")[0]
    figures: dict = {"store": size, "store_open_ms": round(open_ms, 1)}

    # -- the gate ---------------------------------------------------------------------------------
    ctx = AppContext(config=SiteConfig(), data_dir=args.data_dir)
    ctx.__dict__["store"] = store
    gate = LiveGate(ctx)
    gate.read()  # the first read records the initial scanner state as an event
    figures["gate_read"] = timed(gate.read, args.repeat * 4)
    allowed = AppContext(config=SiteConfig.model_validate({"dicom": {"allowed": [
        {"ae_title": "CT_ROOM_1"}, {"ae_title": "MG_ROOM_1"}]}}), data_dir=args.data_dir)
    allowed.__dict__["store"] = store
    gate_aes = LiveGate(allowed)
    gate_aes.read()
    figures["gate_read_allow_listed_aes"] = timed(gate_aes.read, args.repeat * 4)
    old_sql = "SELECT MAX(received_at) AS t, calling_ae FROM instances NOT INDEXED"
    figures["gate_read_baseline_old_query"] = timed(lambda: store.query_one(old_sql), 5)
    figures["gate_read_ratio_old_over_new"] = round(figures["gate_read_baseline_old_query"]["median_ms"]
                                                    / figures["gate_read"]["median_ms"], 1)

    # -- the worklist ------------------------------------------------------------------------------
    query_worklist(store, WorklistQuery())  # installs its triggers / table if this store never had them
    figures["worklist_first_page"] = timed(lambda: query_worklist(store, WorklistQuery()), args.repeat)
    figures["worklist_waiting_page"] = timed(lambda: query_worklist(store, WorklistQuery(state="waiting")),
                                             args.repeat)
    figures["worklist_search"] = timed(lambda: query_worklist(store, WorklistQuery(search="PATIENT42")), 10)

    # -- the worker's pick -------------------------------------------------------------------------
    owner = "bench"

    def pick() -> None:
        job = jobs.claim_next(store, owner, 60)
        pick.last = job  # type: ignore[attr-defined]

    picked = []

    def pick_and_give_back() -> None:
        t0 = time.perf_counter()
        pick()
        picked.append((time.perf_counter() - t0) * 1000)
        job = pick.last  # type: ignore[attr-defined]
        if job is not None:
            jobs.release(store, job["id"], owner, to="queued", reason="bench")

    for _ in range(args.repeat):
        pick_and_give_back()
    picked.sort()
    figures["next_job_pick"] = {"median_ms": round(statistics.median(picked), 3),
                                "p95_ms": round(picked[int(0.95 * len(picked))], 3), "runs": len(picked)}
    pick_sql = (f"SELECT id FROM jobs WHERE state = 'queued' AND (not_before IS NULL OR not_before <= :now) "
                f"ORDER BY {jobs.ORDER} LIMIT 1")
    figures["next_job_select"] = timed(lambda: store.query_one(pick_sql, {"now": time.time(),
                                                                           "starve_before": time.time() - 6 * 3600}),
                                       args.repeat)
    figures["queue_summary"] = timed(lambda: jobs.queue_summary(store), args.repeat)

    def durable_commit() -> None:  # the floor under any claim: one tiny transaction committed with an fsync
        with store.transaction() as conn:
            conn.execute("INSERT INTO settings (key, value, updated_at) VALUES ('bench.floor', '1', 0) "
                         "ON CONFLICT(key) DO UPDATE SET updated_at = updated_at + 1")

    figures["durable_commit_floor"] = timed(durable_commit, args.repeat)
    old_pick = ("SELECT id FROM jobs NOT INDEXED WHERE state = 'queued' ORDER BY run_now DESC, urgent DESC, "
                "(created_at < 0) DESC, priority DESC, created_at, id LIMIT 1")
    figures["next_job_select_baseline_no_index"] = timed(lambda: store.query_one(old_pick), 10)

    # -- the DICOM service's start ----------------------------------------------------------------
    store.close()
    t0 = time.perf_counter()  # the same-run baseline under the process start: its imports alone
    subprocess.run([sys.executable, "-c", "import edgescreen.appliance.cli as c; c.build_parser(); import edgescreen.appliance.dicom.scp"],
                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    figures["dicom_imports_s"] = round(time.perf_counter() - t0, 3)
    s = Store(args.data_dir)
    # the doctor's file check (Store.check_files: bounded) against the full walk it replaced, same run
    checked = s.check_files()
    figures["doctor_file_check_ms"] = round(checked["seconds"] * 1000, 1)
    figures["doctor_file_check_scope"] = checked["scope"]
    with s.transaction() as conn:  # as after a crash before any durable heartbeat (or an upgrade)
        conn.execute("UPDATE heartbeats SET durable_before = NULL WHERE service = 'dicom'")
    checked = s.check_files()
    figures["doctor_file_check_without_heartbeat_ms"] = round(checked["seconds"] * 1000, 1)
    figures["doctor_file_check_without_heartbeat_scope"] = checked["scope"]
    t0 = time.perf_counter()
    report = s.recover(remove_temp=False)
    full_ms = (time.perf_counter() - t0) * 1000
    s.close()
    figures["recovery_baseline_full_walk_ms"] = round(full_ms, 1)
    figures["recovery_baseline_unclaimed"] = len(report["unclaimed_files"])
    figures["doctor_file_check_speedup"] = round(full_ms / max(figures["doctor_file_check_ms"], 0.1), 1)
    # first without a durable heartbeat (every series directory is checked), then after that run's clean
    # stop (only directories changed since its last durable beat)
    figures["dicom_start_without_heartbeat"] = dicom_start(args.data_dir, Path(f"/tmp/bench-scale-{os.getpid()}-1.log"))
    figures["dicom_start_after_clean_stop"] = dicom_start(args.data_dir, Path(f"/tmp/bench-scale-{os.getpid()}-2.log"))
    figures["targets"] = {"gate_read_ms": 5, "worklist_ms": 100, "dicom_start_s": 5, "next_job_pick_ms": 10}
    print(json.dumps(figures, indent=2))
    if not args.no_write:
        write_section("scale", figures, machine_info=info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
