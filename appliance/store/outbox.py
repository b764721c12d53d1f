"""The outbox: everything that must leave the box (PACS exports, cloud items) as durable rows.

Rows are added inside the transaction that makes them due (a job's result and `done`), so a crash can
neither lose nor double them: the idempotency key is UNIQUE and a second insert of the same key is a no-op.

Every later change of a row goes through `change`, one guarded UPDATE per action (the same shape as the
job state machine):

    claim      pending (due) / sending (lease expired)  -> sending   a sender takes it under a lease
    progress   sending (lease holder)                    -> sending   renew the lease, record upload progress
    sent       sending (lease holder)                    -> sent
    defer      sending (lease holder)                    -> pending   failed for now; next_attempt_at = backoff
    give_up    sending (lease holder)                    -> failed    permanent refusal or retries exhausted
    reclaim    sending (a dead sender's lease)           -> pending   its process is gone (same host): no wait
    retry      failed / pending                          -> pending   a technician: try again now (audited)
    expedite   pending                                   -> pending   `sync --once`: due now, backoff skipped
    supersede  pending                                   -> superseded  a newer heartbeat replaces an unsent one

A sender that dies keeps its lease until it expires; then any sender may claim the row again. Two senders
can therefore, rarely, both send one item (the first one stalled past its lease): the receiver's UNIQUE
idempotency key turns the second delivery into a no-op, so the cloud still holds it exactly once.

Rows of one `group_key` (one study's cloud items) are claimed in id order: a later item is not claimed
while an earlier one of its group is not yet sent. A row behind a `failed` one is `blocked` (`blocked`
counts them) until a technician retries the failed one.

The clock may go back (a box without a battery-backed clock boots in the past or far ahead, then NTP
corrects it): a row last changed more than CLOCK_SKEW_S in this clock's future was scheduled by a clock
that has since gone back, so its backoff is over and its lease is void. Without that rule a clock
corrected back by a day would hold every deferred item, and every row a killed sender leased, for a day.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgescreen.appliance.store.db import Store

STATES = ("pending", "sending", "sent", "failed", "superseded")
CLOCK_SKEW_S = 60.0  # a row changed further than this in the future: the clock has gone back since


@dataclass(frozen=True)
class OutboxItem:
    """One thing to deliver. `kind` names the destination and type (for example "pacs", "cloud.finding").

    `group_key` orders items: rows sharing it are delivered in the order they were added.
    """

    kind: str
    idempotency_key: str
    payload: dict[str, Any] = field(default_factory=dict)
    group_key: str | None = None


@dataclass(frozen=True)
class Action:
    from_states: tuple[str, ...]
    to: str
    lease_holder: bool = False


ACTIONS: dict[str, Action] = {
    "claim": Action(("pending", "sending"), "sending"),
    "progress": Action(("sending",), "sending", lease_holder=True),
    "sent": Action(("sending",), "sent", lease_holder=True),
    "defer": Action(("sending",), "pending", lease_holder=True),
    "give_up": Action(("sending",), "failed", lease_holder=True),
    "reclaim": Action(("sending",), "pending", lease_holder=True),  # owner = the dead holder
    "retry": Action(("failed", "pending"), "pending"),
    "supersede": Action(("pending",), "superseded"),
    "expedite": Action(("pending",), "pending"),
}

# columns an action may set besides state and updated_at (interpolated into SQL: never user input)
_WRITABLE = frozenset({"attempts", "next_attempt_at", "sent_at", "last_error", "lease_owner", "lease_expires",
                       "progress", "payload"})


class OutboxError(RuntimeError):
    """A change the outbox forbids: unknown row, wrong state, or another sender holds the lease."""


def add_items(conn: sqlite3.Connection, items: Iterable[OutboxItem], *, now: float | None = None) -> list[int]:
    """Insert items in the caller's open transaction; an item whose key exists already is skipped.

    Returns the ids of the rows (existing or new) in the order given.
    """
    now = time.time() if now is None else now
    ids: list[int] = []
    for item in items:
        conn.execute("INSERT OR IGNORE INTO outbox (kind, idempotency_key, payload, created_at, next_attempt_at, "
                     "state, group_key, updated_at) VALUES (?, ?, ?, ?, 0, 'pending', ?, ?)",
                     (item.kind, item.idempotency_key, json.dumps(item.payload), now, item.group_key, now))
        ids.append(int(conn.execute("SELECT id FROM outbox WHERE idempotency_key = ?",
                                    (item.idempotency_key,)).fetchone()[0]))
    return ids


def change(conn: sqlite3.Connection, item_id: int, action: str, *, owner: str | None = None,
           now: float | None = None, expect_lease: bool = True, **fields: Any) -> bool:
    """THE way an outbox row changes: one guarded UPDATE in the caller's transaction.

    Returns False when the row is not in a state the action starts from, or (lease-holder actions) another
    sender holds it now; the caller then drops its work on the row. `claim` of a `sending` row succeeds
    only once its lease has expired.
    """
    spec = ACTIONS.get(action)
    if spec is None:
        raise OutboxError(f"unknown outbox action {action!r}; actions are {', '.join(ACTIONS)}")
    if spec.lease_holder and owner is None:
        raise OutboxError(f"outbox {item_id}: {action} needs the lease holder")
    unknown = set(fields) - _WRITABLE
    if unknown:
        raise OutboxError(f"outbox {item_id}: {action} cannot set {', '.join(sorted(unknown))}")
    now = time.time() if now is None else now
    sets = "".join(f", {k} = :{k}" for k in fields)
    marks = ", ".join(f":from{i}" for i in range(len(spec.from_states)))
    sql = f"UPDATE outbox SET state = :to, updated_at = :now{sets} WHERE id = :id AND state IN ({marks})"
    params: dict[str, Any] = {"to": spec.to, "now": now, "id": item_id, **fields,
                              **{f"from{i}": s for i, s in enumerate(spec.from_states)}}
    if action == "claim":
        sql += (" AND (state = 'pending' OR lease_expires IS NULL OR lease_expires < :now OR updated_at > :skew)")
        params["skew"] = now + CLOCK_SKEW_S
    if spec.lease_holder and expect_lease:
        sql += " AND lease_owner = :owner"
        params["owner"] = owner
    return conn.execute(sql, params).rowcount == 1


def _due_sql(kinds: Sequence[str], max_attempts: int | None) -> str:
    """Rows a sender may take now: due (or their clock went back), and first of their group still unsent."""
    kind_marks = ", ".join("?" * len(kinds))
    attempts_sql = "" if max_attempts is None else f" AND o.attempts < {int(max_attempts)}"
    return (f"SELECT o.id FROM outbox o WHERE o.kind IN ({kind_marks}) AND ("
            "(o.state = 'pending' AND (o.next_attempt_at <= ? OR o.updated_at > ?)) OR "
            "(o.state = 'sending' AND (o.lease_expires < ? OR o.updated_at > ?)))"
            f"{attempts_sql} AND (o.group_key IS NULL OR NOT EXISTS (SELECT 1 FROM outbox p WHERE "
            "p.group_key = o.group_key AND p.id < o.id AND p.state NOT IN ('sent', 'superseded'))) "
            "ORDER BY o.next_attempt_at, o.id LIMIT ?")


def _claim_in(conn: sqlite3.Connection, owner: str, lease_s: float, kinds: Sequence[str], now: float,
              limit: int, max_attempts: int | None, due_by: float) -> list[dict[str, Any]]:
    skew = now + CLOCK_SKEW_S
    claimed: list[dict[str, Any]] = []
    for row in conn.execute(_due_sql(kinds, max_attempts), (*kinds, due_by, skew, now, skew, limit)).fetchall():
        if change(conn, row["id"], "claim", now=now, lease_owner=owner, lease_expires=now + lease_s):
            claimed.append(dict(conn.execute("SELECT * FROM outbox WHERE id = ?", (row["id"],)).fetchone()))
    return claimed


def _settle_fields(action: str, fields: dict[str, Any]) -> dict[str, Any]:
    if action in ("sent", "defer", "give_up", "reclaim"):
        fields = {"lease_owner": None, "lease_expires": None, **fields}
    return fields


def claim(store: Store, owner: str, lease_s: float, *, kinds: Sequence[str], now: float | None = None,
          limit: int = 10, max_attempts: int | None = None, due_by: float | None = None) -> list[dict[str, Any]]:
    """Take up to `limit` due rows of `kinds` under a lease, oldest first, respecting group order.

    Due: pending and next_attempt_at <= `due_by` (default now), or sending with an expired lease (its
    sender died), or changed in this clock's future (the clock went back). `max_attempts` skips rows that
    already used up their attempts.
    """
    return settle_and_claim(store, owner, lease_s, [], kinds=kinds, now=now, limit=limit,
                            max_attempts=max_attempts, due_by=due_by)[0]


def settle_and_claim(store: Store, owner: str, lease_s: float, settles: Sequence[tuple[int, str, dict[str, Any]]],
                     *, kinds: Sequence[str], now: float | None = None, limit: int = 10,
                     max_attempts: int | None = None, due_by: float | None = None,
                     ) -> tuple[list[dict[str, Any]], list[int]]:
    """A sender's finished rows settled (`(id, action, fields)`, as `settle`) and its next rows claimed, in ONE
    transaction: one durable commit per batch instead of one per item, which is what a loop of small items
    costs most on a box's storage. Settling after delivery stays safe: a crash before this commit re-sends
    the batch, and the receiver's unique key answers "duplicate". Returns (claimed rows, ids whose lease was
    lost meanwhile, so were not settled).
    """
    now = time.time() if now is None else now
    due_by = now if due_by is None else due_by
    with store.transaction() as conn:
        lost = [item_id for item_id, action, fields in settles
                if not change(conn, item_id, action, owner=owner, now=now, **_settle_fields(action, fields))]
        claimed = _claim_in(conn, owner, lease_s, kinds, now, limit, max_attempts, due_by) if limit > 0 else []
    return claimed, lost


def settle(store: Store, item_id: int, action: str, owner: str, **fields: Any) -> bool:
    """A lease holder's final (or progress) change in its own transaction; False if the lease was lost."""
    with store.transaction() as conn:
        return change(conn, item_id, action, owner=owner, **_settle_fields(action, fields))


def blocked(store: Store, kinds: Sequence[str]) -> int:
    """Pending rows that wait behind a failed row of their group (a technician's retry of it frees them)."""
    marks = ", ".join("?" * len(kinds))
    return int(store.query_one(
        f"SELECT COUNT(*) FROM outbox o WHERE o.kind IN ({marks}) AND o.state = 'pending' AND o.group_key IS NOT NULL "
        "AND EXISTS (SELECT 1 FROM outbox p WHERE p.group_key = o.group_key AND p.id < o.id AND p.state = 'failed')",
        tuple(kinds))[0])


def next_due(store: Store, kinds: Sequence[str], *, now: float | None = None) -> float | None:
    """When the next row of `kinds` may be claimed (a time, possibly past), or None when none can be: rows
    behind an unsent earlier row of their group wait for it, not for their own time."""
    now = time.time() if now is None else now
    marks = ", ".join("?" * len(kinds))
    row = store.query_one(
        f"SELECT MIN(CASE WHEN o.state = 'pending' AND o.updated_at > ? THEN 0 WHEN o.state = 'pending' "
        f"THEN o.next_attempt_at ELSE o.lease_expires END) FROM outbox o WHERE o.kind IN ({marks}) "
        "AND o.state IN ('pending', 'sending') AND (o.group_key IS NULL OR NOT EXISTS (SELECT 1 FROM outbox p "
        "WHERE p.group_key = o.group_key AND p.id < o.id AND p.state NOT IN ('sent', 'superseded')))",
        (now + CLOCK_SKEW_S, *kinds))
    return None if row is None or row[0] is None else float(row[0])


def reclaim_dead(store: Store, host: str, alive: Callable[[int], bool]) -> int:
    """Rows held by a sender on this host whose process is gone go back to pending at once, instead of
    waiting out the lease (a SIGKILLed sync service restarted by systemd resumes immediately)."""
    count = 0
    with store.transaction() as conn:
        for row in conn.execute("SELECT id, lease_owner FROM outbox WHERE state = 'sending' AND lease_owner LIKE ?",
                                (f"{host}:%",)).fetchall():
            try:
                pid = int(row["lease_owner"].split(":")[1])
            except (IndexError, ValueError):
                continue
            if not alive(pid):
                count += change(conn, row["id"], "reclaim", owner=row["lease_owner"], lease_owner=None,
                                lease_expires=None)
    return count


def retry(store: Store, item_id: int, actor: str) -> dict[str, Any]:
    """A technician's "try again now" for a failed (or waiting) row; audited with their name."""
    with store.transaction() as conn:
        row = conn.execute("SELECT state, kind, attempts FROM outbox WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise OutboxError(f"outbox item {item_id} does not exist (see `edgescreen outbox list`)")
        if not change(conn, item_id, "retry", attempts=0, next_attempt_at=0, last_error=None):
            raise OutboxError(f"outbox item {item_id} is {row['state']}; only failed or pending items can be "
                              "retried")
        detail = json.dumps({"kind": row["kind"], "from": row["state"], "attempts": row["attempts"]})
        store.audit(actor, "outbox.retry", str(item_id), detail, conn=conn)
        return dict(conn.execute("SELECT * FROM outbox WHERE id = ?", (item_id,)).fetchone())


def expedite(store: Store, kinds: Sequence[str], *, now: float | None = None) -> int:
    """Make every pending row of `kinds` due now (a technician's `sync --once`: deliver what is pending)."""
    now = time.time() if now is None else now
    marks = ", ".join("?" * len(kinds))
    with store.transaction() as conn:
        rows = conn.execute(f"SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_at > ? AND kind IN "
                            f"({marks})", (now, *kinds)).fetchall()
        return sum(change(conn, r["id"], "expedite", now=now, next_attempt_at=now) for r in rows)


def supersede_pending(conn: sqlite3.Connection, kind: str, *, keep_id: int | None = None) -> int:
    """Mark unsent rows of `kind` (heartbeats) superseded, except `keep_id`: only the newest is worth sending."""
    rows = conn.execute("SELECT id FROM outbox WHERE kind = ? AND state = 'pending' AND id IS NOT ?",
                        (kind, keep_id)).fetchall()
    return sum(change(conn, r["id"], "supersede") for r in rows)


def list_items(store: Store, *, states: Sequence[str] = STATES, limit: int = 200) -> list[dict[str, Any]]:
    marks = ", ".join("?" * len(states))
    return [dict(r) for r in store.query(f"SELECT * FROM outbox WHERE state IN ({marks}) ORDER BY id DESC LIMIT ?",
                                         (*states, limit))]
