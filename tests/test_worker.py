"""The worker against real services: studies arrive over DICOM, jobs run under leases, and a worker
killed with SIGKILL at any moment loses no job and never produces a duplicate result."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

from edgescreen.models.phantom.mg import write_mg_exam
from tests.conftest import EDGESCREEN, REPO, run_cli
from tests.test_dicom_support import SERVICE_ENV, dicom_server, open_store, requires_dcmtk, storescu

pytestmark = requires_dcmtk

# the DICOM service is stopped before the workers run: its signals are stale, and these tests let the
# fail-safe run (test_dicom_heartbeat.py covers the fail-safe that waits)
FAST_CONFIG = """
[scheduler]
idle_grace_s = 0
store_quiet_s = 0
lease_s = 2
max_crashes = 50
failsafe = "idle"
"""


def _receive_mammo_exams(tmp_path: Path, data_dir: Path, seeds: list[int]) -> int:
    """Send phantom exams to the real DICOM service and wait until each is queued as one mammo job."""
    with dicom_server(tmp_path, data_dir=data_dir, stable_after=1.0) as server:
        for seed in seeds:
            exam = tmp_path / f"mg-{seed}"
            write_mg_exam(exam, seed, finding="malignant" if seed % 2 else None)
            storescu(server.port, sorted(exam.glob("*.dcm")))
        store = open_store(data_dir)
        server.wait_for(lambda: store.query_one("SELECT COUNT(*) FROM jobs")[0] == len(seeds), timeout=60,
                        what="one mammo job per exam")
        store.close()
    return len(seeds)


def _worker(data_dir: Path, config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*EDGESCREEN, "--config", str(config), "--data-dir", str(data_dir), "worker", "--poll", "0.2",
                             *extra], cwd=REPO, env=SERVICE_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sigkilled_workers_lose_no_job_and_write_no_duplicate(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    n = _receive_mammo_exams(tmp_path, data_dir, [11, 12, 13])
    config = tmp_path / "site.toml"
    # a PACS to export to (nothing listens there: the rows only have to be written, with the result)
    config.write_text(FAST_CONFIG + '[dicom.pacs]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n')
    rng = random.Random(5)
    store = open_store(data_dir)
    kills = 0
    for _ in range(6):
        proc = _worker(data_dir, config)
        time.sleep(rng.uniform(0.5, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if store.query_one("SELECT COUNT(*) FROM jobs WHERE state = 'done'")[0] == n:
            break
    # a last worker finishes the rest after the dead ones' leases expire (lease_s = 2)
    final = _worker(data_dir, config, "--once")
    assert final.wait(timeout=600) == 0
    rows = store.query("SELECT j.id, j.state, j.attempts, COUNT(r.id) AS results, MAX(r.output_dir) AS out "
                       "FROM jobs j LEFT JOIN results r ON r.job_id = j.id GROUP BY j.id")
    assert [r["state"] for r in rows] == ["done"] * n, [dict(r) for r in rows]
    assert all(r["results"] == 1 for r in rows)
    for r in rows:
        findings = json.loads((Path(r["out"]) / "findings.json").read_text())
        assert findings["pipeline"] == "mammo" and findings["triage"] in ("suspicious", "not_suspicious", "indeterminate")
    assert not list((data_dir / "work").glob("job-*/out-*")), "an abandoned attempt's outputs were left behind"
    events = [e["state"] for e in store.query("SELECT state FROM events WHERE kind = 'job'")]
    assert events.count("done") == n
    assert kills >= 1
    # every finished job's export was queued with its result, exactly once, whatever moment the kills hit
    exports = [json.loads(r["payload"])["study_uid"] for r in store.query("SELECT payload FROM outbox WHERE kind = 'pacs'")]
    assert sorted(exports) == sorted(r["study_uid"] for r in store.query("SELECT study_uid FROM jobs"))


def test_busy_scanner_keeps_jobs_waiting_with_the_reason(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _receive_mammo_exams(tmp_path, data_dir, [21])
    config = tmp_path / "site.toml"
    config.write_text(FAST_CONFIG)
    env_args = ("--config", str(config))
    assert run_cli(*env_args, "scanner", "busy", data_dir=data_dir).returncode == 0
    proc = _worker(data_dir, config)
    try:
        store = open_store(data_dir)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = dict(store.query_one("SELECT * FROM jobs"))
            if job["waiting_reason"]:
                break
            time.sleep(0.2)
        assert job["state"] == "queued"
        assert job["waiting_reason"].startswith("waiting: scanner busy: set busy by staff")
        listing = run_cli(*env_args, "jobs", data_dir=data_dir).stdout
        assert "waiting: scanner busy" in listing
        assert run_cli(*env_args, "scanner", "auto", data_dir=data_dir).returncode == 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and store.query_one("SELECT state FROM jobs")[0] != "done":
            time.sleep(0.5)
        assert store.query_one("SELECT state FROM jobs")[0] == "done"
        audit = [tuple(r) for r in store.query("SELECT action, target FROM audit WHERE action LIKE 'scanner.%' "
                                               "ORDER BY id")]
        assert audit == [("scanner.manual", "busy"), ("scanner.manual", "auto")]
        job_audit = [r[0] for r in store.query("SELECT action FROM audit WHERE action LIKE 'job.%' ORDER BY id")]
        assert job_audit == ["job.create", "job.claim", "job.finish"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
