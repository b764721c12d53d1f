"""Service heartbeats: one row per service, rewritten every few seconds while it runs.

Why: the scheduler reads the scanner's state from what the DICOM service records (MPPS steps, C-STORE
arrivals). When that service is down those tables simply stop changing, which reads as "no exam,
no images": the unsafe answer. With a heartbeat the scheduler can tell "quiet" from "not listening"
and fall back to the fail-safe. The DICOM service's beat also records `durable_before`: every index
row committed before that moment is on disk (the beat itself commits with synchronous=FULL, which
flushes the WAL holding them), so a restart re-checks only files written since (store.instances).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from edgescreen.appliance.store.db import Store

BEAT_EVERY_S = 5.0


def beat(store: Store, service: str, *, started_at: float, durable_before: float | None = None,
         detail: dict[str, Any] | None = None, now: float | None = None) -> None:
    """Record that `service` is alive now (a durable commit)."""
    now = time.time() if now is None else now
    with store.transaction() as conn:
        conn.execute(
            """INSERT INTO heartbeats (service, pid, host, started_at, beat_at, stopped_at, durable_before, detail)
               VALUES (?, ?, ?, ?, ?, NULL, ?, ?)
               ON CONFLICT(service) DO UPDATE SET pid = excluded.pid, host = excluded.host,
                   started_at = excluded.started_at, beat_at = excluded.beat_at, stopped_at = NULL,
                   durable_before = COALESCE(excluded.durable_before, heartbeats.durable_before),
                   detail = excluded.detail""",
            (service, os.getpid(), socket.gethostname(), started_at, now, durable_before,
             json.dumps(detail) if detail is not None else None))


def stopped(store: Store, service: str, *, durable_before: float | None = None, now: float | None = None) -> None:
    """A clean stop: the service is not listening any more (its signals are stale from now on)."""
    now = time.time() if now is None else now
    with store.transaction() as conn:
        conn.execute("UPDATE heartbeats SET stopped_at = ?, beat_at = ?, "
                     "durable_before = COALESCE(?, durable_before) WHERE service = ?",
                     (now, now, durable_before, service))


def read(store: Store, service: str) -> dict[str, Any] | None:
    row = store.query_one("SELECT * FROM heartbeats WHERE service = ?", (service,))
    return dict(row) if row else None


def staleness(store: Store, service: str, stale_after_s: float, now: float | None = None) -> str | None:
    """None while `service` beats; else why its signals cannot be trusted, in words staff read.

    A service that never ran on this data directory (a box that only takes browser uploads) has no row
    and is not stale: it never claimed to be watching anything.
    """
    row = read(store, service)
    if row is None:
        return None
    now = time.time() if now is None else now
    when = time.strftime("%H:%M:%S", time.localtime(row["beat_at"]))
    if row["stopped_at"] is not None:
        return f"the {service} service was stopped at {when}"
    if now - row["beat_at"] > stale_after_s:
        return f"the {service} service has been silent since {when} (stopped, crashed or hung)"
    return None
