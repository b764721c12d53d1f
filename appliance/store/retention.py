"""Retention: what the box deletes, and when, so the data disk never fills with studies nobody needs.

The rule (site config [retention]): a study's received images go `images_days` after its results were
delivered and reviewed; the result files (SEG, SR, PDF, key images) `results_days` after; the findings rows
stay; audit rows older than `audit_days`, event rows older than `events_days`, quarantined instances older
than `quarantine_days`. Never deleted, whatever their age: a study with a job not done (receiving, queued,
running, failed, quarantined: staff must see and act on those), a result not reviewed, an export to the
PACS or the cloud not sent. "Delivered" is therefore exact: every outbox row naming the study is sent.

Deleting files and rows cannot be one transaction, so each deletion is made restartable: the files are
first renamed into ``<data_dir>/purging/<batch>/`` (with a note of where they came from), then the rows go
in one transaction with the audit row, then the batch directory is removed. A crash before the commit
leaves files the next pass puts back where they were; after it, files the next pass removes. Renamed
files are never under ``files/``, so the DICOM service's restart recovery never re-ingests a purged study.

Applied by the worker when it is idle (at most every `every_s`) and by `edgescreen purge [--dry-run]`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgescreen.appliance.config.site import Retention
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.store.db import Store

log = get_logger(__name__)

DAY = 86400.0
PURGING = "purging"
NOTE = "purge.json"


@dataclass
class StudyPurge:
    study_uid: str
    files: int
    bytes: int
    since: float  # when the clock started: the later of delivered and reviewed (or the last receipt)
    why: str


@dataclass
class OutputPurge:
    job_id: int
    study_uid: str
    path: str
    bytes: int
    since: float


@dataclass
class Plan:
    """What a pass would delete (a dry run prints it) and what it keeps, with the reason per study."""

    now: float
    images: list[StudyPurge] = field(default_factory=list)
    outputs: list[OutputPurge] = field(default_factory=list)
    quarantine: list[tuple[int, str | None, int]] = field(default_factory=list)  # (row id, path, bytes)
    audit_rows: int = 0
    event_rows: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # reason -> studies kept for it

    @property
    def bytes(self) -> int:
        return (sum(s.bytes for s in self.images) + sum(o.bytes for o in self.outputs)
                + sum(q[2] for q in self.quarantine))

    def empty(self) -> bool:
        return not (self.images or self.outputs or self.quarantine or self.audit_rows or self.event_rows)

    def as_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "images": [s.__dict__ for s in self.images],
                "outputs": [o.__dict__ for o in self.outputs],
                "quarantine": [{"id": q[0], "path": q[1], "bytes": q[2]} for q in self.quarantine],
                "audit_rows": self.audit_rows, "event_rows": self.event_rows, "kept": self.kept}


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _keep(plan: Plan, reason: str) -> None:
    plan.kept[reason] = plan.kept.get(reason, 0) + 1


def plan(store: Store, policy: Retention, *, now: float | None = None) -> Plan:
    """Work out what the policy deletes now. A handful of grouped scans, so it stays cheap at a million
    instances; nothing is changed."""
    now = time.time() if now is None else now
    result = Plan(now)
    images = {r["study_uid"]: r for r in store.query(
        "SELECT se.study_uid, COUNT(*) AS n, COALESCE(SUM(i.size), 0) AS bytes, MAX(i.received_at) AS last "
        "FROM instances i JOIN series se ON se.series_uid = i.series_uid GROUP BY se.study_uid")}
    job_rows = {r["study_uid"]: r for r in store.query(
        "SELECT study_uid, COUNT(*) AS n, SUM(state != 'done') AS open, MAX(finished_at) AS finished "
        "FROM jobs GROUP BY study_uid")}
    review = {r["study_uid"]: r for r in store.query(
        "SELECT study_uid, SUM(reviewed_at IS NULL) AS unreviewed, MAX(reviewed_at) AS reviewed "
        "FROM results GROUP BY study_uid")}
    # outbox rows carry the study in their payload; an unsent one (pending, sending, failed) holds the study
    undelivered, delivered = set(), {}
    for r in store.query("SELECT json_extract(payload, '$.study_uid') AS study, sent_at, state FROM outbox "
                         "WHERE json_extract(payload, '$.study_uid') IS NOT NULL"):
        if r["sent_at"] is None and r["state"] != "superseded":
            undelivered.add(r["study"])
        elif r["sent_at"] is not None:
            delivered[r["study"]] = max(delivered.get(r["study"], 0.0), r["sent_at"])

    def clock(study: str) -> tuple[float | None, str]:
        """When the study's retention clock started, or None and why it is kept."""
        jobs_ = job_rows.get(study)
        if jobs_ is None:
            return None, "not analysed"
        if jobs_["open"]:
            return None, "a job not done (receiving, queued, running, failed or quarantined)"
        rv = review.get(study)
        if rv is None or rv["unreviewed"]:
            return None, "results not reviewed"
        if study in undelivered:
            return None, "results not yet delivered"
        since = max(jobs_["finished"] or 0.0, rv["reviewed"] or 0.0, delivered.get(study, 0.0))
        return since, "delivered and reviewed"

    for study, row in images.items():
        since, why = clock(study)
        if (since is None and why == "not analysed" and policy.unanalysed_days is not None
                and now - (row["last"] or now) >= policy.unanalysed_days * DAY):
            result.images.append(StudyPurge(study, row["n"], row["bytes"], row["last"],
                                            f"not analysed, last image {policy.unanalysed_days:g}+ days ago"))
            continue
        if since is None:
            _keep(result, why)
        elif now - since >= policy.images_days * DAY:
            result.images.append(StudyPurge(study, row["n"], row["bytes"], since,
                                            f"{why} {policy.images_days:g}+ days ago"))
        else:
            _keep(result, f"within {policy.images_days:g} days of delivery and review")
    results_root = store.results_dir
    for r in store.query("SELECT job_id, study_uid, output_dir FROM results WHERE output_dir IS NOT NULL "
                         "AND outputs_purged_at IS NULL"):
        since, _ = clock(r["study_uid"])
        path = Path(r["output_dir"])
        if since is None or now - since < policy.results_days * DAY or not _inside(results_root, path):
            continue
        result.outputs.append(OutputPurge(r["job_id"], r["study_uid"], str(path), _size(path), since))
    cutoff = now - policy.quarantine_days * DAY
    for r in store.query("SELECT id, path FROM quarantine WHERE received_at < ?", (cutoff,)):
        path = store.data_dir / r["path"] if r["path"] and not os.path.isabs(r["path"]) else r["path"]
        result.quarantine.append((r["id"], str(path) if path else None, _size(Path(path)) if path else 0))
    result.audit_rows = store.query_one("SELECT COUNT(*) FROM audit WHERE ts < ?", (now - policy.audit_days * DAY,))[0]
    result.event_rows = store.query_one("SELECT COUNT(*) FROM events WHERE ts < ?", (now - policy.events_days * DAY,))[0]
    return result


# ---------------------------------------------------------------------------------------------- apply


def _batch_dir(store: Store, key: str) -> Path:
    d = store.data_dir / PURGING / hashlib.sha1(key.encode()).hexdigest()[:16]
    d.mkdir(parents=True, exist_ok=True)
    return d


def _move_aside(batch: Path, sources: list[Path], note: dict[str, Any]) -> list[tuple[str, str]]:
    """Rename each source into the batch; the note (written first) lets a later pass undo or finish it."""
    moved = [(str(src), f"{i:06d}-{src.name}") for i, src in enumerate(sources)]
    (batch / NOTE).write_text(json.dumps({**note, "moved": moved}))
    for src, name in moved:
        with contextlib.suppress(FileNotFoundError):  # already gone: nothing to keep
            os.replace(src, batch / name)
    return moved


def recover(store: Store) -> int:
    """Finish or undo passes a crash interrupted; returns how many batches it settled.

    A batch whose rows are still there (the commit never happened) is put back; one whose rows are gone
    (committed) is removed.
    """
    root = store.data_dir / PURGING
    if not root.is_dir():
        return 0
    settled = 0
    for batch in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            note = json.loads((batch / NOTE).read_text())
        except (OSError, ValueError):
            note = None
        if note is not None and not _committed(store, note):
            for src, name in note["moved"]:
                if (batch / name).exists():
                    Path(src).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(batch / name, src)
            log.warning("interrupted purge undone: its rows were never deleted", kind=note.get("kind"),
                        target=note.get("study_uid") or note.get("job_id"))
        shutil.rmtree(batch, ignore_errors=True)
        settled += 1
    return settled


def _committed(store: Store, note: dict[str, Any]) -> bool:
    if note.get("kind") == "images":
        rels = [os.path.relpath(src, store.data_dir) for src, _ in note["moved"]]
        marks = ",".join("?" * len(rels)) or "''"
        return store.query_one(f"SELECT COUNT(*) FROM instances WHERE path IN ({marks})", tuple(rels))[0] == 0
    row = store.query_one("SELECT outputs_purged_at FROM results WHERE job_id = ?", (note.get("job_id"),))
    return row is None or row["outputs_purged_at"] is not None


def _purge_images(store: Store, item: StudyPurge, actor: str, now: float) -> None:
    rows = store.query("SELECT i.path FROM instances i JOIN series se ON se.series_uid = i.series_uid "
                       "WHERE se.study_uid = ?", (item.study_uid,))
    batch = _batch_dir(store, f"images:{item.study_uid}")
    _move_aside(batch, [store.data_dir / r["path"] for r in rows], {"kind": "images", "study_uid": item.study_uid})
    with store.transaction() as conn:
        conn.execute("DELETE FROM instances WHERE series_uid IN (SELECT series_uid FROM series WHERE study_uid = ?)",
                     (item.study_uid,))
        conn.execute("UPDATE studies SET images_purged_at = ? WHERE study_uid = ?", (now, item.study_uid))
        store.audit(actor, "retention.delete_images", item.study_uid,
                    f"{len(rows)} instance(s), {item.bytes} bytes; {item.why}", conn=conn)
    shutil.rmtree(batch, ignore_errors=True)


def _purge_outputs(store: Store, item: OutputPurge, actor: str, now: float) -> None:
    batch = _batch_dir(store, f"outputs:{item.job_id}")
    _move_aside(batch, [Path(item.path)], {"kind": "outputs", "job_id": item.job_id})
    with store.transaction() as conn:
        conn.execute("UPDATE results SET outputs_purged_at = ? WHERE job_id = ?", (now, item.job_id))
        store.audit(actor, "retention.delete_outputs", item.study_uid,
                    f"job {item.job_id}: {item.bytes} bytes of SEG/SR/PDF/key images", conn=conn)
    shutil.rmtree(batch, ignore_errors=True)


def apply(store: Store, todo: Plan, policy: Retention, *, actor: str) -> Plan:
    """Carry out a plan (made by `plan` just before); returns it as done."""
    now = todo.now
    for item in todo.images:
        _purge_images(store, item, actor, now)
    for item in todo.outputs:
        _purge_outputs(store, item, actor, now)
    if todo.quarantine:
        ids = [q[0] for q in todo.quarantine]
        with store.transaction() as conn:
            conn.executemany("DELETE FROM quarantine WHERE id = ?", [(i,) for i in ids])
            store.audit(actor, "retention.delete_quarantine", None,
                        f"{len(ids)} quarantined instance(s) older than {policy.quarantine_days:g} days", conn=conn)
        for _, path, _ in todo.quarantine:  # a file left by a crash here is never re-ingested: not under files/
            if path and _inside(store.quarantine_dir, Path(path)):
                with contextlib.suppress(FileNotFoundError):
                    Path(path).unlink()
    if todo.audit_rows or todo.event_rows:
        with store.transaction() as conn:
            conn.execute("DELETE FROM audit WHERE ts < ?", (now - policy.audit_days * DAY,))
            conn.execute("DELETE FROM events WHERE ts < ?", (now - policy.events_days * DAY,))
            store.audit(actor, "retention.delete_log_rows", None,
                        f"{todo.audit_rows} audit row(s) older than {policy.audit_days:g} days, "
                        f"{todo.event_rows} event row(s) older than {policy.events_days:g} days", conn=conn)
    if not todo.empty():
        log.info("retention pass", studies=len(todo.images), outputs=len(todo.outputs),
                 quarantine=len(todo.quarantine), audit_rows=todo.audit_rows, event_rows=todo.event_rows,
                 freed_mb=round(todo.bytes / 1e6, 1))
    return todo


def purge(store: Store, policy: Retention, *, dry_run: bool = False, actor: str = "retention",
          now: float | None = None) -> Plan:
    """One retention pass: settle interrupted ones, plan, and (unless dry_run) delete."""
    if not dry_run:
        recover(store)
    todo = plan(store, policy, now=now)
    return todo if dry_run else apply(store, todo, policy, actor=actor)


class IdlePurger:
    """The worker's hook: a pass at most every `policy.every_s`, only when called from the idle path."""

    def __init__(self, store: Store, policy: Retention) -> None:
        self.store, self.policy = store, policy
        self.next_at = 0.0

    def maybe_run(self) -> Plan | None:
        if not self.policy.enabled or time.monotonic() < self.next_at:
            return None
        self.next_at = time.monotonic() + self.policy.every_s
        try:
            return purge(self.store, self.policy, actor="worker:retention")
        except Exception:  # retention must never stop the worker; the next idle pass tries again
            log.exception("retention pass failed; will try again at the next idle pass")
            return None
