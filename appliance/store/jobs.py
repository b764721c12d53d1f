"""The job state machine. Every transition is one guarded UPDATE, so two workers can never both win."""

from __future__ import annotations

import time
from typing import Any

from appliance.store.db import Store

JOB_STATES = ("receiving", "queued", "running", "done", "failed", "quarantined")

# to-state -> the states it may be entered from
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("receiving", "running", "failed"),  # ready / preempted or lease lost / retry
    "running": ("queued",),
    "done": ("running",),
    "failed": ("receiving", "queued", "running"),
    "quarantined": ("receiving", "queued", "running"),
    "receiving": (),
}


class InvalidTransition(RuntimeError):
    """A transition the state machine forbids, or a job another process changed first."""



def enqueue(store: Store, study_uid: str, series_uid: str, pipeline: str, *, priority: int = 0,
            state: str = "queued") -> int:
    """Queue a series for a pipeline once; a second call for the same series and pipeline returns the same job."""
    now = time.time()
    with store.transaction() as conn:
        row = conn.execute("SELECT id FROM jobs WHERE series_uid = ? AND pipeline = ?", (series_uid, pipeline)).fetchone()
        if row is not None:
            return int(row["id"])
        cur = conn.execute(
            """INSERT INTO jobs (study_uid, series_uid, pipeline, state, priority, created_at, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (study_uid, series_uid, pipeline, state, priority, now, now),
        )
        return int(cur.lastrowid)


def transition(store: Store, job_id: int, to: str, *, owner: str | None = None, **fields: Any) -> None:
    """Move a job to `to` if the state machine allows it from its current state (and, if given, we hold its lease)."""
    if to not in TRANSITIONS:
        raise InvalidTransition(f"unknown job state {to!r}; states are {JOB_STATES}")
    allowed = TRANSITIONS[to]
    sets = "".join(f", {k} = :{k}" for k in fields)
    states = ", ".join(f"'{s}'" for s in allowed)  # constants from TRANSITIONS, never user input
    sql = f"UPDATE jobs SET state = :to, updated_at = :now{sets} WHERE id = :id AND state IN ({states})"
    if owner is not None:
        sql += " AND lease_owner = :owner"
    params = {"to": to, "now": time.time(), "id": job_id, "owner": owner, **fields}
    with store.transaction() as conn:
        if conn.execute(sql, params).rowcount != 1:
            row = conn.execute("SELECT state, lease_owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
            state = row["state"] if row else "missing"
            raise InvalidTransition(f"job {job_id}: cannot go {state} -> {to}"
                                    + (f" as {owner} (lease held by {row['lease_owner']})" if owner and row else ""))


def get(store: Store, job_id: int) -> dict | None:
    row = store.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
    return dict(row) if row else None


ORDER = "run_now DESC, urgent DESC, (created_at < :starve_before) DESC, priority DESC, created_at, id"


def claim_next(store: Store, owner: str, lease_s: float, *, now: float | None = None, starvation_s: float = 6 * 3600,
               only_run_now: bool = False) -> dict | None:
    """Take the most deserving queued job under a lease. One transaction, so two workers never take the same one."""
    now = time.time() if now is None else now
    where = "state = 'queued'" + (" AND run_now = 1" if only_run_now else "")
    with store.transaction() as conn:
        row = conn.execute(f"SELECT id FROM jobs WHERE {where} ORDER BY {ORDER} LIMIT 1",
                           {"starve_before": now - starvation_s}).fetchone()
        if row is None:
            return None
        conn.execute("""UPDATE jobs SET state = 'running', lease_owner = ?, lease_expires = ?,
                        started_at = COALESCE(started_at, ?), waiting_reason = NULL, updated_at = ? WHERE id = ?""",
                     (owner, now + lease_s, now, now, row["id"]))
        return dict(conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())


def renew_lease(store: Store, job_id: int, owner: str, lease_s: float, stage: str | None = None) -> bool:
    """Extend our lease; False means we lost it (reclaimed after we stalled) and must stop without writing."""
    now = time.time()
    with store.transaction() as conn:
        cur = conn.execute("UPDATE jobs SET lease_expires = ?, stage = COALESCE(?, stage), updated_at = ? "
                           "WHERE id = ? AND state = 'running' AND lease_owner = ?",
                           (now + lease_s, stage, now, job_id, owner))
        return cur.rowcount == 1


MAX_CRASHES = 3


def reclaim_expired(store: Store, *, now: float | None = None, max_crashes: int = MAX_CRASHES) -> list[int]:
    """Running jobs whose worker stopped renewing go back to the queue; their checkpoint lets them resume.

    `attempts` counts these crashes. A job whose worker died `max_crashes` times (a study that runs
    the box out of memory, say) is failed with that reason instead of crashing workers forever.
    """
    now = time.time() if now is None else now
    with store.transaction() as conn:
        rows = conn.execute("SELECT id, attempts FROM jobs WHERE state = 'running' AND lease_expires < ?",
                            (now,)).fetchall()
        for row in rows:
            crashes = row["attempts"] + 1
            if crashes >= max_crashes:
                conn.execute("UPDATE jobs SET state = 'failed', attempts = ?, lease_owner = NULL, lease_expires = NULL, "
                             "finished_at = ?, updated_at = ?, error = ? WHERE id = ?",
                             (crashes, now, now, f"the worker stopped {crashes} times while running this job "
                              "(out of memory or a crash); see the worker log, then retry it", row["id"]))
                state = "failed"
            else:
                conn.execute("UPDATE jobs SET state = 'queued', attempts = ?, lease_owner = NULL, lease_expires = NULL, "
                             "waiting_reason = 'worker stopped; resumes from its checkpoint', updated_at = ? WHERE id = ?",
                             (crashes, now, row["id"]))
                state = "reclaimed"
            conn.execute("INSERT INTO events (ts, kind, source, state, detail) VALUES (?, 'job', 'scheduler', ?, ?)",
                         (now, state, f'{{"job": {row["id"]}, "crashes": {crashes}}}'))
    return [r["id"] for r in rows]


def set_waiting_reason(store: Store, reason: str) -> None:
    with store.transaction() as conn:
        conn.execute("UPDATE jobs SET waiting_reason = ? WHERE state = 'queued' AND waiting_reason IS NOT ?",
                     (reason, reason))


def set_flag(store: Store, job_id: int, flag: str, actor: str) -> None:
    """Staff overrides: `urgent` jumps the queue, `run_now` also skips grace periods. Both are audited."""
    if flag not in ("urgent", "run_now"):
        raise ValueError(f"unknown flag {flag!r}")
    now = time.time()
    with store.transaction() as conn:
        cur = conn.execute(f"UPDATE jobs SET {flag} = 1, updated_at = ? WHERE id = ? AND state IN ('queued', 'running')",
                           (now, job_id))
        if cur.rowcount != 1:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            raise InvalidTransition(f"job {job_id} is {row['state'] if row else 'unknown'}; only queued or running "
                                    "jobs can be marked")
        conn.execute("INSERT INTO audit (ts, actor, action, target, detail) VALUES (?, ?, ?, ?, NULL)",
                     (now, actor, f"job.{flag}", str(job_id)))


def finish(store: Store, job_id: int, owner: str, *, triage: str, findings_json: str, output_dir: str) -> bool:
    """Result row and `done` in one transaction, only while we hold the lease: never a duplicate result."""
    now = time.time()
    with store.transaction() as conn:
        cur = conn.execute("UPDATE jobs SET state = 'done', finished_at = ?, updated_at = ?, lease_owner = NULL, "
                           "lease_expires = NULL, waiting_reason = NULL WHERE id = ? AND state = 'running' "
                           "AND lease_owner = ?", (now, now, job_id, owner))
        if cur.rowcount != 1:
            return False
        study = conn.execute("SELECT study_uid FROM jobs WHERE id = ?", (job_id,)).fetchone()["study_uid"]
        conn.execute("INSERT INTO results (job_id, study_uid, triage, findings, output_dir, created_at) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (job_id, study, triage, findings_json, output_dir, now))
    return True


def release(store: Store, job_id: int, owner: str, *, to: str, reason: str | None = None, error: str | None = None,
            stage: str | None = None) -> bool:
    """Give a running job back (preempted: queued) or end it (failed/quarantined), only while we hold it."""
    now = time.time()
    with store.transaction() as conn:
        cur = conn.execute("UPDATE jobs SET state = ?, lease_owner = NULL, lease_expires = NULL, waiting_reason = ?, "
                           "error = COALESCE(?, error), stage = COALESCE(?, stage), updated_at = ?, "
                           "finished_at = CASE WHEN ? IN ('failed', 'quarantined') THEN ? ELSE finished_at END "
                           "WHERE id = ? AND state = 'running' AND lease_owner = ?",
                           (to, reason, error, stage, now, to, now, job_id, owner))
        return cur.rowcount == 1


def list_jobs(store: Store, states: tuple[str, ...] = JOB_STATES) -> list[dict]:
    marks = ", ".join("?" * len(states))
    return [dict(r) for r in store.query(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", states)]
