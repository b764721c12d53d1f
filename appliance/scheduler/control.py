"""Pausing the scheduler: staff or a technician stop all analysis (maintenance, a suspicious model, a
clinic event) and resume it later. The gate closes with a reason naming who paused and when, so a
queue that does not move explains itself. Used by the CLI (`edgescreen scheduler pause|resume|status`)
and the web UI, audited with the person's name.
"""

from __future__ import annotations

import json
import time
from typing import Any

from edgescreen.appliance.store import Store

PAUSE_KEY = "scheduler.paused"


def pause(store: Store, actor: str, reason: str | None = None) -> dict[str, Any]:
    """Close the gate for every job (run-now included) until `resume`. Pausing again updates the reason."""
    now = time.time()
    value = {"by": actor, "at": now, "reason": (reason or "").strip() or None}
    with store.transaction() as conn:
        conn.execute("INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE "
                     "SET value = excluded.value, updated_at = excluded.updated_at", (PAUSE_KEY, json.dumps(value), now))
        store.audit(actor, "scheduler.pause", None, value["reason"], conn=conn)
        conn.execute("INSERT INTO events (ts, kind, source, state, detail) VALUES (?, 'scheduler', 'control', "
                     "'paused', ?)", (now, json.dumps(value)))
    return status(store)


def resume(store: Store, actor: str) -> dict[str, Any]:
    """Open the gate again (the scanner and power rules still apply). Resuming a running scheduler is a no-op."""
    now = time.time()
    with store.transaction() as conn:
        was = conn.execute("DELETE FROM settings WHERE key = ?", (PAUSE_KEY,)).rowcount
        if was:
            store.audit(actor, "scheduler.resume", None, None, conn=conn)
            conn.execute("INSERT INTO events (ts, kind, source, state, detail) VALUES (?, 'scheduler', 'control', "
                         "'resumed', ?)", (now, json.dumps({"by": actor})))
    return status(store)


def status(store: Store) -> dict[str, Any]:
    """{"paused": bool, "by", "at", "reason", "text"}; `text` is the gate's reason while paused."""
    row = store.query_one("SELECT value FROM settings WHERE key = ?", (PAUSE_KEY,))
    if row is None:
        return {"paused": False, "by": None, "at": None, "reason": None, "text": "scheduler running"}
    value = json.loads(row["value"])
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(value["at"]))
    text = f"scheduler paused by {value['by']} at {when}" + (f": {value['reason']}" if value.get("reason") else "")
    return {"paused": True, "by": value["by"], "at": value["at"], "reason": value.get("reason"), "text": text}
