"""The store: migrations, the job state machine, and consistency after SIGKILL at random points."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgescreen.appliance.store import InvalidTransition, Store, StoreError, atomic_write, jobs
from edgescreen.appliance.store.files import TMP_SUFFIX
from edgescreen.appliance.store.instances import IncomingInstance, store_instance
from edgescreen.appliance.store.migrations import MIGRATIONS
from edgescreen.appliance.store.worklist import list_studies
from tests.conftest import REPO


def test_migrations_apply_once_and_refuse_newer(data_dir: Path) -> None:
    store = Store(data_dir)
    assert store.schema_version() == len(MIGRATIONS)
    assert Store(data_dir).schema_version() == len(MIGRATIONS)  # reopening is a no-op
    tables = {r[0] for r in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"studies", "series", "instances", "jobs", "results", "outbox", "events", "audit", "users",
            "quarantine"} <= tables
    assert store.query_one("PRAGMA journal_mode")[0] == "wal"
    store.connect().execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    store.close()
    with pytest.raises(StoreError, match="newer than this edgescreen"):
        Store(data_dir)


def test_unwritable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create"):
        Store(blocker / "data")


def test_duplicate_instance_is_idempotent(data_dir: Path) -> None:
    store = Store(data_dir)
    inst = IncomingInstance("1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.9")
    path, dup = store_instance(store, inst, b"first")
    assert not dup and path.read_bytes() == b"first"
    path2, dup2 = store_instance(store, inst, b"second")
    assert dup2 and path2 == path and path.read_bytes() == b"first"
    assert list_studies(store)[0]["series"][0]["instances"] == 1


def test_odd_uids_never_escape_the_files_dir(data_dir: Path) -> None:
    store = Store(data_dir)
    inst = IncomingInstance("../../etc/passwd", "1.2.840.10008.5.1.4.1.1.2", "1.2/../..", "x y")
    path, _ = store_instance(store, inst, b"data")
    assert path.resolve().is_relative_to(store.files_dir.resolve())


def test_job_state_machine(data_dir: Path) -> None:
    store = Store(data_dir)
    store_instance(store, IncomingInstance("1.1", "1.2.840.10008.5.1.4.1.1.2", "1", "1.5"), b"x")
    job = jobs.enqueue(store, "1", "1.5", "pancreas")
    assert jobs.enqueue(store, "1", "1.5", "pancreas") == job
    with pytest.raises(InvalidTransition, match="cannot go queued -> done"):
        jobs.transition(store, job, "finish", actor="w1", owner="w1")
    with pytest.raises(InvalidTransition, match="needs the lease holder"):
        jobs.transition(store, job, "finish", actor="w1")
    assert jobs.claim_next(store, "w1", 60)["lease_owner"] == "w1"
    with pytest.raises(InvalidTransition, match="lease held by w1"):
        jobs.transition(store, job, "finish", actor="w2", owner="w2")
    with pytest.raises(InvalidTransition, match="cannot set bogus"):
        jobs.transition(store, job, "finish", actor="w1", owner="w1", bogus=1)
    jobs.transition(store, job, "finish", actor="w1", owner="w1")
    assert jobs.get(store, job)["state"] == "done"
    # every change is audited with who did it, in the same transaction
    audit = [(r["actor"], r["action"]) for r in store.query("SELECT * FROM audit WHERE target = ? ORDER BY id",
                                                            (str(job),))]
    assert audit == [("dicom", "job.create"), ("w1", "job.claim"), ("w1", "job.finish")]
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as conn:
        conn.execute("UPDATE jobs SET state = 'bogus' WHERE id = ?", (job,))


def test_atomic_write_leaves_old_or_new(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write(target, b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert not list(tmp_path.glob(f"*{TMP_SUFFIX}"))


def _check_consistent(data_dir: Path, acknowledged: list[str]) -> None:
    store = Store(data_dir)
    assert store.integrity_ok()
    report = store.recover()
    assert report["missing_files"] == [], "rows point at files that are not on disk"
    assert not list(data_dir.rglob(f"*{TMP_SUFFIX}")), "temp files survived recovery"
    for row in store.query("SELECT path, size FROM instances"):
        assert (data_dir / row["path"]).stat().st_size == row["size"], f"{row['path']} is not whole"
    known = {r["sop_uid"] for r in store.query("SELECT sop_uid FROM instances")}
    lost = [sop for sop in acknowledged if sop not in known]
    assert not lost, f"{len(lost)} acknowledged instances lost, e.g. {lost[:3]}"
    # every series and instance belongs to something; every done job has exactly one result and vice versa
    assert store.query_one("SELECT COUNT(*) FROM instances i LEFT JOIN series s USING (series_uid) "
                           "WHERE s.series_uid IS NULL")[0] == 0
    assert store.query_one("SELECT COUNT(*) FROM jobs j LEFT JOIN results r ON r.job_id = j.id "
                           "WHERE (j.state = 'done') != (r.id IS NOT NULL)")[0] == 0
    # ... and exactly one export row, written in the same transaction as its result
    assert store.query_one("SELECT COUNT(*) FROM jobs j WHERE (j.state = 'done') != ((SELECT COUNT(*) FROM outbox o "
                           "WHERE o.idempotency_key = 'pacs:' || j.study_uid) = 1)")[0] == 0
    store.close()


def test_sigkill_at_random_points_leaves_a_consistent_store(data_dir: Path) -> None:
    rng = random.Random(1234)
    acknowledged: list[str] = []
    for round_no in range(12):
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "store_writer.py"), str(data_dir), str(round_no)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
        first = proc.stdout.readline().split()  # the writer is running (slow on a loaded machine): now kill it
        time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        acknowledged += first + out.split()
        _check_consistent(data_dir, acknowledged)
    assert len(acknowledged) >= 12, "the writer made too little progress for the test to mean anything"


def test_recovery_spares_temp_files_of_live_writers(data_dir: Path) -> None:
    import os

    from edgescreen.appliance.store.files import remove_temp_files

    live = data_dir / f".x.dcm.{os.getpid()}.123{TMP_SUFFIX}"
    dead = data_dir / f".y.dcm.4999999{TMP_SUFFIX}"  # above any pid_max: no such process
    odd = data_dir / f".z.dcm.notapid{TMP_SUFFIX}"
    for f in (live, dead, odd):
        f.write_bytes(b"partial")
    removed = remove_temp_files(data_dir)
    assert removed == [dead]
    assert live.exists() and odd.exists()
    old = time.time() + 2 * 3600  # an hour later even a live-looking writer's leftovers go
    assert sorted(remove_temp_files(data_dir, now=old)) == sorted([live, odd])


def test_concurrent_duplicates_keep_one_whole_copy(data_dir: Path) -> None:
    """Two associations resending the same SOP at the same moment: the row and the file must agree."""
    import threading

    store = Store(data_dir)
    for round_no in range(20):
        inst = IncomingInstance(f"1.2.3.{round_no}", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.9")
        payloads = [os.urandom(200_000 + 1000 * k) for k in range(4)]
        barrier = threading.Barrier(len(payloads))

        def send(data: bytes, inst: IncomingInstance = inst, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            store_instance(store, inst, data)

        threads = [threading.Thread(target=send, args=(d,)) for d in payloads]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        row = store.query_one("SELECT path, size FROM instances WHERE sop_uid = ?", (inst.sop_uid,))
        on_disk = (data_dir / row["path"]).read_bytes()
        assert len(on_disk) == row["size"] and on_disk in payloads


def test_a_job_that_keeps_killing_workers_is_failed_with_the_reason(data_dir: Path) -> None:
    store = Store(data_dir)
    store_instance(store, IncomingInstance("9.1", "1.2.840.10008.5.1.4.1.1.2", "9", "9.5"), b"x")
    job = jobs.enqueue(store, "9", "9.5", "pancreas")
    t = time.time()
    for crash in range(1, 4):
        assert jobs.claim_next(store, f"w{crash}", 1.0, now=t)["id"] == job
        t += 5  # the worker died: its lease ran out
        assert jobs.reclaim_expired(store, now=t, max_crashes=3) == [job]
        state = jobs.get(store, job)
        assert state["attempts"] == crash
        assert state["state"] == ("failed" if crash == 3 else "queued")
    assert "stopped 3 times" in jobs.get(store, job)["error"]
    # a preemption (release by the holder) is not a crash
    job2 = jobs.enqueue(store, "9", "9.5", "mammo")
    jobs.claim_next(store, "w", 60)
    assert jobs.release(store, job2, "w", to="queued", reason="waiting: scanner busy")
    assert jobs.get(store, job2)["attempts"] == 0
