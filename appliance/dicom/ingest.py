"""Taking one DICOM instance in: the checks, the quarantine and the durable store, for every way one arrives.

C-STORE (appliance.dicom.handlers), a browser upload (the web UI: a study from a USB stick or a CD) and
the re-ingest of a quarantined file all go through `Ingestor.ingest`, so an instance is accepted or
refused by the same rules with the same reasons whichever door it came through. The order is the point:

1. free space first (0xA700 before reading anything: the sender keeps its images and retries later);
2. the few header elements we file by (header.parse_dataset: no pixel decoding);
3. the rules (header.check_instance, assembly.SeriesGuard): a refusal is quarantined with its reason;
4. the data set bytes exactly as received, behind a file meta header, written and fsynced
   (store_instance, durable_index=False: see store/instances.py for why one flush suffices);
5. only then success. A failure to write answers 0xA700 (retry later); nothing raises out of here
   except a bug, which the C-STORE handler turns into 0xC002.

Series are queued for analysis by the assembly once they are complete: after `stable_after_s` of quiet
for network transfers (the DICOM service's background pass), at once for an upload (`queue_series`).
"""

from __future__ import annotations

import errno
import itertools
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgescreen.appliance.config.site import Dicom
from edgescreen.appliance.dicom import sop
from edgescreen.appliance.dicom.assembly import SeriesGuard, complete_stable_series
from edgescreen.appliance.dicom.header import (
    Header,
    Refusal,
    check_instance,
    file_preamble_and_meta,
    parse_dataset,
    split_file_meta,
)
from edgescreen.appliance.dicom.quarantine import Refused, quarantine_instance
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.store import Store
from edgescreen.appliance.store.instances import Buffers, IncomingInstance, store_instance

log = get_logger(__name__)

DISK_FULL_LOG_EVERY_S = 10.0
STATUSES = ("stored", "duplicate", "quarantined", "refused")


@dataclass(frozen=True)
class IngestOutcome:
    """What became of one instance. `status`: stored, duplicate (kept the first copy: success), quarantined
    (refused by a rule, kept under data_dir/quarantine with `reason`) or refused (not kept: disk full, an
    unwritable disk, not a DICOM file; the sender should try again later or fix the file)."""

    status: str
    reason: str | None
    sop_uid: str | None
    study_uid: str | None
    series_uid: str | None
    dimse_status: int = sop.SUCCESS
    quarantine_id: int | None = None
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("stored", "duplicate")

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "sop_uid": self.sop_uid, "study_uid": self.study_uid,
                "series_uid": self.series_uid, "dimse_status": f"0x{self.dimse_status:04X}",
                "quarantine_id": self.quarantine_id}


@dataclass(frozen=True)
class Sender:
    """Who sent an instance and what their request said. `calling_ae` only for network transfers (the
    scheduler reads network arrivals as scanner activity; an upload is not the scanner)."""

    calling_ae: str | None
    peer: str | None
    request_sop_class: str | None
    request_sop_uid: str | None


class Ingestor:
    """The receive rules for one store. Thread-safe: associations ingest concurrently.

    It also knows which writes are in flight, so the DICOM service's heartbeat can say up to when the
    index is durable (`durable_before`): a restart then re-checks only files written since.
    """

    def __init__(self, store: Store, cfg: Dicom, guard: SeriesGuard | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.guard = guard or SeriesGuard(store)
        self.min_free_bytes = int(cfg.min_free_mb * 1024 * 1024)
        self._lock = threading.Lock()
        self._inflight: dict[int, float] = {}
        self._tokens = itertools.count()
        self._disk_full_logged = 0.0

    def durable_before(self) -> float:
        """Every instance whose write started before this moment is indexed and durable once the next
        synchronous commit (the heartbeat's) returns; a write still in flight holds the moment back."""
        with self._lock:
            return min(self._inflight.values(), default=time.time())

    def _free_bytes(self) -> int:
        st = os.statvfs(self.store.data_dir)
        return st.f_bavail * st.f_frsize

    def _disk_full(self, sender: Sender, free: int, need: int, sop_uid: str | None, error: str | None = None
                   ) -> IngestOutcome:
        reason = (f"data disk full: {free / 1e6:.0f} MB free under {self.store.data_dir}, {need / 1e6:.0f} MB "
                  f"needed (dicom.min_free_mb = {self.cfg.min_free_mb:g} plus the instance)")
        now = time.monotonic()
        with self._lock:
            due = now - self._disk_full_logged >= DISK_FULL_LOG_EVERY_S
            if due:
                self._disk_full_logged = now
        if due:
            log.error(f"{reason}; refusing with 0xA700 so the sender keeps its images and resends later. To fix: "
                      "free space on that disk (`edgescreen purge --dry-run` shows what retention may delete; empty "
                      "data_dir/quarantine) or move data_dir to a larger disk", calling_ae=sender.calling_ae,
                      peer=sender.peer, sop=sop_uid, error=error)
        return IngestOutcome("refused", reason, sop_uid, None, None, sop.OUT_OF_RESOURCES)

    def ingest(self, raw: bytes | memoryview, transfer_syntax: str, sender: Sender, *,
               quarantine: bool = True) -> IngestOutcome:
        """Check, quarantine or store one data set (no file meta) exactly as received (module docstring).

        `quarantine=False` (re-ingesting a file that is already in the quarantine) reports a refusal
        without keeping a second copy.
        """
        need = len(raw) + 4096 + self.min_free_bytes
        free = self._free_bytes()
        if free < need:
            return self._disk_full(sender, free, need, sender.request_sop_uid)

        header: Header | None = None
        try:
            header = parse_dataset(raw, transfer_syntax)
            check_instance(header, request_sop_class=sender.request_sop_class,
                           request_sop_uid=sender.request_sop_uid, transfer_syntax=transfer_syntax)
            self.guard.check(header)
        except Refusal as refusal:
            qid = None
            if quarantine:
                who = Refused(sender.calling_ae, sender.peer, sender.request_sop_class, sender.request_sop_uid,
                              transfer_syntax)
                qid = quarantine_instance(self.store, raw, who, refusal.status, refusal.reason, header)
            return IngestOutcome("quarantined", refusal.reason, header.sop_uid if header else sender.request_sop_uid,
                                 header.study_uid if header else None, header.series_uid if header else None,
                                 refusal.status, qid)

        # check_instance refused any instance without these: the type checker is told, nothing is assumed
        sop_uid, sop_class, study_uid, series_uid = (str(header.sop_uid), str(header.sop_class_uid),
                                                     str(header.study_uid), str(header.series_uid))
        inst = IncomingInstance(sop_uid, sop_class, study_uid, series_uid, transfer_syntax=transfer_syntax,
                                instance_number=header.instance_number, calling_ae=sender.calling_ae,
                                study=header.study_fields(), series=header.series_fields())
        meta = file_preamble_and_meta(sop_class, sop_uid, transfer_syntax, sender.calling_ae or "")
        token = next(self._tokens)
        with self._lock:
            self._inflight[token] = time.time()
        try:
            _, duplicate = store_instance(self.store, inst, [meta, raw], durable_index=False,
                                          fsync_dir_mode=self.cfg.fsync_dir)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return self._disk_full(sender, self._free_bytes(), need, sop_uid, str(exc))
            log.error("cannot write a received instance; answered 0xA700 (the sender may retry). Check the "
                      "data disk (read-only? failing?)", calling_ae=sender.calling_ae, peer=sender.peer, sop=sop_uid,
                      error=str(exc))
            return IngestOutcome("refused", f"cannot write the instance ({exc})", sop_uid, study_uid, series_uid,
                                 sop.OUT_OF_RESOURCES)
        except sqlite3.OperationalError as exc:  # database locked past busy_timeout, or full
            log.error("cannot index a received instance; answered 0xA700 (the sender may retry)",
                      calling_ae=sender.calling_ae, peer=sender.peer, sop=sop_uid, error=str(exc))
            return IngestOutcome("refused", f"cannot index the instance ({exc})", sop_uid, study_uid, series_uid,
                                 sop.OUT_OF_RESOURCES)
        finally:
            with self._lock:
                self._inflight.pop(token, None)
        if duplicate:
            log.info("duplicate instance: kept the first copy, answered success", calling_ae=sender.calling_ae,
                     peer=sender.peer, study=study_uid, series=series_uid, sop=sop_uid)
            return IngestOutcome("duplicate", None, sop_uid, study_uid, series_uid)
        log.debug("instance stored", calling_ae=sender.calling_ae, peer=sender.peer, study=study_uid,
                  series=series_uid, sop=sop_uid)
        return IngestOutcome("stored", None, sop_uid, study_uid, series_uid, bytes=len(raw))


def ingest_bytes(ingestor: Ingestor, data: Buffers, *, source: str, quarantine: bool = True) -> IngestOutcome:
    """One Part 10 file held in memory (an upload's member): its file meta plays the C-STORE request."""
    blob = data if isinstance(data, bytes | bytearray | memoryview) else b"".join(data)
    try:
        meta, raw = split_file_meta(blob)
    except ValueError as exc:
        # no data set we could name or keep as DICOM: refused, not quarantined (a README in a zip is not an image)
        return IngestOutcome("refused", f"not a DICOM file ({exc})", None, None, None, sop.CANNOT_UNDERSTAND)
    return ingestor.ingest(raw, meta.transfer_syntax, Sender(None, source, meta.sop_class_uid, meta.sop_uid),
                           quarantine=quarantine)


def ingest_file(store: Store, dicom_cfg: Dicom, path: Path | str, *, source: str, quarantine: bool = True,
                ingestor: Ingestor | None = None) -> IngestOutcome:
    """Ingest one Part 10 file by the C-STORE rules (module docstring). `source` names where it came from
    ("upload:alice", "reingest:admin"): kept as the quarantine row's peer and in the log.

    Pass one `ingestor` for a batch (an upload of a whole series) so its series checks are remembered.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return IngestOutcome("refused", f"cannot read {Path(path).name} ({exc.strerror})", None, None, None,
                             sop.CANNOT_UNDERSTAND)
    return ingest_bytes(ingestor or Ingestor(store, dicom_cfg), data, source=source, quarantine=quarantine)


def queue_series(store: Store, series_uids: list[str] | set[str]) -> list[dict]:
    """Assess uploaded series now (an upload is complete when it ends; no stable period to wait for) and
    queue those a pipeline reads. Returns the assembly's decisions."""
    return complete_stable_series(store, 0.0, series_uids=set(series_uids))


def reingest_quarantined(store: Store, dicom_cfg: Dicom, quarantine_id: int, actor: str) -> IngestOutcome:
    """Try a quarantined instance again (after the rule or the series it conflicted with changed).

    Accepted: the quarantine row and file are removed. Refused again: both stay, and the outcome says why.
    Audited either way with `actor`.
    """
    row = store.query_one("SELECT * FROM quarantine WHERE id = ?", (quarantine_id,))
    if row is None:
        return IngestOutcome("refused", f"no quarantine entry #{quarantine_id}", None, None, None,
                             sop.NO_SUCH_OBJECT_INSTANCE)
    if not row["path"]:
        return IngestOutcome("refused", f"quarantine entry #{quarantine_id} kept no file (it was refused before "
                             "its bytes could be saved)", row["sop_uid"], row["study_uid"], row["series_uid"],
                             sop.NO_SUCH_OBJECT_INSTANCE)
    path = store.data_dir / row["path"]
    outcome = ingest_file(store, dicom_cfg, path, source=f"reingest:{actor}", quarantine=False)
    if outcome.ok:
        with store.transaction() as conn:
            conn.execute("DELETE FROM quarantine WHERE id = ?", (quarantine_id,))
            store.audit(actor, "quarantine.reingest", str(quarantine_id),
                        f"{outcome.status}: sop {outcome.sop_uid}", conn=conn)
        path.unlink(missing_ok=True)  # its series is assessed again once quiet, like any arrival
    else:
        store.audit(actor, "quarantine.reingest", str(quarantine_id), f"refused again: {outcome.reason}")
    return outcome
