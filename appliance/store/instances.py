"""Received instances: the durable write behind every C-STORE success, and the study/series index.

Durability model (why a C-STORE success can be answered after ONE flush of the disk):

* The instance file is the record. It is written to a temp name in its final directory, renamed to
  its final name, then fsynced. On ext4 (with or without a journal), XFS and btrfs that fsync also
  makes the new directory entry durable: a journal commit covers the rename, and journal-less ext4
  syncs the parent of a just-added entry itself (fs/ext4/fsync.c, ext4_sync_parent). On any other
  file system, or with `fsync_dir="always"`, the directory is fsynced as well.
* The index row may then be committed with synchronous=NORMAL (`durable_index=False`, what the DICOM
  service uses): it is in the WAL, visible to every reader at once, and made durable by the next
  synchronous commit of any process. If the power fails first, the file is "unclaimed" after the
  restart and `reingest_unclaimed` indexes it again. Nothing acknowledged is lost.
* A crash between the rename and the fsync can leave a partial file under its final name; it was
  never acknowledged, so the sender resends it. Re-ingest finds it unreadable and moves it to the
  quarantine with that explanation instead of deleting anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.store.db import Store, reconcile_dir, series_dirs
from edgescreen.appliance.store.files import TMP_SUFFIX, fsync_dir

log = get_logger(__name__)

_SAFE_UID = re.compile(r"^[0-9][0-9.]{0,63}$")
Buffers = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]

# file systems where fsync(file) after a same-directory rename also persists the new name (see above)
_RENAME_SAFE_FS = frozenset({"ext4", "ext3", "xfs", "btrfs"})
SERIES_STATES = ("receiving", "complete", "queued", "not_analysed", "quarantined")


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


# -- the durable write -------------------------------------------------------------------------------
def _mount_fstype(path: Path) -> str:
    """The file system type of the mount holding `path` (longest mount-point prefix in mountinfo)."""
    best, fstype = "", "unknown"
    target = str(path.resolve())
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mount_point = fields[4].replace("\\040", " ")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, fstype = mount_point, right.split()[0]
    except OSError:
        pass
    return fstype


@lru_cache(maxsize=64)
def rename_durable_with_file_fsync(directory: str) -> bool:
    """True where fsync of a just-renamed file also persists its name in `directory` (ext4, xfs, btrfs)."""
    return _mount_fstype(Path(directory)) in _RENAME_SAFE_FS


def durable_write(path: Path, data: Buffers, *, fsync_dir_mode: str = "auto") -> int:
    """Write `data` (one buffer or several, written in order) to `path`; durable when this returns.

    Temp name in the same directory (pid and thread in it, so two associations storing the same SOP
    never share one), rename, fsync; the directory is fsynced too unless the file system makes the
    rename durable with the file's fsync (module docstring). Returns the number of bytes written.
    """
    path = Path(path)
    directory = path.parent
    created = _make_dirs(directory)
    tmp = directory / f".{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
    buffers = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    total = sum(len(b) for b in buffers)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        views = [memoryview(b) for b in buffers if len(b)]
        while views:
            written = os.writev(fd, views)
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
        os.replace(tmp, path)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.close(fd)
    if fsync_dir_mode == "always" or not rename_durable_with_file_fsync(str(directory)):
        fsync_dir(directory)
        for new_dir in created:  # a new series/study directory must be durable in its parent too
            fsync_dir(new_dir.parent)
    return total


def _make_dirs(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (outermost first)."""
    missing: list[Path] = []
    d = directory
    while not d.is_dir():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another association created it meanwhile
            d.mkdir()
    return list(reversed(missing))


# -- the index ---------------------------------------------------------------------------------------
def _index(conn, inst: IncomingInstance, rel: Path, size: int, now: float) -> None:
    """The three rows of one received instance; a late instance re-opens an assessed series."""
    s, r = inst.study, inst.series
    conn.execute(
        """INSERT INTO studies (study_uid, patient_id, patient_name, study_date, accession, description,
                                modalities, received_at, updated_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(study_uid) DO UPDATE SET updated_at = excluded.updated_at,
               modalities = CASE WHEN excluded.modalities IS NULL
                                   OR instr(',' || COALESCE(studies.modalities, '') || ',', ',' || excluded.modalities || ',') > 0
                                 THEN studies.modalities
                                 ELSE COALESCE(studies.modalities || ',', '') || excluded.modalities END""",
        (inst.study_uid, s.get("patient_id"), s.get("patient_name"), s.get("study_date"), s.get("accession"),
         s.get("description"), r.get("modality"), now, now),
    )
    conn.execute(
        """INSERT INTO series (series_uid, study_uid, modality, description, body_part, number,
                               first_received_at, last_received_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(series_uid) DO UPDATE SET last_received_at = excluded.last_received_at,
               state = CASE WHEN series.state IN ('complete', 'not_analysed', 'queued') THEN 'receiving'
                            ELSE series.state END""",
        (inst.series_uid, inst.study_uid, r.get("modality"), r.get("description"), r.get("body_part"),
         r.get("number"), now, now),
    )
    conn.execute(
        """INSERT INTO instances (sop_uid, series_uid, sop_class_uid, transfer_syntax, instance_number,
                                  path, size, calling_ae, received_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (inst.sop_uid, inst.series_uid, inst.sop_class_uid, inst.transfer_syntax, inst.instance_number,
         str(rel), size, inst.calling_ae, now),
    )


@contextlib.contextmanager
def _synchronous(store: Store, durable: bool):
    """Commit with synchronous=NORMAL inside the block when not `durable` (the file already is)."""
    if durable:
        yield
        return
    conn = store.connect()
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        yield
    finally:
        conn.execute("PRAGMA synchronous=FULL")


# Two associations storing the same SOP at once must not both rename onto its path: the one whose row
# commits could point at the other's (not yet fsynced) bytes. Striped locks bound the memory.
_SOP_LOCKS = [threading.Lock() for _ in range(64)]


def _sop_lock(sop_uid: str) -> threading.Lock:
    return _SOP_LOCKS[hash(sop_uid) % len(_SOP_LOCKS)]


def store_instance(store: Store, inst: IncomingInstance, data: Buffers, *, durable_index: bool = True,
                   fsync_dir_mode: str = "auto") -> tuple[Path, bool]:
    """Write the file durably, then index it in one transaction. Returns (absolute path, was_duplicate).

    The same SOP Instance UID twice is idempotent: the first copy is kept and success is returned,
    since a scanner that resends after a lost response must not see a failure. `durable_index=False`
    commits the row without its own fsync (module docstring): the file is the durable record.
    """
    rel = instance_path(inst)
    with _sop_lock(inst.sop_uid):
        existing = store.query_one("SELECT path FROM instances WHERE sop_uid = ?", (inst.sop_uid,))
        if existing is not None:
            return store.data_dir / existing["path"], True
        size = durable_write(store.data_dir / rel, data, fsync_dir_mode=fsync_dir_mode)
        now = time.time()
        with _synchronous(store, durable_index), store.transaction() as conn:
            if conn.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (inst.sop_uid,)).fetchone():
                return store.data_dir / rel, True
            _index(conn, inst, rel, size, now)
    return store.data_dir / rel, False


def reingest_unclaimed(store: Store, unclaimed: Sequence[str],
                       describe: Callable[[Path], IncomingInstance],
                       quarantine_reason: Callable[[Path, Exception], str] | None = None) -> dict[str, int]:
    """Index files that are on disk but have no row (Store.recover()'s "unclaimed_files").

    `describe(path)` parses a file into an IncomingInstance or raises ValueError with a reason; such
    files (a write cut short by a crash, never acknowledged) are moved to the quarantine, never deleted.
    A file whose UIDs now map to another path (renamed layout) is indexed where it lies.
    """
    counts = {"indexed": 0, "duplicates": 0, "quarantined": 0}
    for rel_text in unclaimed:
        path = store.data_dir / rel_text
        try:
            inst = describe(path)
        except (ValueError, OSError) as exc:
            reason = (quarantine_reason(path, exc) if quarantine_reason else
                      f"found unindexed after a restart and unreadable ({exc})")
            with contextlib.suppress(OSError):
                quarantine_file(store, path, reason)
                counts["quarantined"] += 1
            continue
        size = path.stat().st_size
        received = path.stat().st_mtime
        with store.transaction() as conn:
            if conn.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (inst.sop_uid,)).fetchone():
                counts["duplicates"] += 1
                continue
            _index(conn, inst, Path(rel_text), size, received)
            counts["indexed"] += 1
    if any(counts.values()):
        log.warning("re-ingested unclaimed files", **counts)
    return counts


# -- start-up recovery that does not walk a million files ---------------------------------------------
def recover_instances(store: Store, describe: Callable[[Path], IncomingInstance],
                      quarantine_reason: Callable[[Path, Exception], str] | None = None, *,
                      modified_since: float | None = None, stop: Callable[[], bool] | None = None
                      ) -> dict[str, int | list[str]]:
    """Store.recover + reingest_unclaimed for the instance files, limited to series directories changed
    since `modified_since` (None: all of them). The DICOM service passes the moment up to which its
    heartbeat says the index was durable, so a restart re-checks only what was written since."""
    totals: dict[str, int | list[str]] = {"directories": 0, "removed_temp_files": 0, "indexed": 0, "duplicates": 0,
                                          "quarantined": 0, "missing_files": []}
    missing: list[str] = []
    for directory in series_dirs(store.files_dir, modified_since=modified_since, stop=stop):
        report = reconcile_dir(store, directory)
        totals["directories"] = int(totals["directories"]) + 1
        totals["removed_temp_files"] = int(totals["removed_temp_files"]) + len(report["removed_temp_files"])
        missing += report["missing_files"]
        if report["unclaimed_files"]:
            for key, n in reingest_unclaimed(store, report["unclaimed_files"], describe, quarantine_reason).items():
                totals[key] = int(totals[key]) + n
    totals["missing_files"] = missing
    return totals


def series_files(store: Store, series_uid: str) -> list[Path]:
    rows = store.query("SELECT path FROM instances WHERE series_uid = ? ORDER BY instance_number, sop_uid",
                       (series_uid,))
    return [store.data_dir / row["path"] for row in rows]


def job_files(store: Store, job: dict) -> list[Path]:
    """The files a job analyses: its series, or for a mammography job every MG series of its study.

    A 4-view exam may arrive as four series; the assembly queues ONE mammo job per study (anchored on
    the study's first MG series) and marks the others queued with the same pipeline.
    """
    if job.get("pipeline") != "mammo":
        return series_files(store, job["series_uid"])
    rows = store.query(
        """SELECT i.path FROM instances i JOIN series s ON s.series_uid = i.series_uid
           WHERE s.study_uid = ? AND s.pipeline = 'mammo'
           ORDER BY s.number, s.series_uid, i.instance_number, i.sop_uid""", (job["study_uid"],))
    return [store.data_dir / row["path"] for row in rows] or series_files(store, job["series_uid"])


def set_series_state(store: Store, series_uid: str, state: str, *, reason: str | None = None,
                     pipeline: str | None = None, only_if: Sequence[str] = ()) -> bool:
    """Move a series to `state` with the reason staff will read; False if `only_if` did not hold."""
    if state not in SERIES_STATES:
        raise ValueError(f"series state {state!r}: use one of {', '.join(SERIES_STATES)}")
    sql = "UPDATE series SET state = ?, reason = ?, pipeline = ? WHERE series_uid = ?"
    params: list = [state, reason, pipeline, series_uid]
    if only_if:
        sql += f" AND state IN ({', '.join('?' * len(only_if))})"
        params += list(only_if)
    with store.transaction() as conn:
        return conn.execute(sql, params).rowcount == 1


# -- quarantine --------------------------------------------------------------------------------------
def _quarantine_name(store: Store, hint: str | None) -> Path:
    stamp = time.strftime("%Y%m%d")
    unique = f"{time.time_ns()}-{threading.get_ident() % 100000}"
    name = f"{unique}-{_uid_name(hint)}.dcm" if hint else f"{unique}.dcm"
    return Path("quarantine") / stamp / name


def quarantine_record(store: Store, data: Buffers | None, reason: str, *, status: int | None = None,
                      calling_ae: str | None = None, peer: str | None = None, sop_uid: str | None = None,
                      sop_class_uid: str | None = None, study_uid: str | None = None,
                      series_uid: str | None = None) -> tuple[int, Path | None]:
    """Keep a refused instance (its bytes as received) and a row with why, from whom, what we answered."""
    rel: Path | None = None
    if data is not None:
        rel = _quarantine_name(store, sop_uid)
        durable_write(store.data_dir / rel, data)
    with store.transaction() as conn:
        cur = conn.execute(
            """INSERT INTO quarantine (received_at, reason, path, calling_ae, peer, sop_uid, sop_class_uid,
                                       study_uid, series_uid, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (time.time(), reason, str(rel) if rel else None, calling_ae, peer, sop_uid, sop_class_uid, study_uid,
             series_uid, status))
        return int(cur.lastrowid), (store.data_dir / rel if rel else None)


def quarantine_file(store: Store, path: Path, reason: str) -> int:
    """Move a file already under the data directory into the quarantine with a row saying why."""
    rel = _quarantine_name(store, Path(path).stem)
    target = store.data_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    fsync_dir(target.parent)
    with store.transaction() as conn:
        cur = conn.execute("INSERT INTO quarantine (received_at, reason, path) VALUES (?, ?, ?)",
                           (time.time(), reason, str(rel)))
        return int(cur.lastrowid)


def list_quarantine(store: Store, limit: int | None = None) -> list[dict]:
    """Quarantined items, newest first, with their reasons (the `quarantine` command and the UI)."""
    sql = "SELECT * FROM quarantine ORDER BY received_at DESC, id DESC"
    rows = store.query(sql + (" LIMIT ?" if limit else ""), (limit,) if limit else ())
    return [dict(r) for r in rows]
