"""The DICOM service: one pynetdicom AE serving C-ECHO, C-STORE and MPPS, plus its background work.

Threads: pynetdicom's server thread accepts connections and runs each association in its own thread
(our fastpath.FastRequestHandler, see there why); one background thread completes stable series
(assembly) and sends due result exports; the caller's thread waits for stop().

Start-up re-ingests files that are on disk without a row (the index commit of the last instances
before a power cut), so nothing acknowledged is missing from the index. A thread does it while the
service already listens: it looks only at series directories changed since the last heartbeat said the
index was durable (store.heartbeat), or at every one without such a heartbeat (a first start, an
upgrade). Series assembly waits for it; a resent instance received meanwhile is simply stored again
under the same name, so nothing is lost either way.

A heartbeat thread writes the "dicom" heartbeat row every few seconds: the scheduler treats MPPS and
C-STORE activity as unknown (the fail-safe) when it stops.

Stopping (SIGTERM) closes the listening socket, lets running associations finish for a grace period
(every acknowledged instance is already durable, so an abort after that loses nothing), then aborts
the rest, writes the last heartbeat (stopped) and returns.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from edgescreen.appliance.config.site import Dicom, SiteConfig
from edgescreen.appliance.dicom import export, fastpath, sop
from edgescreen.appliance.dicom.assembly import complete_stable_series
from edgescreen.appliance.dicom.handlers import StoreService
from edgescreen.appliance.dicom.header import parse_file
from edgescreen.appliance.dicom.mpps import MPPS_SOP_CLASS, MppsService
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.store import Store, heartbeat
from edgescreen.appliance.store.db import RECOVERY_MARGIN_S
from edgescreen.appliance.store.instances import IncomingInstance, recover_instances

log = get_logger(__name__)

EXPORT_EVERY_S = 10.0
SERVICE = "dicom"  # the heartbeat row (appliance.scheduler.scanner.DICOM_SERVICE reads it)


def describe_file(path: Path) -> IncomingInstance:
    """A stored file back into an IncomingInstance (re-ingest); ValueError if it is not whole."""
    from edgescreen.appliance.dicom.header import FileMeta, split_file_meta

    data = path.read_bytes()
    meta: FileMeta = split_file_meta(data)[0]
    h = parse_file(path)  # check_instance inside refuses a file without its four UIDs
    if not (h.sop_uid and h.sop_class_uid and h.study_uid and h.series_uid):
        raise ValueError("a UID is missing")
    return IncomingInstance(h.sop_uid, h.sop_class_uid, h.study_uid, h.series_uid, transfer_syntax=meta.transfer_syntax,
                            instance_number=h.instance_number, study=h.study_fields(), series=h.series_fields())


def _unreadable(path: Path, exc: Exception) -> str:
    return (f"found unindexed after a restart and unreadable ({exc}); a write cut short by a crash is never "
            "acknowledged, so the sender resends it")


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
        self.started_at = time.time()
        self._recovered = threading.Event()  # set once every file written before this start is indexed

    @property
    def address(self) -> tuple[str, int]:
        if self.server is None:
            raise RuntimeError("the DICOM service is not started")
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def recover(self, modified_since: float | None = None) -> dict:
        """Index files on disk that have no row (module docstring); report rows whose files are gone."""
        t0 = time.monotonic()
        counts = recover_instances(self.store, describe_file, _unreadable, modified_since=modified_since,
                                   stop=self._stop.is_set)
        missing = counts.pop("missing_files")
        if missing:
            log.error("instances whose files are missing; restore them from backup or the scanner",
                      count=len(missing), example=missing[0])
        done = "interrupted by stop" if self._stop.is_set() else "done"
        log.info(f"start-up recovery {done}", scope="all series" if modified_since is None else "changed series",
                 seconds=round(time.monotonic() - t0, 3), **counts)
        return counts

    def _recovery(self, since: float | None) -> None:
        """Runs in its own thread while the service already listens (the start stays quick however large the
        store, and cold directory caches after a power cut cost seconds there). Series assembly and the
        heartbeat's durable_before wait for it; a resent instance meanwhile is simply stored again."""
        try:
            self.recover(None if since is None else since - RECOVERY_MARGIN_S)
        except Exception:
            log.exception("start-up recovery failed; it runs again at the next start")
            return
        if not self._stop.is_set():
            self._recovered.set()

    def _heartbeat(self) -> None:
        """The "dicom" heartbeat row, with up to when the index is durable: every BEAT_EVERY_S, or four
        times per `scheduler.dicom_stale_s` where that is shorter, so a live service never reads as stale."""
        every = min(heartbeat.BEAT_EVERY_S, self.config.scheduler.dicom_stale_s / 4)
        while True:
            try:
                durable = self.store_service.ingestor.durable_before() if self._recovered.is_set() else None
                heartbeat.beat(self.store, SERVICE, started_at=self.started_at, durable_before=durable,
                               detail=self.store_service.totals)
            except Exception as exc:  # a locked or full database: the scheduler sees a late beat, fails safe
                log.warning("heartbeat not recorded", error=str(exc))
            if self._stop.wait(every):
                return

    def start(self) -> tuple[str, int]:
        self.started_at = time.time()
        last = heartbeat.read(self.store, SERVICE)
        since = last["durable_before"] if last and last["durable_before"] is not None else None
        s = self.store_service
        handlers = [
            (evt.EVT_REQUESTED, s.on_requested), (evt.EVT_ACCEPTED, s.on_accepted),
            (evt.EVT_RELEASED, s.on_released), (evt.EVT_ABORTED, s.on_aborted), (evt.EVT_CONN_CLOSE, s.on_closed),
            (evt.EVT_C_ECHO, s.on_echo), (evt.EVT_C_STORE, s.on_store),
            (evt.EVT_N_CREATE, self.mpps.on_n_create), (evt.EVT_N_SET, self.mpps.on_n_set),
        ]
        fast = self.cfg.receive_path == "fast" and fastpath.available()
        if self.cfg.receive_path == "fast" and not fast:
            log.warning("fast receive path disabled: this pynetdicom release is not one it was validated against; "
                        "receiving uses the stock path (same answers, slower)",
                        pynetdicom=__import__("pynetdicom").__version__, validated=",".join(fastpath.VALIDATED))
        self.server = ThreadedAssociationServer(
            self.ae, (self.cfg.bind, self.cfg.port), self.cfg.ae_title, self.ae.supported_contexts,
            evt_handlers=handlers, request_handler=fastpath.FastRequestHandler if fast else RequestHandler)
        self.ae._servers.append(self.server)
        self._spawn(self.server.serve_forever, "dicom-accept")
        self._spawn(self._background, "dicom-background")
        self._spawn(self._heartbeat, "dicom-heartbeat")
        self._spawn(lambda: self._recovery(since), "dicom-recovery")
        host, port = self.address
        allowed = "any calling AE" if self.cfg.allow_any_ae else (
            ", ".join(f"{p.ae_title}@{p.host or '*'}" for p in self.cfg.allowed) or "no calling AE (none allow-listed)")
        log.info("DICOM service listening", ae_title=self.cfg.ae_title, bind=host, port=port, accepts=allowed,
                 receive_path="fast" if fast else "stock", start_s=round(time.time() - self.started_at, 3),
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
                if self._recovered.is_set():  # a series is not complete while files of it may be unindexed
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
        try:
            heartbeat.stopped(self.store, SERVICE, durable_before=self.store_service.ingestor.durable_before()
                              if self._recovered.is_set() else None)
        except Exception as exc:
            log.warning("last heartbeat not recorded", error=str(exc))
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
