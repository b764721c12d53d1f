"""Opening the store: the database connection, migrations and crash recovery.

Every service opens its own Store on the same data directory. SQLite in WAL mode with
synchronous=FULL makes a committed transaction durable before `commit` returns; files are written
atomically before the row that names them is committed, so after any crash a row never points at
a missing or partial file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from appliance.logs import get_logger
from appliance.store.files import remove_temp_files
from appliance.store.migrations import MIGRATIONS

log = get_logger(__name__)


class StoreError(RuntimeError):
    """The store cannot be used (unwritable directory, full disk, newer schema); the message says what to do."""


class Store:
    """Paths and connections for one data directory. Connections are per thread."""

    def __init__(self, data_dir: Path | str, *, migrate: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.db_path = self.data_dir / "edgescreen.db"
        self.files_dir = self.data_dir / "files"
        self.quarantine_dir = self.data_dir / "quarantine"
        self.results_dir = self.data_dir / "results"
        self.work_dir = self.data_dir / "work"
        self._local = threading.local()
        try:
            for d in (self.data_dir, self.files_dir, self.quarantine_dir, self.results_dir, self.work_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"data directory {self.data_dir}: cannot create ({exc.strerror}); "
                             "check the path and its permissions or pass --data-dir") from None
        if migrate:
            self.migrate()

    # -- connections ------------------------------------------------------------------------------
    def connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA busy_timeout=30000")
            except sqlite3.Error as exc:
                raise StoreError(f"database {self.db_path}: cannot open ({exc}); is the disk full or read-only?") from None
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of change. BEGIN IMMEDIATE takes the write lock up front, so no upgrade deadlocks."""
        conn = self.connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # after SQLITE_FULL SQLite may already have rolled back
                conn.execute("ROLLBACK")
            raise

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return self.connect().execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple | dict = ()) -> sqlite3.Row | None:
        return self.connect().execute(sql, params).fetchone()

    # -- schema -----------------------------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self.connect().execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> int:
        conn = self.connect()
        current = self.schema_version()
        if current > len(MIGRATIONS):
            raise StoreError(f"database {self.db_path} has schema {current}, newer than this edgescreen "
                             f"({len(MIGRATIONS)}); install the newer version or restore a backup")
        if current == len(MIGRATIONS):
            return current
        # Upgrade safety (issue 13): every pending migration runs in ONE transaction, so a failure anywhere leaves
        # the database exactly as the previous version left it (and that version still runs on it); before it,
        # a copy of the old database is kept beside it for going back to the old version after a good migration.
        conn.execute("BEGIN IMMEDIATE")
        version = start = self.schema_version()  # another process may have migrated meanwhile
        try:
            backup = self._backup(start) if 0 < start < len(MIGRATIONS) else None
            for version in range(start + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[version - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"database {self.db_path}: upgrading schema {start} to {len(MIGRATIONS)} failed at migration "
                             f"{version} ({exc}); nothing was changed, the previous edgescreen version still runs on it. "
                             "Reinstall that version, or free disk space and start again") from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if self.schema_version() > start:
            log.info("schema migrated", version=self.schema_version(), previous=start, db=str(self.db_path),
                     backup=str(backup) if backup else None)
        return self.schema_version()

    def _backup(self, version: int) -> Path | None:
        """A consistent copy of the database at schema `version`, taken under our write lock through a second
        (reading) connection: WAL lets it read the last committed state. Best effort: the single migration
        transaction is what keeps the database safe; the copy is for going back after a successful upgrade."""
        target = self.db_path.with_name(f"{self.db_path.name}.v{version}.bak")
        tmp = target.with_name(target.name + ".tmp")
        try:
            with contextlib.closing(sqlite3.connect(self.db_path, timeout=30.0)) as src, \
                    contextlib.closing(sqlite3.connect(tmp)) as dst:
                src.backup(dst)
            os.replace(tmp, target)
        except (sqlite3.Error, OSError) as exc:
            log.warning("no copy of the database before migrating", db=str(self.db_path), error=str(exc))
            with contextlib.suppress(OSError):
                tmp.unlink()
            return None
        return target

    # -- recovery ---------------------------------------------------------------------------------
    def recover(self, *, remove_temp: bool = True) -> dict[str, list[str]]:
        """After a crash: drop dead writers' temp files, list files no row claims and rows whose files are gone.

        Unclaimed files are kept (the sender may not have had its success response; the DICOM service
        re-ingests them). Rows with missing files are reported, never silently deleted. The doctor
        calls this with remove_temp=False: it only reports, since services may be writing.
        """
        removed = remove_temp_files(self.data_dir) if remove_temp else []
        claimed = {row["path"] for row in self.query("SELECT path FROM instances")}
        on_disk = {str(p.relative_to(self.data_dir)) for p in self.files_dir.rglob("*.dcm")}
        report = {
            "removed_temp_files": [str(p) for p in removed],
            "unclaimed_files": sorted(on_disk - claimed),
            "missing_files": sorted(claimed - on_disk),
        }
        if any(report.values()):
            log.warning("store recovery", **{k: len(v) for k, v in report.items()})
        return report

    def integrity_ok(self) -> bool:
        return self.query_one("PRAGMA integrity_check")[0] == "ok"

    # -- small shared records ---------------------------------------------------------------------
    def add_event(self, kind: str, source: str, state: str | None = None, detail: str | None = None,
                  ts: float | None = None) -> int:
        with self.transaction() as conn:
            cur = conn.execute("INSERT INTO events (ts, kind, source, state, detail) VALUES (?, ?, ?, ?, ?)",
                               (ts if ts is not None else time.time(), kind, source, state, detail))
            return int(cur.lastrowid)

    def audit(self, actor: str, action: str, target: str | None = None, detail: str | None = None, *,
              conn: sqlite3.Connection | None = None) -> None:
        """The one way anything is audited. Pass `conn` to record it inside a transaction already open, so the
        change and its audit row commit together or not at all."""
        sql = "INSERT INTO audit (ts, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)"
        params = (time.time(), actor, action, target, detail)
        if conn is not None:
            conn.execute(sql, params)
            return
        with self.transaction() as own:
            own.execute(sql, params)
