"""Where results stand on their way out: pending count, last success and last error, for the PACS and the cloud.

The web UI's system page and `edgescreen outbox list` show this. Link-level states (the receiver did not
answer the probe, outside the sync window, on battery) are recorded as `sync` events by the sync service,
only when they change; per-item errors are in the outbox rows.
"""

from __future__ import annotations

import json
import time
from typing import Any

from edgescreen.appliance.store import outbox
from edgescreen.appliance.store.db import Store
from edgescreen.appliance.sync.enqueue import CLOUD_KINDS

DESTINATIONS = {"pacs": "kind = 'pacs'", "cloud": "kind LIKE 'cloud.%'"}
_KINDS = {"pacs": ("pacs",), "cloud": CLOUD_KINDS}


def record_link(store: Store, destination: str, state: str, detail: str | None, last: dict[str, str]) -> None:
    """A sync event when the link state of `destination` changes (`last` remembers it per process)."""
    key = f"{state}:{detail}" if state != "ok" else "ok"
    if last.get(destination) == key:
        return
    last[destination] = key
    store.add_event("sync", destination, state, detail)


def summary(store: Store, now: float | None = None) -> dict[str, dict[str, Any]]:
    """{"pacs": {...}, "cloud": {...}}: pending (waiting or being sent), failed (needs a technician),
    blocked (pending, but waiting behind a failed item of its study), last_success, last_error (text) with
    last_error_at, next_attempt_at, link (the latest link state)."""
    now = time.time() if now is None else now
    out: dict[str, dict[str, Any]] = {}
    for dest, where in DESTINATIONS.items():
        counts = {r["state"]: r["n"] for r in store.query(
            f"SELECT state, COUNT(*) AS n FROM outbox WHERE {where} GROUP BY state")}
        last_success = store.query_one(f"SELECT MAX(sent_at) FROM outbox WHERE {where} AND state = 'sent'")[0]
        err = store.query_one(f"SELECT id, updated_at, last_error FROM outbox WHERE {where} AND last_error IS NOT NULL "
                              "AND state IN ('pending', 'sending', 'failed') ORDER BY updated_at DESC LIMIT 1")
        link = store.query_one("SELECT ts, state, detail FROM events WHERE kind = 'sync' AND source = ? "
                               "ORDER BY id DESC LIMIT 1", (dest,))
        next_at = store.query_one(f"SELECT MIN(next_attempt_at) FROM outbox WHERE {where} AND state = 'pending'")[0]
        last_error, last_error_at = (err["last_error"], err["updated_at"]) if err else (None, None)
        if link is not None and link["state"] != "ok" and (last_error_at is None or link["ts"] >= last_error_at):
            last_error, last_error_at = link["detail"] or link["state"], link["ts"]
        out[dest] = {
            "pending": counts.get("pending", 0) + counts.get("sending", 0),
            "failed": counts.get("failed", 0),
            "blocked": outbox.blocked(store, _KINDS[dest]) if counts.get("failed") else 0,
            "sent": counts.get("sent", 0),
            "last_success": last_success,
            "last_error": last_error,
            "last_error_at": last_error_at,
            "next_attempt_at": max(next_at, now) if next_at is not None else None,
            "link": link["state"] if link is not None else None,
        }
    return out


def describe_item(row: dict[str, Any]) -> dict[str, Any]:
    """An outbox row for a listing: no payload (it names local files and the original study)."""
    try:
        progress = json.loads(row["progress"]) if row.get("progress") else None
    except ValueError:
        progress = None
    return {k: row.get(k) for k in ("id", "kind", "state", "attempts", "created_at", "next_attempt_at", "sent_at",
                                    "last_error", "lease_owner")} | {"progress": progress}
