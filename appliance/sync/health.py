"""The device health heartbeat the fleet sees: queue depth, disk, power events, versions, bundle, last errors.

It carries no patient data: error texts are scrubbed of quoted values (messages quote header fields), UIDs,
paths and the related study's patient name, ID and accession before they leave (`scrub`, through the one
free-text rule, appliance.sync.deid.scrub_text), and nothing else in it is free text from a study.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from edgescreen.appliance import __version__
from edgescreen.appliance.store.db import Store


def scrub(text: str | None, secrets_: list[str]) -> str | None:
    """An error message fit to leave the box: no quoted values, UIDs, file paths or known patient identifiers."""
    if not text:
        return text
    from edgescreen.appliance.sync.deid import scrub_text

    return scrub_text(text, secrets_)[:240]


def phi_of_study(store: Store, study_uid: str | None) -> list[str]:
    """The identifiers of a study the box holds (UID, patient name and its parts, ID, accession, date): what
    no text that leaves the box may contain."""
    if not study_uid:
        return []
    row = store.query_one("SELECT patient_id, patient_name, accession, study_date FROM studies WHERE study_uid = ?",
                          (study_uid,))
    if row is None:
        return [study_uid]
    values = [study_uid, *(str(v) for v in row if v)]
    return values + [p for v in values for p in re.split(r"[\^ ]", str(v)) if len(p) >= 3]


def _last_errors(store: Store, limit: int = 5) -> list[dict[str, Any]]:
    errors: list[tuple[float, str, str | None, str | None]] = []
    for r in store.query("SELECT updated_at, study_uid, error FROM jobs WHERE state = 'failed' AND error IS NOT NULL "
                         "ORDER BY updated_at DESC LIMIT ?", (limit,)):
        errors.append((r["updated_at"], "job", r["study_uid"], r["error"]))
    for r in store.query("SELECT updated_at, kind, payload, last_error FROM outbox WHERE last_error IS NOT NULL "
                         "ORDER BY updated_at DESC LIMIT ?", (limit,)):
        try:
            study = json.loads(r["payload"]).get("study_uid")
        except (TypeError, ValueError):
            study = None
        errors.append((r["updated_at"] or 0, f"outbox:{r['kind']}", study, r["last_error"]))
    errors.sort(key=lambda e: e[0] or 0, reverse=True)
    return [{"at": at, "source": source, "error": scrub(error, phi_of_study(store, study))}
            for at, source, study, error in errors[:limit]]


def health(store: Store, config: Any, *, device_id: str, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    jobs = {r["state"]: r["n"] for r in store.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}
    outbox = {r["state"]: r["n"] for r in store.query("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")}
    usage = shutil.disk_usage(store.data_dir)
    power_rows = store.query("SELECT ts, source, state FROM events WHERE kind = 'power' AND ts > ? ORDER BY ts DESC",
                             (now - 86400,))
    last_power = store.query_one("SELECT state FROM events WHERE kind = 'power' ORDER BY ts DESC LIMIT 1")
    from edgescreen.appliance.bundle import current_bundle

    bundle = current_bundle(store.data_dir)
    models: list[dict[str, Any]] = []
    latest = store.query_one("SELECT findings FROM results ORDER BY id DESC LIMIT 1")
    if latest is not None:
        try:
            models = [{k: m.get(k) for k in ("role", "name", "version", "backend", "precision")}
                      for m in json.loads(latest["findings"]).get("models", [])]
        except (TypeError, ValueError, AttributeError):
            models = []
    services: dict[str, Any] = {}
    try:
        for r in store.query("SELECT service, beat_at, stopped_at FROM heartbeats"):
            services[r["service"]] = {"beat_s_ago": round(now - r["beat_at"], 1), "stopped": r["stopped_at"] is not None}
    except Exception:  # noqa: BLE001 - an older schema without heartbeats
        services = {}
    return {
        "device": device_id,
        "site": config.site.name,
        "version": __version__,
        "at": now,
        "queue": {s: jobs.get(s, 0) for s in ("queued", "running", "done", "failed", "quarantined")},
        "outbox": {"pending": outbox.get("pending", 0) + outbox.get("sending", 0), "failed": outbox.get("failed", 0),
                   "sent": outbox.get("sent", 0)},
        "disk": {"free_gb": round(usage.free / 1e9, 2), "total_gb": round(usage.total / 1e9, 2),
                 "used_percent": round(100 * (usage.total - usage.free) / usage.total, 1) if usage.total else None},
        "power": {"state": last_power["state"] if last_power else "unknown", "events_24h": len(power_rows),
                  "recent": [{"at": r["ts"], "state": r["state"], "source": r["source"]} for r in power_rows[:5]]},
        "bundle": Path(bundle).name if bundle else None,
        "models": models,
        "services": services,
        "last_errors": _last_errors(store),
    }
