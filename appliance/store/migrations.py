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
    # 3 (issue 11, web UI): users rebuilt with the roles the clinic has (clinician, technician, admin; the
    # old staff/radiologist become clinician), disabled and must-change flags, a chosen language; hashed API
    # tokens; login attempts for the rate limit; indexes for the worklist (one query per page, none per row)
    # and the audit page.
    """
    CREATE TABLE users_v3 (
        username TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('clinician', 'technician', 'admin')),
        password_hash TEXT,
        created_at REAL NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0,
        must_change_password INTEGER NOT NULL DEFAULT 0,
        password_changed_at REAL, last_login_at REAL, locale TEXT
    );
    INSERT INTO users_v3 (username, role, password_hash, created_at, must_change_password)
        SELECT username, CASE role WHEN 'admin' THEN 'admin' WHEN 'technician' THEN 'technician' ELSE 'clinician' END,
               password_hash, created_at, 1 FROM users;
    DROP TABLE users;
    ALTER TABLE users_v3 RENAME TO users;
    CREATE TABLE api_tokens (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        username TEXT NOT NULL REFERENCES users(username),
        name TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL, last_used_at REAL, revoked_at REAL
    );
    CREATE INDEX api_tokens_user ON api_tokens(username);
    CREATE TABLE login_attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL, username TEXT NOT NULL, address TEXT NOT NULL, ok INTEGER NOT NULL
    );
    CREATE INDEX login_attempts_user ON login_attempts(username, ts);
    CREATE INDEX login_attempts_address ON login_attempts(address, ts);
    CREATE INDEX studies_received ON studies(received_at);
    CREATE INDEX jobs_study ON jobs(study_uid, id);
    CREATE INDEX results_study ON results(study_uid);
    CREATE INDEX audit_ts ON audit(ts);
    CREATE INDEX audit_actor_ts ON audit(actor, ts);
    CREATE INDEX audit_action_ts ON audit(action, ts)
    """,
    # 4 (issue 16, reliability; issue 13 item 7, the DICOM service heartbeat): a job's progress within its
    # stage for the UI; bounded retries with backoff (retry counts per error class, the time before which a
    # deferred job is not taken); indexes that keep the gate's reads and the next-job pick fast at 1 M
    # instances; one heartbeat row per service, so the scheduler knows when the DICOM service is down.
    """
    ALTER TABLE jobs ADD COLUMN progress REAL;
    ALTER TABLE jobs ADD COLUMN retry_counts TEXT;
    ALTER TABLE jobs ADD COLUMN not_before REAL;
    ALTER TABLE jobs ADD COLUMN error_class TEXT;
    CREATE INDEX jobs_queued ON jobs(run_now, urgent, priority, created_at) WHERE state = 'queued';
    CREATE INDEX jobs_running_lease ON jobs(lease_expires) WHERE state = 'running';
    CREATE INDEX instances_received ON instances(received_at);
    CREATE INDEX instances_ae_received ON instances(calling_ae, received_at);
    CREATE INDEX mpps_updated ON mpps(updated_at);
    CREATE TABLE heartbeats (
        service TEXT PRIMARY KEY,
        pid INTEGER, host TEXT,
        started_at REAL NOT NULL, beat_at REAL NOT NULL, stopped_at REAL,
        durable_before REAL,
        detail TEXT
    )
    """,
    # 5 (issue 12, sync): outbox rows get an explicit state changed only by appliance.store.outbox.change
    # (pending -> sending under a lease -> sent | pending again with backoff | failed; superseded for an
    # old heartbeat), a group key that orders a study's cloud items, and the progress of a resumable upload.
    """
    ALTER TABLE outbox ADD COLUMN state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'sending', 'sent', 'failed', 'superseded'));
    ALTER TABLE outbox ADD COLUMN lease_owner TEXT;
    ALTER TABLE outbox ADD COLUMN lease_expires REAL;
    ALTER TABLE outbox ADD COLUMN group_key TEXT;
    ALTER TABLE outbox ADD COLUMN progress TEXT;
    ALTER TABLE outbox ADD COLUMN updated_at REAL;
    UPDATE outbox SET state = 'sent' WHERE sent_at IS NOT NULL;
    CREATE INDEX outbox_due ON outbox(state, kind, next_attempt_at);
    CREATE INDEX outbox_group ON outbox(group_key, id) WHERE group_key IS NOT NULL
    """,
    # 6 (issue 11, web UI): the worklist's derived row per study (state, the job that speaks for it, worst
    # triage, review), so a page of 10,000 studies is one indexed query. appliance.store.worklist keeps it
    # current with triggers it installs itself (the migration runner splits on ';', which a trigger body
    # needs) and rebuilds it whenever it installs them.
    """
    CREATE TABLE worklist (
        study_uid TEXT PRIMARY KEY,
        received_at REAL NOT NULL,
        state TEXT NOT NULL, state_rank INTEGER NOT NULL,
        job_id INTEGER, job_state TEXT, stage TEXT, progress REAL, pipeline TEXT,
        waiting_reason TEXT, error TEXT, series_reason TEXT,
        urgent INTEGER NOT NULL DEFAULT 0, run_now INTEGER NOT NULL DEFAULT 0,
        n_jobs INTEGER NOT NULL DEFAULT 0, n_series INTEGER NOT NULL DEFAULT 0,
        triage_rank INTEGER NOT NULL DEFAULT 0, n_results INTEGER NOT NULL DEFAULT 0,
        n_reviewed INTEGER NOT NULL DEFAULT 0, reviewed_at REAL
    );
    CREATE INDEX worklist_received ON worklist(received_at);
    CREATE INDEX worklist_state ON worklist(state, received_at);
    CREATE INDEX worklist_triage ON worklist(triage_rank, received_at)
    """,
    # 7 (issue 13, retention): when a study's images and a result's output files were deleted by the
    # retention policy (appliance.store.retention), so the UI and the audit can say "deleted on ..., by policy"
    # rather than show a missing file.
    """
    ALTER TABLE studies ADD COLUMN images_purged_at REAL;
    ALTER TABLE results ADD COLUMN outputs_purged_at REAL
    """,
    # 8 (issue 17, one source of truth): jobs without the CHECK that named the pipelines (which pipelines exist
    # is appliance.pipeline.accepts.PIPELINES; store.jobs.enqueue refuses any other). SQLite cannot drop a
    # CHECK, so the table is rebuilt with every column, row, index and its AUTOINCREMENT counter. results is
    # rebuilt with it: its job_id references jobs, and with foreign keys on (they cannot be switched off inside
    # the migration's transaction) dropping jobs under result rows fails, so the new results references the new
    # jobs, whose rename then carries the reference along. The renames run with legacy_alter_table on: the
    # modern rename re-checks every trigger in the schema, and the worklist's triggers on studies and series
    # name jobs, which does not exist between the drop and the rename (with foreign keys on, the legacy rename
    # still rewrites results' reference). Triggers ON the two tables go with them: the worklist's are
    # reinstalled, and its table rebuilt, on first use (appliance.store.worklist.ensure_worklist).
    """
    PRAGMA legacy_alter_table = ON;
    CREATE TABLE jobs_v8 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        study_uid TEXT NOT NULL REFERENCES studies(study_uid),
        series_uid TEXT NOT NULL REFERENCES series(series_uid),
        pipeline TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('receiving', 'queued', 'running', 'done', 'failed', 'quarantined')),
        stage TEXT, checkpoint TEXT,
        priority INTEGER NOT NULL DEFAULT 0, urgent INTEGER NOT NULL DEFAULT 0, run_now INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT, lease_expires REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        waiting_reason TEXT, error TEXT,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL,
        progress REAL, retry_counts TEXT, not_before REAL, error_class TEXT,
        UNIQUE (series_uid, pipeline)
    );
    INSERT INTO jobs_v8 (id, study_uid, series_uid, pipeline, state, stage, checkpoint, priority, urgent, run_now,
                         lease_owner, lease_expires, attempts, waiting_reason, error, created_at, updated_at,
                         started_at, finished_at, progress, retry_counts, not_before, error_class)
        SELECT id, study_uid, series_uid, pipeline, state, stage, checkpoint, priority, urgent, run_now,
               lease_owner, lease_expires, attempts, waiting_reason, error, created_at, updated_at,
               started_at, finished_at, progress, retry_counts, not_before, error_class FROM jobs;
    CREATE TABLE results_v8 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL UNIQUE REFERENCES jobs_v8(id),
        study_uid TEXT NOT NULL, triage TEXT NOT NULL, findings TEXT NOT NULL, output_dir TEXT,
        reviewed_by TEXT, reviewed_at REAL, created_at REAL NOT NULL,
        outputs_purged_at REAL
    );
    INSERT INTO results_v8 (id, job_id, study_uid, triage, findings, output_dir, reviewed_by, reviewed_at, created_at,
                            outputs_purged_at)
        SELECT id, job_id, study_uid, triage, findings, output_dir, reviewed_by, reviewed_at, created_at,
               outputs_purged_at FROM results;
    DELETE FROM sqlite_sequence WHERE name IN ('jobs_v8', 'results_v8');
    INSERT INTO sqlite_sequence (name, seq)
        SELECT name || '_v8', seq FROM sqlite_sequence WHERE name IN ('jobs', 'results');
    DROP TABLE results;
    DROP TABLE jobs;
    ALTER TABLE jobs_v8 RENAME TO jobs;
    ALTER TABLE results_v8 RENAME TO results;
    PRAGMA legacy_alter_table = OFF;
    CREATE INDEX jobs_state ON jobs(state, urgent DESC, priority DESC, created_at);
    CREATE INDEX jobs_study ON jobs(study_uid, id);
    CREATE INDEX jobs_queued ON jobs(run_now, urgent, priority, created_at) WHERE state = 'queued';
    CREATE INDEX jobs_running_lease ON jobs(lease_expires) WHERE state = 'running';
    CREATE INDEX results_study ON results(study_uid)
    """,
]
