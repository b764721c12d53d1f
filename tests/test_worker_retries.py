"""A persistent system error (a full disk) under the real worker: bounded retries with backoff, one stack
trace, then `failed` with the reason in `edgescreen jobs --json`; staff retry it once the disk has room.

The disk really is full: a 2 MiB tmpfs mounted over the data directory's work area, filled to the brim.
The study comes in through the same ingest as a browser upload (appliance.dicom.ingest)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from edgescreen.models.phantom.mg import write_mg_exam
from tests.conftest import EDGESCREEN, REPO, run_cli
from tests.test_dicom_support import SERVICE_ENV, open_store

CONFIG = """
[scheduler]
idle_grace_s = 0
store_quiet_s = 0
lease_s = 10

[scheduler.retry.disk_full]
retries = 2
base_s = 0.4
max_s = 1.0
"""


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root? make test runs as root): {proc.stderr.strip()}")


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _queue_exam(tmp_path: Path, data_dir: Path) -> int:
    from edgescreen.appliance.config.site import Dicom
    from edgescreen.appliance.dicom.ingest import Ingestor, ingest_file, queue_series

    exam = tmp_path / "mg"
    write_mg_exam(exam, 41, finding="malignant")
    store = open_store(data_dir)
    ingestor = Ingestor(store, Dicom(min_free_mb=0))
    outcomes = [ingest_file(store, ingestor.cfg, p, source="upload:test", ingestor=ingestor)
                for p in sorted(exam.glob("*.dcm"))]
    assert [o.status for o in outcomes] == ["stored"] * 4, [o.as_dict() for o in outcomes]
    queue_series(store, {o.series_uid for o in outcomes})
    (job,) = store.query("SELECT id FROM jobs")
    return int(job["id"])


def test_full_disk_is_retried_with_backoff_then_fails_with_the_reason_and_staff_retry_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    job = _queue_exam(tmp_path, data_dir)
    config = tmp_path / "site.toml"
    config.write_text(CONFIG)
    # work/ and results/ on one small file system (the worker moves outputs from one to the other)
    small = tmp_path / "small"
    _mount_tmpfs(small, "2m")
    try:
        for name in ("work", "results"):
            (data_dir / name).rmdir()
            (small / name).mkdir()
            (data_dir / name).symlink_to(small / name)
        filler = small / "filler"
        with open(filler, "wb") as f:  # fill the tmpfs: every later write there fails with ENOSPC
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        log = tmp_path / "worker.log"
        started = time.monotonic()
        with open(log, "w") as out:
            proc = subprocess.run([*EDGESCREEN, "--config", str(config), "--data-dir", str(data_dir), "worker",
                                   "--once", "--poll", "0.2"], cwd=REPO, env=SERVICE_ENV, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=300)
        elapsed = time.monotonic() - started
        text = log.read_text()
        assert proc.returncode == 0, text[-3000:]
        listed = json.loads(run_cli("--config", str(config), "jobs", "--json", data_dir=data_dir, check=True).stdout)
        (row,) = listed
        assert row["state"] == "failed", row
        assert "No space left on device" in row["error"] and "after 2 retries" in row["error"]
        assert f"edgescreen jobs retry {job}" in row["error"]
        assert row["error_class"] == "disk_full"
        store = open_store(data_dir)
        runs = [r[0] for r in store.query("SELECT state FROM events WHERE kind = 'job' AND state IN "
                                          "('started', 'resumed')")]
        assert len(runs) == 3, f"1 run and 2 retries expected, got {len(runs)}: a hot loop or no retry"
        defers = [r["ts"] for r in store.query("SELECT ts FROM audit WHERE action = 'job.defer' ORDER BY id")]
        claims = [r["ts"] for r in store.query("SELECT ts FROM audit WHERE action = 'job.claim' ORDER BY id")]
        assert len(defers) == 2 and len(claims) == 3
        for deferred_at, next_claim, base in zip(defers, claims[1:], (0.4, 0.8), strict=True):
            assert next_claim - deferred_at >= base / 2 - 0.05, "retried before its backoff"
        assert text.count("Traceback") == 1, "the stack trace must be logged once per job and error class"
        assert elapsed < 240
        # staff free the disk and retry: the job runs to the end
        filler.unlink()
        assert run_cli("--config", str(config), "jobs", "retry", str(job), data_dir=data_dir).returncode == 0
        proc = subprocess.run([*EDGESCREEN, "--config", str(config), "--data-dir", str(data_dir), "worker", "--once",
                               "--poll", "0.2"], cwd=REPO, env=SERVICE_ENV, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        row = store.query_one("SELECT * FROM jobs WHERE id = ?", (job,))
        assert row["state"] == "done" and row["error"] is None, (row["error"], proc.stderr[-1500:])
        assert store.query_one("SELECT actor FROM audit WHERE action = 'job.retry'")[0].startswith("cli:")
    finally:
        _umount(small)


def test_retry_refuses_a_job_that_has_not_failed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    job = _queue_exam(tmp_path, data_dir)
    proc = run_cli("jobs", "retry", str(job), data_dir=data_dir)
    assert proc.returncode == 2 and "only failed jobs can be retried" in proc.stderr
    proc = run_cli("jobs", "retry", "999", data_dir=data_dir)
    assert proc.returncode == 2 and "no such job" in proc.stderr
