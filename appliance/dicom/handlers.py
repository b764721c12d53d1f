"""Event handlers of the DICOM service: who may associate, C-ECHO, C-STORE, and per-association records.

The C-STORE handler hands the data set to appliance.dicom.ingest (the same checks, quarantine and store
as a browser upload) and answers with the DIMSE status it gives; any unexpected error answers 0xC002
and the service goes on. Counters shared between association threads change only under the lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgescreen.appliance.config.site import Dicom
from edgescreen.appliance.dicom import sop
from edgescreen.appliance.dicom.ingest import Ingestor, IngestOutcome, Sender
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.store import Store

log = get_logger(__name__)

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
    """Holds the store, the receive rules and per-association stats; its bound methods are the event handlers."""

    def __init__(self, store: Store, cfg: Dicom) -> None:
        self.store = store
        self.cfg = cfg
        self.policy = AccessPolicy(cfg)
        self.ingestor = Ingestor(store, cfg)
        self._stats: dict[int, AssocStats] = {}
        self._lock = threading.Lock()
        self._totals = {"stored": 0, "refused": 0, "associations": 0, "rejected": 0}

    @property
    def totals(self) -> dict[str, int]:
        """A consistent copy of the service-wide counters."""
        with self._lock:
            return dict(self._totals)

    def _count(self, key: str) -> None:
        with self._lock:
            self._totals[key] += 1

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
        self._count("rejected")
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
            self._totals["associations"] += 1
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
        """EVT_C_STORE: the receive path (appliance.dicom.ingest). Never raises."""
        stats = self._stats_for(event.assoc)
        try:
            req = event.request
            sender = Sender(stats.calling_ae, stats.peer, str(req.AffectedSOPClassUID or "") or None,
                            str(req.AffectedSOPInstanceUID or "") or None)
            # a view of pynetdicom's buffer: a large instance is never copied
            outcome = self.ingestor.ingest(req.DataSet.getbuffer(), str(event.context.transfer_syntax), sender)
        except Exception:
            with self._lock:
                stats.errors += 1
            log.exception("C-STORE failed unexpectedly; answered 0xC002", calling_ae=stats.calling_ae,
                          peer=stats.peer, sop=str(getattr(event.request, "AffectedSOPInstanceUID", "")))
            return sop.CANNOT_UNDERSTAND_PROCESSING
        self._tally(stats, outcome)
        return outcome.dimse_status

    def _tally(self, stats: AssocStats, outcome: IngestOutcome) -> None:
        with self._lock:
            if outcome.status == "stored":
                stats.stored += 1
                stats.bytes += outcome.bytes
                self._totals["stored"] += 1
                if outcome.study_uid:
                    stats.studies.add(outcome.study_uid)
                if outcome.series_uid:
                    stats.series.add(outcome.series_uid)
            elif outcome.status == "duplicate":
                stats.duplicates += 1
            elif outcome.status == "quarantined":
                stats.refused += 1
                self._totals["refused"] += 1
            elif outcome.dimse_status == sop.OUT_OF_RESOURCES and (outcome.reason or "").startswith("data disk full"):
                stats.out_of_space += 1
            else:
                stats.errors += 1
