"""The job state machine: one guarded, audited transition for every change; bounded retries with backoff;
a result, its `done` state and its exports in one transaction; the scheduler's pause switch."""

from __future__ import annotations

import ast
import json
import random
import sqlite3
import time
from pathlib import Path

import pytest

from edgescreen.appliance.config.site import RetryPolicy
from edgescreen.appliance.scheduler import control, retry
from edgescreen.appliance.store import InvalidTransition, Store, jobs
from edgescreen.appliance.store.instances import IncomingInstance, store_instance
from edgescreen.appliance.store.outbox import OutboxItem

REPO = Path(__file__).resolve().parent.parent


def _job(store: Store, n: int = 1, pipeline: str = "pancreas") -> int:
    store_instance(store, IncomingInstance(f"1.{n}.1", "1.2.840.10008.5.1.4.1.1.2", f"1.{n}", f"1.{n}.5"), b"x")
    return jobs.enqueue(store, f"1.{n}", f"1.{n}.5", pipeline)


def _audit(store: Store, job: int) -> list[tuple[str, str]]:
    return [(r["actor"], r["action"]) for r in
            store.query("SELECT actor, action FROM audit WHERE target = ? ORDER BY id", (str(job),))]


def test_no_sql_changes_jobs_outside_the_store_module() -> None:
    """One guarded function for every job change: no other module of the appliance writes the jobs table."""
    offenders = []
    for path in (REPO / "appliance").rglob("*.py"):
        if path == REPO / "appliance" / "store" / "jobs.py":
            continue
        if path == REPO / "appliance" / "store" / "migrations.py":  # schema changes copy rows, change no state
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = " ".join(node.value.upper().split())
                if any(p in text for p in ("UPDATE JOBS", "INSERT INTO JOBS", "DELETE FROM JOBS",
                                           "INSERT OR REPLACE INTO JOBS", "REPLACE INTO JOBS")):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"job rows changed outside appliance/store/jobs.py: {offenders}"


def test_every_action_is_guarded_and_audited_in_the_same_transaction(data_dir: Path) -> None:
    store = Store(data_dir)
    job = _job(store)
    with pytest.raises(InvalidTransition, match="cannot go queued -> done"):
        jobs.transition(store, job, "finish", actor="w", owner="w")
    with pytest.raises(InvalidTransition, match="unknown job action"):
        jobs.transition(store, job, "teleport", actor="w")
    claimed = jobs.claim_next(store, "w1", 60)
    assert claimed["state"] == "running" and claimed["lease_owner"] == "w1"
    assert jobs.claim_next(store, "w2", 60) is None, "a running job was taken twice"
    assert not jobs.release(store, job, "w2", to="queued"), "a worker without the lease gave the job back"
    assert jobs.release(store, job, "w1", to="queued", reason="waiting: scanner busy")
    jobs.set_flag(store, job, "urgent", actor="web:alice")
    # a failing audit insert rolls the change back with it: the state never moves without its trace
    with pytest.raises(sqlite3.OperationalError), store.transaction() as conn:
        jobs.transition(store, job, "claim", actor="w3", conn=conn, lease_owner="w3")
        conn.execute("INSERT INTO no_such_table VALUES (1)")
    assert jobs.get(store, job)["state"] == "queued"
    assert _audit(store, job) == [("dicom", "job.create"), ("w1", "job.claim"), ("w1", "job.preempt"),
                                  ("web:alice", "job.urgent")]
    detail = json.loads(store.query_one("SELECT detail FROM audit WHERE action = 'job.preempt'")["detail"])
    assert detail == {"from": "running", "to": "queued", "reason": "waiting: scanner busy"}


def test_finish_writes_result_done_and_exports_once(data_dir: Path) -> None:
    store = Store(data_dir)
    job = _job(store)
    jobs.claim_next(store, "w1", 60)
    items = [OutboxItem("pacs", "pacs:abc", {"files": ["a.dcm"]}), OutboxItem("cloud.finding", "cf:abc", {})]
    assert jobs.finish(store, job, "w1", triage="suspicious", findings_json="{}", output_dir="/x", outbox_items=items)
    # a second finish (a worker that lost its lease and came back) writes nothing at all
    assert not jobs.finish(store, job, "w1", triage="suspicious", findings_json="{}", output_dir="/x",
                           outbox_items=items)
    assert store.query_one("SELECT COUNT(*) FROM results WHERE job_id = ?", (job,))[0] == 1
    assert sorted(r["idempotency_key"] for r in store.query("SELECT * FROM outbox")) == ["cf:abc", "pacs:abc"]
    row = jobs.get(store, job)
    assert (row["state"], row["progress"], row["lease_owner"]) == ("done", 1.0, None)


def test_finish_that_cannot_write_its_export_leaves_no_result(data_dir: Path) -> None:
    """Result, done and exports commit together or not at all (here the outbox insert fails)."""
    store = Store(data_dir)
    job = _job(store)
    jobs.claim_next(store, "w1", 60)
    with pytest.raises(TypeError):  # a payload that is not JSON: the insert of the export fails
        jobs.finish(store, job, "w1", triage="suspicious", findings_json="{}", output_dir="/x",
                    outbox_items=[OutboxItem("pacs", "k", {"bad": object()})])
    assert jobs.get(store, job)["state"] == "running"
    assert store.query_one("SELECT COUNT(*) FROM results")[0] == 0
    assert store.query_one("SELECT COUNT(*) FROM outbox")[0] == 0


def test_persistent_system_error_is_retried_with_backoff_then_failed_with_the_reason(data_dir: Path) -> None:
    store = Store(data_dir)
    job = _job(store)
    t = time.time()
    waits = []
    for n in range(1, 4):
        claimed = jobs.claim_next(store, "w", 60, now=t)
        assert claimed is not None and claimed["id"] == job
        outcome, count = jobs.defer(store, job, "w", error_class="disk_full", error="data disk full (ENOSPC)",
                                    max_retries=3, delay_s=10.0 * n, now=t)
        assert (outcome, count) == ("deferred", n)
        row = jobs.get(store, job)
        assert row["state"] == "queued" and row["not_before"] == pytest.approx(t + 10.0 * n)
        assert f"retry {n} of 3" in row["waiting_reason"] and "disk_full" in row["waiting_reason"]
        assert jobs.claim_next(store, "w", 60, now=t + 10.0 * n - 0.01) is None, "taken before its backoff ended"
        jobs.set_waiting_reason(store, "waiting: scanner busy")
        assert "retry" in jobs.get(store, job)["waiting_reason"], "the gate's reason hid why the job waits"
        waits.append(row["not_before"] - t)
        t += 10.0 * n
    jobs.claim_next(store, "w", 60, now=t)
    outcome, count = jobs.defer(store, job, "w", error_class="disk_full", error="data disk full (ENOSPC)",
                                max_retries=3, delay_s=1.0, now=t)
    assert (outcome, count) == ("failed", 3)
    row = jobs.get(store, job)
    assert row["state"] == "failed" and row["error_class"] == "disk_full"
    assert "after 3 retries" in row["error"] and f"edgescreen jobs retry {job}" in row["error"]
    assert json.loads(row["retry_counts"]) == {"disk_full": 4}
    # staff retry: back in the queue with the counts cleared, audited with their name
    jobs.retry(store, job, "cli:tech")
    row = jobs.get(store, job)
    assert (row["state"], row["error"], row["retry_counts"], row["waiting_reason"]) == \
        ("queued", None, None, "retried by cli:tech")
    assert _audit(store, job)[-1] == ("cli:tech", "job.retry")
    with pytest.raises(InvalidTransition, match="only failed jobs can be retried"):
        jobs.retry(store, job, "cli:tech")


def test_retry_counts_are_kept_per_error_class(data_dir: Path) -> None:
    store = Store(data_dir)
    job = _job(store)
    t = time.time()
    for cls in ("database", "disk_full", "database"):
        jobs.claim_next(store, "w", 60, now=t)
        assert jobs.defer(store, job, "w", error_class=cls, error="x", max_retries=2, delay_s=1, now=t)[0] == "deferred"
        t += 2
    assert json.loads(jobs.get(store, job)["retry_counts"]) == {"database": 2, "disk_full": 1}


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(retries=10, base_s=10, max_s=100)
    rng = random.Random(1)
    for attempt, step in ((1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (9, 100)):
        samples = [retry.delay(policy, attempt, rng) for _ in range(200)]
        assert min(samples) >= step / 2 and max(samples) <= step
        assert max(samples) - min(samples) > step / 4, "no jitter"


def test_error_classes() -> None:
    import errno

    assert retry.classify(OSError(errno.ENOSPC, "No space left on device")) == "disk_full"
    assert retry.classify(sqlite3.OperationalError("database or disk is full")) == "disk_full"
    assert retry.classify(sqlite3.OperationalError("database is locked")) == "database"
    assert retry.classify(OSError(errno.EIO, "Input/output error")) == "io"
    assert retry.classify(OSError(errno.ENOENT, "No such file")) is None  # retrying cannot bring a file back
    assert retry.classify(ValueError("bug")) is None
    assert retry.classify(MemoryError()) == "memory"
    assert set(retry.ERROR_CLASSES) == {"disk_full", "database", "io", "memory"}
    from typing import get_args

    from edgescreen.appliance.config.site import Scheduler

    # the classes a site may tune are exactly the classes the worker knows
    assert set(get_args(get_args(Scheduler.model_fields["retry"].annotation)[0])) == set(retry.ERROR_CLASSES)


def test_progress_and_stage_position(data_dir: Path) -> None:
    store = Store(data_dir)
    job = _job(store)
    jobs.claim_next(store, "w", 60)
    assert jobs.report_progress(store, job, "w", "stage2", 0.4)
    assert not jobs.report_progress(store, job, "other", "stage3", 0.1), "progress from a worker without the lease"
    row = jobs.get(store, job)
    assert (row["stage"], row["progress"]) == ("stage2", 0.4)
    assert jobs.stage_position("pancreas", "stage2") == (3, 5)
    assert jobs.stage_position("mammo", "mammo") == (1, 2)
    assert jobs.stage_position("pancreas", "bogus") is None


def test_pause_closes_the_gate_naming_who_and_resume_opens_it(data_dir: Path) -> None:
    from edgescreen.appliance.config.site import SiteConfig
    from edgescreen.appliance.context import AppContext
    from edgescreen.appliance.scheduler.live import LiveGate

    ctx = AppContext(config=SiteConfig.model_validate({"scheduler": {"idle_grace_s": 0}}), data_dir=data_dir)
    gate = LiveGate(ctx)
    assert gate.observe().decision.run
    state = control.pause(ctx.store, "web:alice", "model update")
    assert state["paused"] and state["by"] == "web:alice"
    decision = gate.observe(run_now=True).decision  # pause wins over a staff run-now
    assert not decision.run
    assert "scheduler paused by web:alice at" in decision.reason and "model update" in decision.reason
    assert not gate.plan(oldest_queued_age_s=0, run_now_waiting=True)[0].run
    control.resume(ctx.store, "web:bob")
    assert gate.observe().decision.run and not control.status(ctx.store)["paused"]
    actions = [(r["actor"], r["action"]) for r in ctx.store.query("SELECT * FROM audit WHERE action LIKE 'scheduler.%'")]
    assert actions == [("web:alice", "scheduler.pause"), ("web:bob", "scheduler.resume")]
