"""The outbox: everything that must leave the box (PACS exports, cloud items) as durable rows.

Rows are added inside the transaction that makes them due (a job's result and `done`), so a crash can
neither lose nor double them: the idempotency key is UNIQUE and a second insert of the same key is a no-op.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class OutboxItem:
    """One thing to deliver. `kind` names the destination and type (for example "pacs", "cloud.finding")."""

    kind: str
    idempotency_key: str
    payload: dict[str, Any] = field(default_factory=dict)


def add_items(conn: sqlite3.Connection, items: Iterable[OutboxItem], *, now: float | None = None) -> list[int]:
    """Insert items in the caller's open transaction; an item whose key exists already is skipped.

    Returns the ids of the rows (existing or new) in the order given.
    """
    now = time.time() if now is None else now
    ids: list[int] = []
    for item in items:
        conn.execute("INSERT OR IGNORE INTO outbox (kind, idempotency_key, payload, created_at, next_attempt_at) "
                     "VALUES (?, ?, ?, ?, 0)", (item.kind, item.idempotency_key, json.dumps(item.payload), now))
        ids.append(int(conn.execute("SELECT id FROM outbox WHERE idempotency_key = ?",
                                    (item.idempotency_key,)).fetchone()[0]))
    return ids
