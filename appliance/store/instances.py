"""Received instances: the durable write behind every C-STORE success, and the study/series index."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.store.db import Store
from appliance.store.files import atomic_write

_SAFE_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


def _uid_name(uid: str) -> str:
    """A file-system-safe name for a UID; odd UIDs from odd scanners are hashed rather than trusted."""
    return uid if _SAFE_UID.match(uid) else "x" + hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()


@dataclass
class IncomingInstance:
    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str | None = None
    instance_number: int | None = None
    calling_ae: str | None = None
    study: dict = field(default_factory=dict)  # patient_id, patient_name, study_date, accession, description
    series: dict = field(default_factory=dict)  # modality, description, body_part, number


def instance_path(inst: IncomingInstance) -> Path:
    return Path("files") / _uid_name(inst.study_uid) / _uid_name(inst.series_uid) / f"{_uid_name(inst.sop_uid)}.dcm"


def store_instance(store: Store, inst: IncomingInstance, data: bytes | memoryview) -> tuple[Path, bool]:
    """Write the file durably, then index it in one transaction. Returns (absolute path, was_duplicate).

    The same SOP Instance UID twice is idempotent: the first copy is kept and success is returned,
    since a scanner that resends after a lost response must not see a failure.
    """
    rel = instance_path(inst)
    existing = store.query_one("SELECT path FROM instances WHERE sop_uid = ?", (inst.sop_uid,))
    if existing is not None:
        return store.data_dir / existing["path"], True
    atomic_write(store.data_dir / rel, data)
    now = time.time()
    s, r = inst.study, inst.series
    with store.transaction() as conn:
        if conn.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (inst.sop_uid,)).fetchone():
            return store.data_dir / rel, True
        conn.execute(
            """INSERT INTO studies (study_uid, patient_id, patient_name, study_date, accession, description,
                                    modalities, received_at, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(study_uid) DO UPDATE SET updated_at = excluded.updated_at""",
            (inst.study_uid, s.get("patient_id"), s.get("patient_name"), s.get("study_date"), s.get("accession"),
             s.get("description"), r.get("modality"), now, now),
        )
        conn.execute(
            """INSERT INTO series (series_uid, study_uid, modality, description, body_part, number,
                                   first_received_at, last_received_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(series_uid) DO UPDATE SET last_received_at = excluded.last_received_at""",
            (inst.series_uid, inst.study_uid, r.get("modality"), r.get("description"), r.get("body_part"),
             r.get("number"), now, now),
        )
        conn.execute(
            """INSERT INTO instances (sop_uid, series_uid, sop_class_uid, transfer_syntax, instance_number,
                                      path, size, calling_ae, received_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (inst.sop_uid, inst.series_uid, inst.sop_class_uid, inst.transfer_syntax, inst.instance_number,
             str(rel), len(data), inst.calling_ae, now),
        )
    return store.data_dir / rel, False


def series_files(store: Store, series_uid: str) -> list[Path]:
    rows = store.query("SELECT path FROM instances WHERE series_uid = ? ORDER BY instance_number, sop_uid",
                       (series_uid,))
    return [store.data_dir / row["path"] for row in rows]


def list_studies(store: Store) -> list[dict]:
    """Studies with their series, instance counts and state, newest first (the `studies` command and the UI)."""
    studies = []
    for st in store.query("SELECT * FROM studies ORDER BY received_at DESC"):
        series = []
        for se in store.query(
            """SELECT se.*, COUNT(i.sop_uid) AS instances,
                      (SELECT state FROM jobs j WHERE j.series_uid = se.series_uid ORDER BY j.id DESC LIMIT 1) AS job_state
               FROM series se LEFT JOIN instances i ON i.series_uid = se.series_uid
               WHERE se.study_uid = ? GROUP BY se.series_uid ORDER BY se.number, se.first_received_at""",
            (st["study_uid"],),
        ):
            series.append(dict(se))
        studies.append({**dict(st), "series": series})
    return studies
