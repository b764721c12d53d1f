"""Event handlers of the DICOM service: who may associate, C-ECHO, C-STORE, and per-association records.

The C-STORE handler is the receive path. Its order is the point:
1. free space first (0xA700 before reading anything: the scanner keeps its images and retries later);
2. the few header elements we file by (header.parse_dataset: no pixel decoding);
3. the rules (header.check_instance, assembly.SeriesGuard) - a refusal is quarantined with its reason;
4. the data set bytes exactly as received, behind a file meta header, written and fsynced
   (store_instance, durable_index=False: see store/instances.py for why one flush suffices);
5. only then the success status. Any unexpected error answers 0xC002 and the service goes on.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from appliance.config.site import Dicom
from appliance.dicom import sop
from appliance.dicom.assembly import SeriesGuard
from appliance.dicom.header import Header, Refusal, check_instance, file_preamble_and_meta, parse_dataset
from appliance.dicom.quarantine import Refused, quarantine_instance
from appliance.logs import get_logger
from appliance.store import Store
from appliance.store.instances import IncomingInstance, store_instance

log = get_logger(__name__)

DISK_FULL_LOG_EVERY_S = 10.0
REJECT_SEND_WAIT_S = 2.0


@dataclass
class AssocStats:
    """What one association did, for its summary log line and the "dicom" event the dashboard shows."""

    calling_ae: str
    peer: str
    started: float = field(default_factory=time.time)
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    out_of_space: int = 0
    errors: int = 0
    bytes: int = 0
    studies: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)

    def as_detail(self, outcome: str) -> dict[str, Any]:
        return {"calling_ae": self.calling_ae, "peer": self.peer, "outcome": outcome, "stored": self.stored,
                "duplicates": self.duplicates, "refused": self.refused, "out_of_space": self.out_of_space,
                "errors": self.errors, "bytes": self.bytes, "seconds": round(time.time() - self.started, 3),
                "studies": sorted(self.studies)[:20], "series": len(self.series)}


class AccessPolicy:
    """The calling AE titles (optionally pinned to an IP) that may associate; --allow-any-ae lets all in."""

    def __init__(self, cfg: Dicom) -> None:
        self.allow_any = cfg.allow_any_ae
        self.allowed = [(p.ae_title, p.host) for p in cfg.allowed]

    def allows(self, calling_ae: str, address: str) -> bool:
        if self.allow_any:
            return True
        return any(ae == calling_ae and (host is None or host == address) for ae, host in self.allowed)


class StoreService:
    """Holds the store, the rules and per-association stats; its bound methods are the event handlers."""

    def __init__(self, store: Store, cfg: Dicom) -> None:
        self.store = store
        self.cfg = cfg
        self.policy = AccessPolicy(cfg)
        self.guard = SeriesGuard(store)
        self.min_free_bytes = int(cfg.min_free_mb * 1024 * 1024)
        self._stats: dict[int, AssocStats] = {}
        self._lock = threading.Lock()
        self._disk_full_logged = 0.0
        self.totals = {"stored": 0, "refused": 0, "associations": 0, "rejected": 0}

    # -- association -------------------------------------------------------------------------------
    def on_requested(self, event: Any) -> None:
        """EVT_REQUESTED: refuse calling AEs that are not allow-listed (A-ASSOCIATE-RJ, PS3.8 9.3.4)."""
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        if self.policy.allows(calling, address):
            return
        log.warning("association rejected: calling AE not allowed; add it to [[dicom.allowed]] in the site "
                    "config (ae_title, and host to pin its IP) if it is a scanner of this clinic",
                    calling_ae=calling, peer=address)
        self.totals["rejected"] += 1
        self._event("association", "rejected", {"calling_ae": calling, "peer": address,
                                                "reason": "calling AE title not recognised"})
        assoc.acse.send_reject(sop.REJECTED_PERMANENT, sop.SOURCE_SERVICE_USER, sop.REASON_CALLING_AE_NOT_RECOGNISED)
        # pynetdicom closes the socket as soon as this handler returns; wait until the DUL thread has
        # actually sent the A-ASSOCIATE-RJ (state Sta13), or the peer only sees a dropped connection
        deadline = time.monotonic() + REJECT_SEND_WAIT_S
        while assoc.dul.state_machine.current_state != "Sta13" and time.monotonic() < deadline:
            time.sleep(0.001)

    def on_accepted(self, event: Any) -> None:
        assoc = event.assoc
        stats = AssocStats(str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address))
        with self._lock:
            self._stats[id(assoc)] = stats
            self.totals["associations"] += 1
        log.info("association accepted", calling_ae=stats.calling_ae, peer=stats.peer,
                 max_pdu=assoc.requestor.maximum_length)

    def on_released(self, event: Any) -> None:
        self._finish(event.assoc, "released")

    def on_aborted(self, event: Any) -> None:
        self._finish(event.assoc, "aborted")

    def on_closed(self, event: Any) -> None:
        """EVT_CONN_CLOSE: the last word on an association whose peer vanished without release or abort."""
        self._finish(event.assoc, "closed")

    def _finish(self, assoc: Any, outcome: str) -> None:
        with self._lock:
            stats = self._stats.pop(id(assoc), None)
        if stats is None:
            return
        detail = stats.as_detail(outcome)
        mb_s = stats.bytes / 1e6 / max(detail["seconds"], 1e-6)
        log.info(f"association {outcome}", calling_ae=stats.calling_ae, peer=stats.peer, stored=stats.stored,
                 duplicates=stats.duplicates, refused=stats.refused, out_of_space=stats.out_of_space,
                 errors=stats.errors, seconds=detail["seconds"], mb_per_s=round(mb_s, 1))
        if stats.stored or stats.duplicates or stats.refused or stats.out_of_space or stats.errors:
            self._event("c-store", outcome, detail)

    def _event(self, source: str, state: str, detail: dict[str, Any]) -> None:
        """kind "dicom": C-STORE activity per calling AE and rejected associations, for the timeline."""
        try:
            self.store.add_event("dicom", source, state, json.dumps(detail))
        except sqlite3.Error as exc:
            log.warning("could not record a dicom event", error=str(exc))

    def _stats_for(self, assoc: Any) -> AssocStats:
        with self._lock:
            stats = self._stats.get(id(assoc))
            if stats is None:  # accepted before our handler was bound; never None in practice
                stats = self._stats[id(assoc)] = AssocStats(str(assoc.requestor.ae_title).strip(),
                                                            str(assoc.requestor.address))
            return stats

    # -- services -----------------------------------------------------------------------------------
    def on_echo(self, event: Any) -> int:
        return sop.SUCCESS

    def on_store(self, event: Any) -> int:
        """EVT_C_STORE: the receive path (module docstring). Never raises."""
        stats = self._stats_for(event.assoc)
        try:
            return self._store(event, stats)
        except Exception:
            stats.errors += 1
            log.exception("C-STORE failed unexpectedly; answered 0xC002", calling_ae=stats.calling_ae,
                          peer=stats.peer, sop=str(getattr(event.request, "AffectedSOPInstanceUID", "")))
            return sop.CANNOT_UNDERSTAND_PROCESSING

    def _free_bytes(self) -> int:
        st = os.statvfs(self.store.data_dir)
        return st.f_bavail * st.f_frsize

    def _disk_full(self, stats: AssocStats, free: int, need: int, sop_uid: str, error: str | None = None) -> int:
        stats.out_of_space += 1
        now = time.monotonic()
        if now - self._disk_full_logged >= DISK_FULL_LOG_EVERY_S:
            self._disk_full_logged = now
            log.error(f"data disk full: {free / 1e6:.0f} MB free under {self.store.data_dir}, "
                      f"{need / 1e6:.0f} MB needed (dicom.min_free_mb = {self.cfg.min_free_mb:g} plus the instance); "
                      "refusing C-STORE with 0xA700 so the scanner keeps its images and resends later. To fix: "
                      "free space on that disk (export and delete old studies, empty data_dir/quarantine) or "
                      "move data_dir to a larger disk", calling_ae=stats.calling_ae, peer=stats.peer,
                      sop=sop_uid, error=error)
        return sop.OUT_OF_RESOURCES

    def _store(self, event: Any, stats: AssocStats) -> int:
        req = event.request
        ts = str(event.context.transfer_syntax)
        raw = req.DataSet.getbuffer()  # a view of pynetdicom's buffer: a large instance is never copied
        rq_class = str(req.AffectedSOPClassUID or "") or None
        rq_uid = str(req.AffectedSOPInstanceUID or "") or None
        need = len(raw) + 4096 + self.min_free_bytes
        free = self._free_bytes()
        if free < need:
            return self._disk_full(stats, free, need, rq_uid or "")

        header: Header | None = None
        try:
            header = parse_dataset(raw, ts)
            check_instance(header, request_sop_class=rq_class, request_sop_uid=rq_uid, transfer_syntax=ts)
            self.guard.check(header)
        except Refusal as refusal:
            stats.refused += 1
            self.totals["refused"] += 1
            who = Refused(stats.calling_ae, stats.peer, rq_class, rq_uid, ts)
            quarantine_instance(self.store, raw, who, refusal.status, refusal.reason, header)
            return refusal.status

        assert header.sop_uid and header.sop_class_uid and header.study_uid and header.series_uid
        inst = IncomingInstance(header.sop_uid, header.sop_class_uid, header.study_uid, header.series_uid,
                                transfer_syntax=ts, instance_number=header.instance_number,
                                calling_ae=stats.calling_ae, study=header.study_fields(),
                                series=header.series_fields())
        meta = file_preamble_and_meta(header.sop_class_uid, header.sop_uid, ts, stats.calling_ae)
        try:
            _, duplicate = store_instance(self.store, inst, [meta, raw], durable_index=False,
                                          fsync_dir_mode=self.cfg.fsync_dir)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return self._disk_full(stats, self._free_bytes(), need, header.sop_uid, str(exc))
            stats.errors += 1
            log.error("cannot write a received instance; answered 0xA700 (the sender may retry). Check the "
                      "data disk (read-only? failing?)", calling_ae=stats.calling_ae, sop=header.sop_uid,
                      error=str(exc))
            return sop.OUT_OF_RESOURCES
        except sqlite3.OperationalError as exc:  # database locked past busy_timeout, or full
            stats.errors += 1
            log.error("cannot index a received instance; answered 0xA700 (the sender may retry)",
                      calling_ae=stats.calling_ae, sop=header.sop_uid, error=str(exc))
            return sop.OUT_OF_RESOURCES
        if duplicate:
            stats.duplicates += 1
            log.info("duplicate instance: kept the first copy, answered success", calling_ae=stats.calling_ae,
                     study=header.study_uid, series=header.series_uid, sop=header.sop_uid)
        else:
            stats.stored += 1
            stats.bytes += len(raw)
            self.totals["stored"] += 1
            stats.studies.add(header.study_uid)
            stats.series.add(header.series_uid)
            log.debug("instance stored", calling_ae=stats.calling_ae, study=header.study_uid,
                      series=header.series_uid, sop=header.sop_uid)
        return sop.SUCCESS
