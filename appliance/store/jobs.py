"""The job state machine. Every job state change goes through `transition`: one guarded UPDATE and its
audit row in one transaction, so two workers can never both win and nothing changes without a trace.

A job is created `queued` (or `receiving`) by `enqueue`. The actions and the states they leave from:

    claim       queued                     -> running      the worker takes it under a lease
    preempt     running (lease holder)     -> queued       the gate closed; resumes from its checkpoint
    defer       running (lease holder)     -> queued       a system error (full disk, locked database):
                                                           retried after an exponential backoff
    finish      running (lease holder)     -> done         with its result and outbox rows (`finish`)
    fail        receiving/queued/running   -> failed       for good, with the reason staff read
    quarantine  receiving/queued/running   -> quarantined  the input cannot be analysed
    reclaim     running (lease expired)    -> queued       its worker died
    retry       failed                     -> queued       staff: try again (audited with their name)
    ready       receiving                  -> queued
    urgent, run_now  queued/running (state unchanged)      staff overrides

Lease renewal, progress and the waiting reason are not state changes (they would flood the audit log
every second); they are guarded updates here too, so no SQL on `jobs` lives anywhere else.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from edgescreen.appliance.store.db import Store
from edgescreen.appliance.store.outbox import OutboxItem, add_items

JOB_STATES = ("receiving", "queued", "running", "done", "failed", "quarantined")


@dataclass(frozen=True)
class Action:
    """Where an action may start from, where it leads (None: the state stays), whether only the lease holder may."""

    from_states: tuple[str, ...]
    to: str | None
    lease_holder: bool = False


ACTIONS: dict[str, Action] = {
    "ready": Action(("receiving",), "queued"),
    "claim": Action(("queued",), "running"),
    "preempt": Action(("running",), "queued", lease_holder=True),
    "defer": Action(("running",), "queued", lease_holder=True),
    "finish": Action(("running",), "done", lease_holder=True),
    "fail": Action(("receiving", "queued", "running"), "failed"),
    "quarantine": Action(("receiving", "queued", "running"), "quarantined"),
    "reclaim": Action(("running",), "queued"),
    "retry": Action(("failed",), "queued"),
    "urgent": Action(("queued", "running"), None),
    "run_now": Action(("queued", "running"), None),
}

# to-state -> the states it may be entered from (derived from ACTIONS: one copy of the rule)
TRANSITIONS: dict[str, tuple[str, ...]] = {
    state: tuple(sorted({s for a in ACTIONS.values() if a.to == state for s in a.from_states}))
    for state in JOB_STATES
}

# columns an action may set besides state and updated_at (names are interpolated: never user input)
_WRITABLE = frozenset({"stage", "checkpoint", "lease_owner", "lease_expires", "attempts", "waiting_reason", "error",
                       "started_at", "finished_at", "urgent", "run_now", "progress", "retry_counts", "not_before",
                       "error_class"})

# The stages each pipeline reports through its progress callback, in order: the UI shows
# "stage k of n" from these (`stage_position`).
PIPELINE_STAGES: dict[str, tuple[str, ...]] = {
    "pancreas": ("load", "stage1", "stage2", "stage3", "outputs"),
    "mammo": ("mammo", "outputs"),
}


class InvalidTransition(RuntimeError):
    """A transition the state machine forbids, or a job another process changed first."""


def transition(store: Store, job_id: int, action: str, *, actor: str, owner: str | None = None,
               detail: dict[str, Any] | None = None, conn: sqlite3.Connection | None = None,
               now: float | None = None, **fields: Any) -> dict:
    """THE way a job changes state: a guarded UPDATE plus its audit row, in `conn`'s transaction or its own.

    `owner` (the lease holder) is required for the lease-holder actions and, when given for any other,
    guards it too. Raises InvalidTransition when the job is not in a state the action starts from (or
    another worker holds it); returns the job's row as it is after the change.
    """
    spec = ACTIONS.get(action)
    if spec is None:
        raise InvalidTransition(f"unknown job action {action!r}; actions are {', '.join(ACTIONS)}")
    if spec.lease_holder and owner is None:
        raise InvalidTransition(f"job {job_id}: {action} needs the lease holder")
    unknown = set(fields) - _WRITABLE
    if unknown:
        raise InvalidTransition(f"job {job_id}: {action} cannot set {', '.join(sorted(unknown))}")
    if conn is None:
        with store.transaction() as own:
            return transition(store, job_id, action, actor=actor, owner=owner, detail=detail, conn=own, now=now,
                              **fields)
    now = time.time() if now is None else now
    before = conn.execute("SELECT state, lease_owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
    sets = "".join(f", {k} = :{k}" for k in fields)
    if spec.to is not None:
        sets = ", state = :to" + sets
    marks = ", ".join(f":from{i}" for i in range(len(spec.from_states)))
    sql = f"UPDATE jobs SET updated_at = :now{sets} WHERE id = :id AND state IN ({marks})"
    params: dict[str, Any] = {"to": spec.to, "now": now, "id": job_id, **fields,
                              **{f"from{i}": s for i, s in enumerate(spec.from_states)}}
    if owner is not None:
        sql += " AND lease_owner = :owner"
        params["owner"] = owner
    if conn.execute(sql, params).rowcount != 1:
        state = before["state"] if before else "missing"
        held = f" (lease held by {before['lease_owner']})" if owner and before and before["lease_owner"] else ""
        what = f"go {state} -> {spec.to}" if spec.to else f"be marked {action} while {state}"
        raise InvalidTransition(f"job {job_id}: cannot {what}" + (f" as {owner}{held}" if owner else "")
                                + f"; {action} applies to {'/'.join(spec.from_states)} jobs")
    record = {"from": before["state"], "to": spec.to or before["state"], **(detail or {})}
    store.audit(actor, f"job.{action}", str(job_id), json.dumps(record, default=str), conn=conn)
    return dict(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


# -- creation and reading ---------------------------------------------------------------------------
def enqueue(store: Store, study_uid: str, series_uid: str, pipeline: str, *, priority: int = 0,
            state: str = "queued", actor: str = "dicom", created_at: float | None = None, urgent: bool = False,
            run_now: bool = False) -> int:
    """Queue a series for a pipeline once; a second call for the same series and pipeline returns the same job.

    `created_at`, `urgent` and `run_now` let the clinic-day simulator replay a trace's arrivals.
    """
    from edgescreen.appliance.pipeline.accepts import (
        PIPELINES,  # the one list of pipelines (no schema CHECK names them)
    )

    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline {pipeline!r}: use one of {', '.join(PIPELINES)}")
    if state not in ("queued", "receiving"):
        raise InvalidTransition(f"a new job starts queued or receiving, not {state}")
    now = time.time() if created_at is None else created_at
    with store.transaction() as conn:
        row = conn.execute("SELECT id FROM jobs WHERE series_uid = ? AND pipeline = ?", (series_uid, pipeline)).fetchone()
        if row is not None:
            return int(row["id"])
        cur = conn.execute(
            """INSERT INTO jobs (study_uid, series_uid, pipeline, state, priority, urgent, run_now, created_at,
                                 updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (study_uid, series_uid, pipeline, state, priority, int(urgent), int(run_now), now, now),
        )
        job_id = int(cur.lastrowid)
        store.audit(actor, "job.create", str(job_id), json.dumps({"to": state, "pipeline": pipeline}), conn=conn)
        return job_id


def get(store: Store, job_id: int) -> dict | None:
    row = store.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
    return dict(row) if row else None


def list_jobs(store: Store, states: tuple[str, ...] = JOB_STATES) -> list[dict]:
    marks = ", ".join("?" * len(states))
    return [dict(r) for r in store.query(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", states)]


def stage_position(pipeline: str, stage: str | None) -> tuple[int, int] | None:
    """(k, n) for "stage k of n", or None for a stage the pipeline does not list."""
    stages = PIPELINE_STAGES.get(pipeline, ())
    return (stages.index(stage) + 1, len(stages)) if stage in stages else None


def queue_summary(store: Store, *, now: float | None = None) -> dict[str, Any]:
    """What the worker's loop needs between jobs, in one indexed query: queued and running counts, the
    oldest queued job's creation time, whether a run-now job waits, and when the next deferred job is due."""
    now = time.time() if now is None else now
    row = store.query_one(
        "SELECT COUNT(*) AS queued, MIN(created_at) AS oldest, MAX(run_now) AS run_now, "
        "SUM(CASE WHEN not_before > :now THEN 1 ELSE 0 END) AS deferred, "
        "MIN(CASE WHEN not_before > :now THEN not_before END) AS next_due "
        "FROM jobs WHERE state = 'queued'", {"now": now})
    running = store.query_one("SELECT COUNT(*) FROM jobs WHERE state = 'running'")[0]
    return {"queued": row["queued"], "running": running, "oldest_created_at": row["oldest"],
            "run_now_waiting": bool(row["run_now"]), "deferred": row["deferred"] or 0, "next_due": row["next_due"]}


# -- the worker's side --------------------------------------------------------------------------------
ORDER = "run_now DESC, urgent DESC, (created_at < :starve_before) DESC, priority DESC, created_at, id"


def claim_next(store: Store, owner: str, lease_s: float, *, now: float | None = None, starvation_s: float = 6 * 3600,
               only_run_now: bool = False) -> dict | None:
    """Take the most deserving queued job that is due under a lease. One transaction: never two takers."""
    now = time.time() if now is None else now
    where = "state = 'queued' AND (not_before IS NULL OR not_before <= :now)" + (" AND run_now = 1" if only_run_now else "")
    with store.transaction() as conn:
        row = conn.execute(f"SELECT id FROM jobs WHERE {where} ORDER BY {ORDER} LIMIT 1",
                           {"starve_before": now - starvation_s, "now": now}).fetchone()
        if row is None:
            return None
        job = conn.execute("SELECT started_at FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return transition(store, row["id"], "claim", actor=owner, conn=conn, now=now, lease_owner=owner,
                          lease_expires=now + lease_s, started_at=job["started_at"] or now, waiting_reason=None,
                          not_before=None, progress=None)


def renew_lease(store: Store, job_id: int, owner: str, lease_s: float) -> bool:
    """Extend our lease; False means we lost it (reclaimed after we stalled) and must stop without writing."""
    now = time.time()
    with store.transaction() as conn:
        cur = conn.execute("UPDATE jobs SET lease_expires = ?, updated_at = ? "
                           "WHERE id = ? AND state = 'running' AND lease_owner = ?",
                           (now + lease_s, now, job_id, owner))
        return cur.rowcount == 1


def report_progress(store: Store, job_id: int, owner: str, stage: str, fraction: float) -> bool:
    """The stage the job is in and how far through it (0..1), for "running stage k of n, 40%"."""
    fraction = min(1.0, max(0.0, float(fraction)))
    with store.transaction() as conn:
        cur = conn.execute("UPDATE jobs SET stage = ?, progress = ? WHERE id = ? AND state = 'running' "
                           "AND lease_owner = ?", (stage, fraction, job_id, owner))
        return cur.rowcount == 1


def set_waiting_reason(store: Store, reason: str) -> None:
    """Why queued jobs wait (the gate's words); a deferred job keeps its own retry reason until it is due."""
    now = time.time()
    with store.transaction() as conn:
        conn.execute("UPDATE jobs SET waiting_reason = ? WHERE state = 'queued' AND waiting_reason IS NOT ? "
                     "AND (not_before IS NULL OR not_before <= ?)", (reason, reason, now))


MAX_CRASHES = 3


def reclaim_expired(store: Store, *, now: float | None = None, max_crashes: int = MAX_CRASHES) -> list[int]:
    """Running jobs whose worker stopped renewing go back to the queue; their checkpoint lets them resume.

    `attempts` counts these crashes. A job whose worker died `max_crashes` times (a study that runs
    the box out of memory, say) is failed with that reason instead of crashing workers forever.
    """
    now = time.time() if now is None else now
    reclaimed: list[int] = []
    with store.transaction() as conn:
        rows = conn.execute("SELECT id, attempts, lease_owner FROM jobs WHERE state = 'running' AND lease_expires < ?",
                            (now,)).fetchall()
        for row in rows:
            crashes = row["attempts"] + 1
            detail = {"crashes": crashes, "dead_owner": row["lease_owner"]}
            if crashes >= max_crashes:
                transition(store, row["id"], "fail", actor="scheduler", conn=conn, now=now, detail=detail,
                           attempts=crashes, lease_owner=None, lease_expires=None, finished_at=now,
                           error_class="crash",
                           error=f"the worker stopped {crashes} times while running this job (out of memory or a "
                                 f"crash); see the worker log, then `edgescreen jobs retry {row['id']}`")
                state = "failed"
            else:
                transition(store, row["id"], "reclaim", actor="scheduler", conn=conn, now=now, detail=detail,
                           attempts=crashes, lease_owner=None, lease_expires=None,
                           waiting_reason="worker stopped; resumes from its checkpoint")
                state = "reclaimed"
            conn.execute("INSERT INTO events (ts, kind, source, state, detail) VALUES (?, 'job', 'scheduler', ?, ?)",
                         (now, state, json.dumps({"job": row["id"], "crashes": crashes})))
            reclaimed.append(int(row["id"]))
    return reclaimed


def finish(store: Store, job_id: int, owner: str, *, triage: str, findings_json: str, output_dir: str,
           outbox_items: Iterable[OutboxItem] = ()) -> bool:
    """Result row, `done` and the outbox rows in ONE transaction, only while we hold the lease.

    A crash before the commit leaves the job running (its lease expires, it is run again); after it,
    the result and every export exist exactly once. False: we lost the lease, nothing was written.
    """
    now = time.time()
    items = list(outbox_items)
    with store.transaction() as conn:
        try:
            job = transition(store, job_id, "finish", actor=owner, owner=owner, conn=conn, now=now,
                             detail={"triage": triage, "outbox": len(items)}, finished_at=now, lease_owner=None,
                             lease_expires=None, waiting_reason=None, progress=1.0, error=None, error_class=None,
                             not_before=None)
        except InvalidTransition:
            return False
        conn.execute("INSERT INTO results (job_id, study_uid, triage, findings, output_dir, created_at) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (job_id, job["study_uid"], triage, findings_json, output_dir, now))
        add_items(conn, items, now=now)
    return True


def release(store: Store, job_id: int, owner: str, *, to: str, reason: str | None = None, error: str | None = None,
            stage: str | None = None) -> bool:
    """Give a running job back (preempted: queued) or end it (failed / quarantined), only while we hold it."""
    action = {"queued": "preempt", "failed": "fail", "quarantined": "quarantine"}.get(to)
    if action is None:
        raise InvalidTransition(f"job {job_id}: release to {to!r}; use queued, failed or quarantined")
    now = time.time()
    fields: dict[str, Any] = {"lease_owner": None, "lease_expires": None, "waiting_reason": reason}
    if error is not None:
        fields["error"] = error
    if stage is not None:
        fields["stage"] = stage
    if to != "queued":
        fields["finished_at"] = now
    try:
        transition(store, job_id, action, actor=owner, owner=owner, now=now,
                   detail={k: v for k, v in (("reason", reason), ("error", error), ("at", stage)) if v}, **fields)
    except InvalidTransition:
        return False
    return True


def defer(store: Store, job_id: int, owner: str, *, error_class: str, error: str, max_retries: int,
          delay_s: float, now: float | None = None) -> tuple[str, int]:
    """A system error (full disk, locked database, I/O): back to the queue after `delay_s`, counted per
    error class; after `max_retries` of one class the job fails with the error and what to do.

    Returns ("deferred" | "failed" | "lease-lost", the retry count of this class).
    """
    now = time.time() if now is None else now
    with store.transaction() as conn:
        row = conn.execute("SELECT retry_counts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        counts: dict[str, int] = json.loads(row["retry_counts"]) if row and row["retry_counts"] else {}
        n = counts.get(error_class, 0) + 1
        counts[error_class] = n
        common = {"lease_owner": None, "lease_expires": None, "retry_counts": json.dumps(counts),
                  "error_class": error_class}
        try:
            if n > max_retries:
                message = (f"{error} ({error_class}; still failing after {max_retries} "
                           f"{'retry' if max_retries == 1 else 'retries'}). Fix the cause, then "
                           f"`edgescreen jobs retry {job_id}`")
                transition(store, job_id, "fail", actor=owner, owner=owner, conn=conn, now=now,
                           detail={"error_class": error_class, "retries": max_retries}, error=message,
                           finished_at=now, waiting_reason=None, not_before=None, **common)
                return "failed", n - 1
            due = now + delay_s
            reason = (f"waiting: retry {n} of {max_retries} at {time.strftime('%H:%M:%S', time.localtime(due))} "
                      f"after {error_class}: {error}")
            transition(store, job_id, "defer", actor=owner, owner=owner, conn=conn, now=now,
                       detail={"error_class": error_class, "retry": n, "delay_s": round(delay_s, 3)},
                       error=error, not_before=due, waiting_reason=reason, **common)
            return "deferred", n
        except InvalidTransition:
            return "lease-lost", n


def set_flag(store: Store, job_id: int, flag: str, actor: str) -> None:
    """Staff overrides: `urgent` jumps the queue, `run_now` also skips grace periods. Both are audited."""
    if flag not in ("urgent", "run_now"):
        raise ValueError(f"unknown flag {flag!r}")
    try:
        transition(store, job_id, flag, actor=actor, **{flag: 1})
    except InvalidTransition:
        job = get(store, job_id)
        raise InvalidTransition(f"job {job_id} is {job['state'] if job else 'unknown'}; only queued or running "
                                "jobs can be marked") from None


def retry(store: Store, job_id: int, actor: str) -> dict:
    """Staff: a failed job goes back to the queue with its retry counts cleared (audited with their name)."""
    try:
        return transition(store, job_id, "retry", actor=actor, detail={"by": actor}, error=None, error_class=None,
                          retry_counts=None, attempts=0, not_before=None, finished_at=None, progress=None,
                          waiting_reason=f"retried by {actor}")
    except InvalidTransition:
        job = get(store, job_id)
        raise InvalidTransition(f"job {job_id} is {job['state'] if job else 'unknown (no such job)'}; only failed "
                                "jobs can be retried") from None
