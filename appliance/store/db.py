"""Opening the store: the database connection, migrations and crash recovery.

Every service opens its own Store on the same data directory. SQLite in WAL mode with
synchronous=FULL makes a committed transaction durable before `commit` returns; files are written
atomically before the row that names them is committed, so after any crash a row never points at
a missing or partial file.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.store.files import remove_temp_files
from edgescreen.appliance.store.migrations import MIGRATIONS

log = get_logger(__name__)

RECOVERY_MARGIN_S = 120.0  # clock steps and coarse file-system timestamps: look this much further back
CHECK_SAMPLE = 2000  # instance rows the bounded check stats at random (Store.check_files)
CHECK_BUDGET_S = 10.0  # time the bounded check may spend walking series directories


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
        """Every file against every row: drop dead writers' temp files, list files no row claims and rows whose
        files are gone. Walks all of files/ (158 s at 1 M instances): the DICOM service's start-up recovery
        (store.instances.recover_instances) and the doctor (`check_files`) look only where things changed.

        Unclaimed files are kept (the sender may not have had its success response; the DICOM service
        re-ingests them). Rows with missing files are reported, never silently deleted.
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

    def check_files(self, *, sample: int = CHECK_SAMPLE, budget_s: float = CHECK_BUDGET_S) -> dict[str, Any]:
        """Do the index and files/ agree? What the doctor asks while the services may be writing: read-only and
        bounded whatever the store's size (`recover` walks all of files/: 158 s at 1 M instances).

        Two looks, each cheap: (1) the series directories changed since the DICOM service's last durable
        heartbeat, the scope of its own start-up recovery (a file written or removed since lies in such a
        directory); every directory when there is no durable heartbeat, for at most `budget_s`, then
        `complete` is False; (2) `sample` instance rows picked at random and stat'ed, which catches what
        directory times cannot show (a whole series deleted, a backup restored without some files). A row
        reported missing is read again afterwards, so a study the retention policy purged meanwhile is not.
        """
        t0 = time.monotonic()
        beat = self.query_one("SELECT durable_before FROM heartbeats WHERE service = 'dicom'")
        since = beat["durable_before"] - RECOVERY_MARGIN_S if beat and beat["durable_before"] is not None else None
        over = lambda: time.monotonic() - t0 > budget_s  # noqa: E731
        missing: set[str] = set()
        unclaimed: list[str] = []
        directories = 0
        for directory in series_dirs(self.files_dir, modified_since=since, stop=over):
            report = reconcile_dir(self, directory, remove_temp=False)
            missing.update(report["missing_files"])
            unclaimed += report["unclaimed_files"]
            directories += 1
        complete = not over()
        top = self.query_one("SELECT MAX(rowid) AS top FROM instances")["top"] or 0
        picks = range(1, top + 1) if sample >= top else random.sample(range(1, top + 1), sample)
        sampled = set()
        for rowid in sorted(picks):  # rowid gaps (deleted rows): the next row up
            row = self.query_one("SELECT path FROM instances WHERE rowid >= ? ORDER BY rowid LIMIT 1", (rowid,))
            if row is not None and row["path"] not in sampled:
                sampled.add(row["path"])
                if not (self.data_dir / row["path"]).exists():
                    missing.add(row["path"])
        still = [p for p in sorted(missing) if self.query_one("SELECT 1 FROM instances WHERE path = ?", (p,))]
        when = "every series directory" if since is None else \
            f"series directories changed since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
        scope = (f"{when}: {directories} checked{'' if complete else f' (stopped after {budget_s:g} s)'}; "
                 f"{len(sampled)} instances sampled at random")
        return {"missing_files": still, "unclaimed_files": sorted(unclaimed), "removed_temp_files": [],
                "directories": directories, "sampled": len(sampled), "since": since, "complete": complete,
                "scope": scope, "seconds": round(time.monotonic() - t0, 3)}

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


# -- rows against files, one series directory at a time ---------------------------------------------------
def series_dirs(files_dir: Path, *, modified_since: float | None = None,
                stop: Callable[[], bool] | None = None) -> Iterator[Path]:
    """The series directories under files/ (files/<study>/<series>), or only those whose entries changed at or
    after `modified_since`: adding, renaming or removing a file updates its directory's mtime, so a file
    written since then lies in such a directory. One scandir per study and one stat per series, never a
    walk of the instances themselves."""
    try:
        studies = list(os.scandir(files_dir))
    except FileNotFoundError:
        return
    for study in studies:
        if stop is not None and stop():
            return
        if not study.is_dir(follow_symlinks=False):
            continue
        try:
            entries = list(os.scandir(study.path))
        except OSError:
            continue
        for series in entries:
            try:
                if series.is_dir(follow_symlinks=False) and (
                        modified_since is None or series.stat(follow_symlinks=False).st_mtime >= modified_since):
                    yield Path(series.path)
            except OSError:
                continue


def reconcile_dir(store: Store, directory: Path, *, remove_temp: bool = True) -> dict[str, list[str]]:
    """One series directory against the index: dead writers' temp files removed (remove_temp), files no row
    claims, rows whose files are gone (relative paths, as Store.recover reports them)."""
    removed = remove_temp_files(directory) if remove_temp else []
    prefix = str(directory.relative_to(store.data_dir)) + "/"
    # a range on the UNIQUE path index: every path under the directory ('0' sorts right after '/')
    claimed = {row["path"] for row in store.query("SELECT path FROM instances WHERE path >= ? AND path < ?",
                                                  (prefix, prefix[:-1] + "0"))}
    try:
        on_disk = {prefix + entry.name for entry in os.scandir(directory)
                   if entry.name.endswith(".dcm") and entry.is_file(follow_symlinks=False)}
    except FileNotFoundError:
        on_disk = set()
    return {"removed_temp_files": [str(p) for p in removed], "unclaimed_files": sorted(on_disk - claimed),
            "missing_files": sorted(claimed - on_disk)}
