"""The DICOM service: one pynetdicom AE serving C-ECHO, C-STORE and MPPS, plus its background work.

Threads: pynetdicom's server thread accepts connections and runs each association in its own thread
(our fastpath.FastRequestHandler, see there why); one background thread completes stable series
(assembly) and sends due result exports; the caller's thread waits for stop().

Start-up first runs Store.recover() and re-ingests files that are on disk without a row (the index
commit of the last instances before a power cut), so nothing acknowledged is missing from the index.
Stopping (SIGTERM) closes the listening socket, lets running associations finish for a grace period
(every acknowledged instance is already durable, so an abort after that loses nothing), then aborts
the rest and returns.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from appliance.config.site import Dicom, SiteConfig
from appliance.dicom import export, fastpath, sop
from appliance.dicom.assembly import complete_stable_series
from appliance.dicom.handlers import StoreService
from appliance.dicom.header import parse_file
from appliance.dicom.mpps import MPPS_SOP_CLASS, MppsService
from appliance.logs import get_logger
from appliance.store import Store
from appliance.store.instances import IncomingInstance, reingest_unclaimed

log = get_logger(__name__)

EXPORT_EVERY_S = 10.0


def describe_file(path: Path) -> IncomingInstance:
    """A stored file back into an IncomingInstance (re-ingest); ValueError if it is not whole."""
    from appliance.dicom.header import split_file

    h = parse_file(path)
    ts, _ = split_file(path.read_bytes())
    assert h.sop_uid and h.sop_class_uid and h.study_uid and h.series_uid
    return IncomingInstance(h.sop_uid, h.sop_class_uid, h.study_uid, h.series_uid, transfer_syntax=ts,
                            instance_number=h.instance_number, study=h.study_fields(), series=h.series_fields())


def build_ae(cfg: Dicom) -> AE:
    # pynetdicom's default notification handlers only feed its own debug log, yet decode every PDU
    # and DIMSE message to do so; our handlers log what matters, keyed by study/series/sop and AE
    _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_pdu_size = cfg.max_pdu
    ae.maximum_associations = cfg.max_associations
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 120
    for sop_class in sop.STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(sop.TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context(MPPS_SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae


class DicomService:
    """`start()` binds and serves in the background; `stop()` ends it; `run_until(event)` does both."""

    def __init__(self, store: Store, config: SiteConfig, *, stable_after_s: float | None = None) -> None:
        self.store = store
        self.config = config
        self.cfg = config.dicom
        self.stable_after_s = stable_after_s if stable_after_s is not None else self.cfg.stable_after_s
        self.store_service = StoreService(store, self.cfg)
        self.mpps = MppsService(store)
        self.ae = build_ae(self.cfg)
        self.server: ThreadedAssociationServer | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def recover(self) -> dict[str, int]:
        report = self.store.recover()
        counts = reingest_unclaimed(self.store, report["unclaimed_files"], describe_file,
                                    lambda p, e: f"found unindexed after a restart and unreadable ({e}); a write "
                                                 "cut short by a crash is never acknowledged, so the sender resends it")
        if report["missing_files"]:
            log.error("instances whose files are missing; restore them from backup or the scanner",
                      count=len(report["missing_files"]), example=report["missing_files"][0])
        return counts

    def start(self) -> tuple[str, int]:
        self.recover()
        s = self.store_service
        handlers = [
            (evt.EVT_REQUESTED, s.on_requested), (evt.EVT_ACCEPTED, s.on_accepted),
            (evt.EVT_RELEASED, s.on_released), (evt.EVT_ABORTED, s.on_aborted), (evt.EVT_CONN_CLOSE, s.on_closed),
            (evt.EVT_C_ECHO, s.on_echo), (evt.EVT_C_STORE, s.on_store),
            (evt.EVT_N_CREATE, self.mpps.on_n_create), (evt.EVT_N_SET, self.mpps.on_n_set),
        ]
        fast = fastpath.available()
        if not fast:
            log.warning("fast receive path disabled: pynetdicom version not validated; receiving is slower",
                        pynetdicom=__import__("pynetdicom").__version__, validated=",".join(fastpath.VALIDATED))
        self.server = ThreadedAssociationServer(
            self.ae, (self.cfg.bind, self.cfg.port), self.cfg.ae_title, self.ae.supported_contexts,
            evt_handlers=handlers, request_handler=fastpath.FastRequestHandler if fast else RequestHandler)
        self.ae._servers.append(self.server)
        self._spawn(self.server.serve_forever, "dicom-accept")
        self._spawn(self._background, "dicom-background")
        host, port = self.address
        allowed = "any calling AE" if self.cfg.allow_any_ae else (
            ", ".join(f"{p.ae_title}@{p.host or '*'}" for p in self.cfg.allowed) or "no calling AE (none allow-listed)")
        log.info("DICOM service listening", ae_title=self.cfg.ae_title, bind=host, port=port, accepts=allowed,
                 stable_after_s=self.stable_after_s, pacs=self.cfg.pacs.ae_title if self.cfg.pacs else None)
        return host, port

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _background(self) -> None:
        """Series completion about four times per stable period (at most every second); exports every 10 s."""
        tick = min(1.0, max(0.1, self.stable_after_s / 4))
        next_export = 0.0
        while not self._stop.wait(tick):
            try:
                complete_stable_series(self.store, self.stable_after_s)
            except Exception:
                log.exception("series assembly pass failed; will try again")
            if self.cfg.pacs is not None and time.monotonic() >= next_export:
                next_export = time.monotonic() + EXPORT_EVERY_S
                try:
                    export.export_pending(self.store, self.config)
                except Exception:
                    log.exception("result export pass failed; will try again")

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let running associations finish for `grace_s`, abort the rest."""
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()  # closes the listening socket; running associations go on
        deadline = time.monotonic() + grace_s
        # only established associations can be transferring; a bare TCP connection (a port probe) or one
        # still negotiating is simply aborted
        while time.monotonic() < deadline and any(a.is_established for a in self.ae.active_associations):
            time.sleep(0.05)
        remaining = self.ae.active_associations
        if any(a.is_established for a in remaining):
            log.warning("aborting associations still running at shutdown",
                        count=sum(a.is_established for a in remaining))
        for assoc in remaining:
            assoc.abort()
        for t in self._threads:
            t.join(timeout=5)
        t = self.store_service.totals
        log.info("DICOM service stopped", stored=t["stored"], refused=t["refused"], associations=t["associations"],
                 rejected=t["rejected"])
        self.store.close()

    def run_until(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()
