"""The job state machine. Every transition is one guarded UPDATE, so two workers can never both win."""

from __future__ import annotations

import time
from typing import Any

from appliance.store.db import Store

JOB_STATES = ("receiving", "queued", "running", "done", "failed", "quarantined")

# to-state -> the states it may be entered from
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("receiving", "running", "failed", "done"),  # ready / preempted or lease lost / retry / re-run
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
