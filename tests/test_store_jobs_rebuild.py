"""Migration 8 (issue 17): the jobs table without the CHECK that named the pipelines, on a database whose
rows were written by the old schema: every row, column, index, foreign key and AUTOINCREMENT counter kept,
and the worklist's triggers back after its first use."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from edgescreen.appliance.pipeline.accepts import PIPELINES
from edgescreen.appliance.store import Store, jobs
from edgescreen.appliance.store import db as db_module
from edgescreen.appliance.store.migrations import MIGRATIONS

REBUILD = 8  # the migration under test (1-based, as PRAGMA user_version counts)


def _rows(conn: sqlite3.Connection, table: str) -> list[dict]:
    return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY id")]


def _indexes(conn: sqlite3.Connection, table: str) -> set[tuple]:
    """(unique, partial, columns, WHERE clause) per index: names of automatic indexes follow the table's."""
    out = set()
    for idx in conn.execute(f"PRAGMA index_list({table})"):
        cols = tuple((c["name"], c["desc"]) for c in conn.execute(f"PRAGMA index_xinfo({idx['name']})") if c["key"])
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (idx["name"],)).fetchone()[0]
        where = sql.split(" WHERE ", 1)[1] if sql and " WHERE " in sql else None
        out.add((idx["unique"], idx["partial"], cols, where))
    return out


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple]:
    return [(c["name"], c["type"], c["notnull"], c["dflt_value"], c["pk"]) for c in conn.execute(f"PRAGMA table_info({table})")]


@pytest.fixture
def old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory at schema 7 with studies, series, jobs in every state, results and the worklist
    triggers, all written by that schema; the highest job and result ids were deleted (their ids must
    never come back: outbox idempotency keys and audit rows name them)."""
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS[:REBUILD - 1])
    data = tmp_path / "data"
    store = Store(data)
    assert store.schema_version() == REBUILD - 1
    from edgescreen.appliance.store.worklist import ensure_worklist

    ensure_worklist(store)
    now = time.time()
    with store.transaction() as conn:
        for s in range(6):
            conn.execute("INSERT INTO studies (study_uid, patient_name, received_at, updated_at) VALUES (?, ?, ?, ?)",
                         (f"1.{s}", f"P^{s}", now + s, now + s))
            conn.execute("INSERT INTO series (series_uid, study_uid, modality, state, first_received_at, "
                         "last_received_at) VALUES (?, ?, ?, 'queued', ?, ?)", (f"1.{s}.1", f"1.{s}", "CT", now, now))
        for s, (state, pipeline) in enumerate([("queued", "pancreas"), ("running", "pancreas"), ("done", "mammo"),
                                               ("failed", "pancreas"), ("quarantined", "mammo"), ("done", "pancreas")]):
            conn.execute(
                "INSERT INTO jobs (study_uid, series_uid, pipeline, state, stage, priority, urgent, lease_owner, "
                "lease_expires, attempts, error, created_at, updated_at, progress, retry_counts, not_before, "
                "error_class) VALUES (?, ?, ?, ?, 'stage2', ?, ?, 'w1', ?, 2, ?, ?, ?, 0.5, '{\"io\": 1}', ?, ?)",
                (f"1.{s}", f"1.{s}.1", pipeline, state, s, s % 2, now + 60, "disk full" if state == "failed" else None,
                 now + s, now + s, now + 5, "io" if state == "failed" else None))
        for job_id in (3, 6):
            conn.execute("INSERT INTO results (job_id, study_uid, triage, findings, output_dir, created_at, "
                         "outputs_purged_at) VALUES (?, ?, 'suspicious', '{}', 'results/x', ?, ?)",
                         (job_id, f"1.{job_id - 1}", now, now if job_id == 3 else None))
        conn.execute("DELETE FROM results WHERE job_id = 6")
        conn.execute("DELETE FROM jobs WHERE id = 6")
    return data


def test_jobs_rebuilt_without_pipeline_names_keeps_everything(old_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = sqlite3.connect(old_store / "edgescreen.db")
    before.row_factory = sqlite3.Row
    kept = {t: (_rows(before, t), _indexes(before, t), _columns(before, t)) for t in ("jobs", "results")}
    seq = dict(before.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
    before.close()
    assert seq["jobs"] == 6 and seq["results"] == 2

    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS)
    store = Store(old_store)
    conn = store.connect()
    assert store.schema_version() == len(MIGRATIONS) >= REBUILD
    for table, (rows, indexes, columns) in kept.items():
        assert _rows(conn, table) == rows, table
        assert _indexes(conn, table) == indexes, table
        assert _columns(conn, table) == columns, table
    jobs_sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs'").fetchone()[0]
    assert "pancreas" not in jobs_sql and "mammo" not in jobs_sql and "_v8" not in jobs_sql
    results_sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'results'").fetchone()[0]
    assert "_v8" not in results_sql and "jobs" in results_sql
    assert not conn.execute("SELECT name FROM sqlite_master WHERE name LIKE '%\\_v8%' ESCAPE '\\'").fetchall()
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert store.integrity_ok()

    # foreign keys still hold both ways: a result for no job, a job for no series
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as tx:
        tx.execute("INSERT INTO results (job_id, study_uid, triage, findings, created_at) VALUES (99, '1.0', 't', '{}', 0)")
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as tx:
        tx.execute("INSERT INTO jobs (study_uid, series_uid, pipeline, state, created_at, updated_at) "
                   "VALUES ('1.0', 'no.such.series', 'pancreas', 'queued', 0, 0)")
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as tx:  # the state machine's CHECK stays
        tx.execute("UPDATE jobs SET state = 'lost' WHERE id = 1")

    # ids of deleted rows never come back
    new_series = "1.5.1"
    job = jobs.enqueue(store, "1.5", new_series, "mammo")
    assert job == 7
    with store.transaction() as tx:
        assert tx.execute("INSERT INTO results (job_id, study_uid, triage, findings, created_at) "
                          "VALUES (?, '1.5', 'not_suspicious', '{}', 0)", (job,)).lastrowid == 3


def test_pipeline_names_are_checked_by_the_code_not_the_schema(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    now = time.time()
    with store.transaction() as conn:
        conn.execute("INSERT INTO studies (study_uid, received_at, updated_at) VALUES ('9', ?, ?)", (now, now))
        conn.execute("INSERT INTO series (series_uid, study_uid, first_received_at, last_received_at) "
                     "VALUES ('9.1', '9', ?, ?)", (now, now))
    with pytest.raises(ValueError, match="pipeline 'liver': use one of pancreas, mammo"):
        jobs.enqueue(store, "9", "9.1", "liver")
    assert store.query("SELECT * FROM jobs") == []
    assert {jobs.enqueue(store, "9", "9.1", p) for p in PIPELINES} == {1, 2}
    # every pipeline reports the stages the UI counts ("stage k of n")
    assert set(jobs.PIPELINE_STAGES) == set(PIPELINES)


def test_the_worklist_triggers_come_back_after_the_rebuild(old_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rebuild drops the triggers on jobs and results; the worklist reinstalls them (and rebuilds its
    rows) on first use, after which a job's change reaches the worklist again."""
    from edgescreen.appliance.store.worklist import TRIGGER_PREFIX, ensure_worklist

    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS)
    store = Store(old_store)
    assert ensure_worklist(store) is True
    names = {r[0] for r in store.query("SELECT tbl_name FROM sqlite_master WHERE type = 'trigger' AND name LIKE ?",
                                       (TRIGGER_PREFIX + "%",))}
    assert {"jobs", "results"} <= names
    with store.transaction() as conn:
        conn.execute("UPDATE jobs SET state = 'done', stage = NULL WHERE id = 1")
    row = store.query_one("SELECT job_state FROM worklist WHERE study_uid = '1.0'")
    assert row["job_state"] == "done"
