"""Versioned schema migrations. PRAGMA user_version holds the applied version.

Append a new entry to MIGRATIONS to change the schema; never edit an applied one, since boxes in
the field already ran it.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: the initial schema.
    """
    CREATE TABLE studies (
        study_uid TEXT PRIMARY KEY,
        patient_id TEXT, patient_name TEXT, study_date TEXT, accession TEXT,
        description TEXT, modalities TEXT,
        received_at REAL NOT NULL, updated_at REAL NOT NULL
    );
    CREATE TABLE series (
        series_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL REFERENCES studies(study_uid),
        modality TEXT, description TEXT, body_part TEXT, number INTEGER,
        state TEXT NOT NULL DEFAULT 'receiving'
            CHECK (state IN ('receiving', 'complete', 'queued', 'not_analysed', 'quarantined')),
        reason TEXT,
        pipeline TEXT,
        first_received_at REAL NOT NULL, last_received_at REAL NOT NULL
    );
    CREATE INDEX series_study ON series(study_uid);
    CREATE TABLE instances (
        sop_uid TEXT PRIMARY KEY,
        series_uid TEXT NOT NULL REFERENCES series(series_uid),
        sop_class_uid TEXT NOT NULL, transfer_syntax TEXT,
        instance_number INTEGER,
        path TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
        calling_ae TEXT, received_at REAL NOT NULL
    );
    CREATE INDEX instances_series ON instances(series_uid);
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at REAL NOT NULL, reason TEXT NOT NULL, path TEXT,
        calling_ae TEXT, peer TEXT, sop_uid TEXT, sop_class_uid TEXT, study_uid TEXT, series_uid TEXT
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        study_uid TEXT NOT NULL REFERENCES studies(study_uid),
        series_uid TEXT NOT NULL REFERENCES series(series_uid),
        pipeline TEXT NOT NULL CHECK (pipeline IN ('pancreas', 'mammo')),
        state TEXT NOT NULL CHECK (state IN ('receiving', 'queued', 'running', 'done', 'failed', 'quarantined')),
        stage TEXT, checkpoint TEXT,
        priority INTEGER NOT NULL DEFAULT 0, urgent INTEGER NOT NULL DEFAULT 0, run_now INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT, lease_expires REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        waiting_reason TEXT, error TEXT,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL,
        UNIQUE (series_uid, pipeline)
    );
    CREATE INDEX jobs_state ON jobs(state, urgent DESC, priority DESC, created_at);
    CREATE TABLE results (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL UNIQUE REFERENCES jobs(id),
        study_uid TEXT NOT NULL, triage TEXT NOT NULL, findings TEXT NOT NULL, output_dir TEXT,
        reviewed_by TEXT, reviewed_at REAL, created_at REAL NOT NULL
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL, idempotency_key TEXT NOT NULL UNIQUE, payload TEXT NOT NULL,
        created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL DEFAULT 0,
        sent_at REAL, last_error TEXT
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL, kind TEXT NOT NULL, source TEXT NOT NULL, state TEXT, detail TEXT
    );
    CREATE INDEX events_kind_ts ON events(kind, ts);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT, detail TEXT
    );
    CREATE TABLE users (
        username TEXT PRIMARY KEY, role TEXT NOT NULL CHECK (role IN ('staff', 'radiologist', 'technician', 'admin')),
        password_hash TEXT, created_at REAL NOT NULL
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);
    """,
    # 2: the DICOM service: MPPS instances (kept durably so an N-SET after a restart finds its N-CREATE)
    # and the DICOM status each quarantined instance was answered with.
    """
    CREATE TABLE mpps (
        sop_uid TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        calling_ae TEXT, peer TEXT, station_ae TEXT, modality TEXT,
        study_uid TEXT, accession TEXT, procedure TEXT,
        attributes TEXT NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL
    );
    CREATE INDEX mpps_status ON mpps(status, updated_at);
    ALTER TABLE quarantine ADD COLUMN status INTEGER;
    CREATE INDEX quarantine_received ON quarantine(received_at)
    """,
]
