"""`edgescreen sync`: the store-and-forward service that takes results out of the outbox to where they go.

Each round: record a heartbeat item when one is due; send due PACS exports (C-STORE / STOW-RS); then,
if the cloud link may be used now (inside a time window, on mains when the site asks for that) and the
receiver answers its probe, claim due cloud items under a lease and deliver them one by one:
de-identified (PS3.15 Annex E, appliance.sync.deid) unless the site explicitly sends PHI, JSON for the
summary and the heartbeat, a resumable chunked upload for the SEG and the SR. A transient failure puts
the item back with exponential backoff and jitter; a refusal of the item itself fails it for a
technician (`edgescreen outbox retry ID`).

Exactly once: the outbox row is marked sent only after the receiver said stored or duplicate, and the
receiver keeps (device, idempotency key) UNIQUE. A SIGKILL between the two re-sends the item, which the
receiver answers "duplicate". The sent marks of a batch are committed together with the claim of the
next batch (one durable commit per batch, not per item: appliance.store.outbox.settle_and_claim).
The service runs niced (and idle I/O class under systemd), and it yields to inference: while a worker
analyses a study ([sync] yield_to_inference, on by default) no cloud item is prepared or sent. Niceness alone
was not enough: a CPU analysis's threads work in lock step, and the few slices a niced de-identification
takes from one of them stall them all (measured: 1.4x slower analyses while sync delivered a dozen items).
PACS exports still go at once; `sync --once` (a technician asking) does not yield.

An item that cannot be prepared (a result file that is not DICOM, a de-identification that leaves an
identifier, anything unexpected) is failed with the reason for a technician, never retried in a loop.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from edgescreen.appliance.config.site import RetryPolicy, check_transport_url
from edgescreen.appliance.context import AppContext
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.scheduler.retry import delay
from edgescreen.appliance.store import outbox
from edgescreen.appliance.store.outbox import OutboxItem
from edgescreen.appliance.sync.enqueue import CLOUD_KINDS, FINDING_KIND, HEALTH_KIND
from edgescreen.appliance.sync.status import record_link
from edgescreen.appliance.sync.transport import (
    AuthError,
    CloudClient,
    LinkError,
    PermanentError,
    Throttle,
    TransientError,
)

log = get_logger(__name__)
YIELD_REASON = "waiting: an analysis is running (sync yields to inference; [sync] yield_to_inference)"

BATCH = 20
# while the receiver does not answer, the link is probed again at most this far apart (one small GET): the
# backlog starts moving within this long of the link coming back, whatever the items' own backoff
LINK_PROBE_MAX_S = 30.0
# a round ends (and the link is probed again after a backoff) after this many connection failures in a row:
# one dropped connection on a flaky link is not a link down, two in a row are treated as one
LINK_ERRORS_PER_ROUND = 2
YIELD_POLL_S = 2.0  # while yielding to inference: how often to look whether the analysis is over


class SyncConfigError(RuntimeError):
    """The sync settings cannot work (no URL, unreadable token file); the message says what to set."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refusal(exc: BaseException, deid_error: type) -> str:
    """What a technician reads in `outbox list` when an item cannot be sent as it is."""
    from pydicom.errors import InvalidDicomError

    if isinstance(exc, FileNotFoundError):
        return (f"result file missing ({Path(exc.filename or '?').name}); it was deleted before it was sent: "
                "re-run the analysis (`edgescreen jobs retry`) or drop the item")
    if isinstance(exc, InvalidDicomError):
        return f"the result file is not readable DICOM ({exc}); re-run the analysis of this study"
    if isinstance(exc, (PermanentError, deid_error)):
        return str(exc)
    return (f"cannot prepare the item ({type(exc).__name__}: {str(exc)[:300]}); the sync log has the details, "
            "`edgescreen outbox retry ID` tries again")


def in_windows(windows: list[str], when: time.struct_time) -> bool:
    """True when the local clock time lies in one of the HH:MM-HH:MM windows (a window may wrap midnight)."""
    if not windows:
        return True
    minute = when.tm_hour * 60 + when.tm_min
    for w in windows:
        start, end = ((int(p[:2]) * 60 + int(p[3:])) for p in w.split("-"))
        if (start <= minute < end) if start <= end else (minute >= start or minute < end):
            return True
    return False


class SyncService:
    def __init__(self, ctx: AppContext, *, url: str | None = None, rng: random.Random | None = None) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.cfg = ctx.config.sync
        self.rng = rng or random.Random()
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_s = max(60.0, 4 * self.cfg.timeout_s)
        self.stop = threading.Event()
        self.device_id = self.cfg.device_id or self.host
        self.url = url or os.environ.get("EDGESCREEN_CLOUD_URL") or self.cfg.url
        self.client: CloudClient | None = None
        if self.url:
            try:
                check_transport_url(self.url, "the cloud URL")
            except ValueError as exc:
                raise SyncConfigError(str(exc)) from None
            rate = self.cfg.max_kib_s * 1024 if self.cfg.max_kib_s else None
            # under a bandwidth cap a chunk takes at most ~10 s, so progress (and the watchdog) keeps moving
            chunk = self.cfg.chunk_kib * 1024 if rate is None else max(4096, min(self.cfg.chunk_kib * 1024,
                                                                                 int(rate * 10)))
            self.client = CloudClient(self.url, device_id=self.device_id, site=ctx.config.site.name,
                                      token=self._token(), ca_file=self.cfg.ca_file, timeout_s=self.cfg.timeout_s,
                                      chunk_bytes=chunk, throttle=Throttle(rate, stop=self.stop))
        elif self.cfg.enabled:
            raise SyncConfigError("sync.enabled but no receiver URL: set [sync] url or EDGESCREEN_CLOUD_URL")
        self.policy = RetryPolicy(retries=100, base_s=self.cfg.retry_base_s, max_s=self.cfg.retry_max_s)
        self.link_policy = RetryPolicy(retries=100, base_s=min(self.cfg.retry_base_s, LINK_PROBE_MAX_S),
                                       max_s=min(self.cfg.retry_max_s, LINK_PROBE_MAX_S))
        self._deid = None
        self._power = None
        self._link: dict[str, str] = {}
        self.link_failures = 0
        self.link_errors = 0  # connection failures in a row within this round
        self.link_retry_at = 0.0  # time.monotonic(): a wall clock set back must not silence the probe
        self.last_heartbeat: float | None = None
        self.last_progress = time.monotonic()  # the watchdog's evidence that the loop moves

    def _token(self) -> str | None:
        if not self.cfg.token_file:
            return None
        try:
            token = Path(self.cfg.token_file).read_text().strip()
        except OSError as exc:
            raise SyncConfigError(f"sync.token_file {self.cfg.token_file}: cannot read ({exc.strerror}); put the "
                                  "token from `edgescreen cloud-receiver --add-device` there (mode 0600)") from None
        if not token:
            raise SyncConfigError(f"sync.token_file {self.cfg.token_file} is empty")
        return token

    def _reload_token(self) -> None:
        """After a refusal: a technician who fixed sync.token_file need not restart the service."""
        try:
            if self.client is not None:
                self.client.set_token(self._token())
        except SyncConfigError as exc:
            log.error("cannot reload the device token", error=str(exc))

    @property
    def deid(self):  # noqa: ANN201 - built on first use: reading the secret and the profile tables costs
        if self._deid is None:
            from edgescreen.appliance.sync.deid import Deidentifier, DeidPolicy

            self._deid = Deidentifier(DeidPolicy.from_config(self.ctx.config, self.ctx.data_dir))
        return self._deid

    # -- may we use the link now? ----------------------------------------------------------------------
    def _on_mains(self) -> str | None:
        """None when on mains (or the box has no power source to ask); else why we wait."""
        if self._power is None:
            from edgescreen.appliance.scheduler.live import LiveGate

            self._power = LiveGate(self.ctx).power_source or False
        if self._power is False:
            return None
        reading = self._power.read()
        if reading.error or reading.stale:
            return f"waiting: power source unreadable ({reading.error or 'stale'}); sync.only_on_mains"
        if reading.on_mains is not True:
            return "waiting: on battery (sync.only_on_mains)"
        return None

    def inference_running(self, now: float | None = None) -> bool:
        """A worker holds a live lease on a running job: an analysis is using the CPU (or the accelerator)."""
        now = time.time() if now is None else now
        return self.store.query_one("SELECT 1 FROM jobs WHERE state = 'running' AND lease_expires > ? LIMIT 1",
                                    (now,)) is not None

    def gate(self, now: float) -> str | None:
        if not in_windows(self.cfg.windows, time.localtime(now)):
            return f"waiting: outside the sync window(s) {', '.join(self.cfg.windows)}"
        if self.cfg.only_on_mains:
            return self._on_mains()
        return None

    # -- one round ---------------------------------------------------------------------------------------
    def heartbeat(self, now: float) -> int | None:
        """Queue a health item when one is due; an older unsent one is superseded (only the newest matters).
        A clock set back (now before the last heartbeat) makes one due at once rather than after the gap."""
        last = self.last_heartbeat
        if self.client is None or (last is not None and 0 <= now - last < self.cfg.heartbeat_s):
            return None
        from edgescreen.appliance.sync.health import health

        body = health(self.store, self.ctx.config, device_id=self.device_id, now=now)
        key = f"{HEALTH_KIND}:{self.device_id}:{int(now * 1000)}"
        with self.store.transaction() as conn:
            (item_id,) = outbox.add_items(conn, [OutboxItem(HEALTH_KIND, key, {"health": body})], now=now)
            outbox.supersede_pending(conn, HEALTH_KIND, keep_id=item_id)
        self.last_heartbeat = now
        return item_id

    def pacs_round(self) -> dict[str, int]:
        if self.ctx.config.dicom.pacs is None:
            return {}
        from edgescreen.appliance.dicom.export import export_pending

        return export_pending(self.store, self.ctx.config, owner=self.owner)

    def cloud_round(self, now: float | None = None, *, force_probe: bool = False,
                    yield_to_inference: bool = False) -> dict[str, int]:
        """Deliver due cloud items; counts of sent, deferred, failed, and `waiting` when the link may not be used
        (or, with `yield_to_inference`, while an analysis runs)."""
        counts = {"sent": 0, "deferred": 0, "failed": 0, "waiting": 0}
        if self.client is None:
            return counts
        now = time.time() if now is None else now
        started = time.monotonic()
        yielding = yield_to_inference and self.cfg.yield_to_inference
        if yielding and self.inference_running(now):
            record_link(self.store, "cloud", "waiting", YIELD_REASON, self._link)
            counts["waiting"] = counts["yielded"] = 1
            return counts
        reason = self.gate(now)
        if reason is not None:
            record_link(self.store, "cloud", "waiting", reason, self._link)
            counts["waiting"] = 1
            return counts
        if time.monotonic() < self.link_retry_at and not force_probe:
            counts["waiting"] = 1
            return counts
        down = self.client.probe()
        if down is not None:
            self._link_failed("link-down", down)
            counts["waiting"] = 1
            return counts
        if self.link_failures:
            log.info("cloud link is back", url=self.url, after_failures=self.link_failures)
        self.link_failures, self.link_retry_at, self.link_errors = 0, 0.0, 0
        record_link(self.store, "cloud", "ok", None, self._link)
        marks: list[tuple[int, str, dict[str, Any]]] = []  # delivered, marked sent with the next claim
        try:
            while not self.stop.is_set():
                batch, lost = outbox.settle_and_claim(self.store, self.owner, self.lease_s, marks, kinds=CLOUD_KINDS,
                                                      limit=BATCH)
                self._lost(lost)
                marks = []
                if not batch:
                    break
                for i, row in enumerate(batch):
                    if self.stop.is_set() or self.link_failures or (
                            yielding and self.inference_running(now + time.monotonic() - started)):
                        # SIGTERM, the link went down mid-batch, or an analysis started: the rest go back, due now
                        for rest in batch[i:]:
                            outbox.settle(self.store, rest["id"], "defer", self.owner, next_attempt_at=0)
                        if not (self.stop.is_set() or self.link_failures):
                            counts["waiting"] = counts["yielded"] = 1
                            record_link(self.store, "cloud", "waiting", YIELD_REASON, self._link)
                        break
                    counts[self.deliver(row, marks)] += 1
                    self.last_progress = time.monotonic()
                if self.link_failures or counts.get("yielded"):
                    break
        finally:
            if marks:  # the last batch's sent marks (also when the round ends early)
                self._lost(outbox.settle_and_claim(self.store, self.owner, self.lease_s, marks, kinds=CLOUD_KINDS,
                                                   limit=0)[1])
        if self.link_failures:  # the receiver stopped answering (or refused this device) during the round
            counts["waiting"] = 1
        return counts

    def _lost(self, ids: list[int]) -> None:
        for item_id in ids:
            log.warning("delivered, but another sender took the item over meanwhile (the receiver keeps one copy)",
                        outbox=item_id)

    def _link_failed(self, state: str, why: str) -> None:
        """The receiver cannot be used now (no answer, or it refuses this device): probe again after a backoff
        (capped at LINK_PROBE_MAX_S), and say so where the UI and `outbox list` look."""
        self.link_failures += 1
        wait = delay(self.link_policy, min(self.link_failures, 32), self.rng)  # 2**1024 overflows a float
        self.link_retry_at = time.monotonic() + wait
        record_link(self.store, "cloud", state, why, self._link)
        (log.warning if self.link_failures in (1, 10, 100) else log.debug)(
            "cloud receiver cannot be used now; will probe again", url=self.url, retry_in_s=round(wait, 1),
            failures=self.link_failures, error=why)

    def _delay(self, attempt: int) -> float:
        """An item's backoff; its attempts grow without bound while the receiver fails (weeks of 5xx), the
        exponent must not (2**1024 overflows a float)."""
        return delay(self.policy, min(attempt, 32), self.rng)

    def deliver(self, row: dict[str, Any], marks: list[tuple[int, str, dict[str, Any]]] | None = None) -> str:
        """Send one claimed item; settle its row (a "sent" mark goes to `marks`, committed with the next claim,
        when given). Returns "sent", "deferred" or "failed"."""
        from edgescreen.appliance.sync.deid import DeidError

        item_id, kind = row["id"], row["kind"]
        ilog = log.bind(outbox=item_id, kind=kind)
        attempts = row["attempts"] + 1
        try:
            payload = json.loads(row["payload"])
            status = self._send(row, payload, ilog)
        except (LinkError, AuthError) as exc:
            # the link's fault, not the item's: the item is due again at once (no per-item backoff; a refused
            # device token costs it no attempt); a refusal, or a second connection failure in a row, ends the
            # round until the probe says the receiver is back
            self.link_errors += 1
            if isinstance(exc, AuthError):
                self._link_failed("refused", str(exc))
                self._reload_token()
            elif self.link_errors >= LINK_ERRORS_PER_ROUND:
                self._link_failed("link-down", str(exc))
            outbox.settle(self.store, item_id, "defer", self.owner, next_attempt_at=0, last_error=str(exc)[:500],
                          attempts=row["attempts"] if isinstance(exc, AuthError) else attempts)
            return "deferred"
        except TransientError as exc:
            wait = self._delay(attempts)
            outbox.settle(self.store, item_id, "defer", self.owner, attempts=attempts,
                          next_attempt_at=time.time() + wait, last_error=str(exc)[:500])
            ilog.warning("cloud item not delivered; will retry", attempts=attempts, retry_in_s=round(wait, 1),
                         error=str(exc))
            return "deferred"
        except Exception as exc:  # noqa: BLE001 - a bad item is failed with its reason, never retried in a loop
            text = _refusal(exc, DeidError)
            outbox.settle(self.store, item_id, "give_up", self.owner, attempts=attempts, last_error=text[:500])
            (ilog.error if isinstance(exc, (PermanentError, DeidError, OSError)) else ilog.exception)(
                "cloud item refused; a technician can retry it with `edgescreen outbox retry`",
                attempts=attempts, error=text)
            return "failed"
        self.link_errors = 0
        fields = {"attempts": attempts, "sent_at": time.time(), "last_error": None}
        if marks is not None:
            marks.append((item_id, "sent", fields))
        elif not outbox.settle(self.store, item_id, "sent", self.owner, **fields):
            self._lost([item_id])
        ilog.info("cloud item delivered", receiver=status, attempts=attempts)
        return "sent"

    def _send(self, row: dict[str, Any], payload: dict[str, Any], ilog: Any) -> str:
        if self.client is None:
            raise RuntimeError("sync: no cloud client ([sync] url unset): nothing can be sent to the cloud")
        kind, key, group = row["kind"], row["idempotency_key"], row["group_key"]
        phi = bool(payload.get("phi")) and self.cfg.send_phi  # both when queued and now
        if kind == HEALTH_KIND:
            return self.client.send_json(key, kind, None, payload["health"])
        if kind == FINDING_KIND:
            findings = dict(payload["findings"])
            findings.setdefault("study_uid", payload.get("study_uid"))
            if phi:
                body = findings
            else:
                from edgescreen.appliance.sync.health import phi_of_study
                from edgescreen.appliance.sync.summary import finding_summary

                forbidden = phi_of_study(self.store, payload.get("study_uid"))
                forbidden += [str(findings.get("series_uid") or "")]
                body = finding_summary(findings, self.deid, forbidden=[f for f in forbidden if len(f) >= 4])
            return self.client.send_json(key, kind, group, body)
        path = Path(payload["file"])
        path = path if path.is_absolute() else self.ctx.data_dir / path
        data = path.read_bytes() if phi else self.deid.file(path)

        def progress(done: int, total: int) -> None:
            self.last_progress = time.monotonic()
            if not outbox.settle(self.store, row["id"], "progress", self.owner,
                                 progress=json.dumps({"sent": done, "size": total}),
                                 lease_expires=time.time() + self.lease_s):
                raise TransientError("lost the lease on this item (another sender took it over)")

        return self.client.send_file(key, kind, group, data, on_progress=progress)

    # -- loops -------------------------------------------------------------------------------------------
    def _beat(self, started: float) -> None:
        try:
            from edgescreen.appliance.store.heartbeat import beat

            beat(self.store, "sync", started_at=started)
        except Exception as exc:  # noqa: BLE001 - a missing heartbeats table never stops sync
            log.debug("sync heartbeat row not written", error=str(exc))

    def run_forever(self, poll_s: float | None = None) -> None:
        started = time.time()
        log.info("sync started", owner=self.owner, url=self.url, device=self.device_id,
                 pacs=self.ctx.config.dicom.pacs is not None)
        outbox.reclaim_dead(self.store, self.host, _alive)
        poll = poll_s if poll_s is not None else min(self.cfg.interval_s, 10.0)
        while not self.stop.is_set():
            self.last_progress = time.monotonic()
            self._beat(started)
            counts = self._round(yield_to_inference=True)
            if counts.get("yielded"):  # an analysis runs: look again soon, to go on as soon as it is over
                self.stop.wait(min(poll, YIELD_POLL_S))
            elif not counts.get("sent"):
                # idle: the next poll, or sooner the link's next probe (the backlog moves as soon as it is back)
                probe_in = self.link_retry_at - time.monotonic()
                self.stop.wait(max(0.05, min(poll, probe_in)) if self.link_failures else poll)
        log.info("sync stopped", owner=self.owner)

    def _round(self, *, force_probe: bool = False, yield_to_inference: bool = False) -> dict[str, int]:
        """One round; a failure of one destination never keeps the other from its turn, nor kills the service."""
        counts: dict[str, int] = {}
        for name, step in (("heartbeat", lambda: self.heartbeat(time.time())), ("pacs", self.pacs_round),
                           ("cloud", lambda: self.cloud_round(force_probe=force_probe,
                                                               yield_to_inference=yield_to_inference))):
            try:
                result = step()
            except Exception:  # noqa: BLE001 - the service never dies of one bad round
                log.exception("sync round failed; will try again", part=name)
                continue
            if name == "cloud":
                counts = result
        return counts

    def _kinds(self) -> tuple[str, ...]:
        return (("pacs",) if self.ctx.config.dicom.pacs is not None else ()) + (CLOUD_KINDS if self.client else ())

    def run_once(self, *, max_attempts: int = 6, deadline_s: float = 600.0) -> int:
        """Deliver what is pending now, retrying transient failures (at most `max_attempts` per item, within
        `deadline_s`); 0 when nothing is left, 1 when items remain (failed, waiting behind a failed item of
        their study, or still undelivered when the attempts or the deadline ran out)."""
        kinds = self._kinds()
        if not kinds:
            return 0
        outbox.reclaim_dead(self.store, self.host, _alive)
        outbox.expedite(self.store, kinds)
        start = time.monotonic()
        self.last_heartbeat = None
        self.heartbeat(time.time())
        tried = self._attempts(kinds)
        waiting_rounds = 0
        while not self.stop.is_set() and time.monotonic() - start < deadline_s:
            counts = self._round(force_probe=True)
            if not self.remaining()["due"]:
                break
            if counts.get("sent"):
                waiting_rounds = 0  # the link works: only consecutive failed probes end the run
            elif counts.get("waiting"):
                waiting_rounds += 1
                if waiting_rounds >= max_attempts or self.gate(time.time()) is not None:
                    break
            now_attempts = self._attempts(kinds)
            if now_attempts and all(a - tried.get(i, 0) >= max_attempts for i, a in now_attempts.items()):
                break
            wake = outbox.next_due(self.store, kinds)
            if wake is None:  # everything left waits behind a failed item of its study
                break
            wait = max(wake - time.time(), self.link_retry_at - time.monotonic())
            self.stop.wait(min(max(0.05, wait), 30.0))
        left = self.remaining()
        return 0 if not (left["due"] or left["failed"] or left["blocked"]) else 1

    def _attempts(self, kinds: tuple[str, ...]) -> dict[int, int]:
        marks = ", ".join("?" * len(kinds))
        return {r["id"]: r["attempts"] for r in self.store.query(
            f"SELECT id, attempts FROM outbox WHERE state IN ('pending', 'sending') AND kind IN ({marks})", kinds)}

    def remaining(self) -> dict[str, int]:
        """due: pending or being sent (not counting `blocked`: those wait behind a failed item of their study)."""
        kinds = self._kinds()
        if not kinds:
            return {"due": 0, "failed": 0, "blocked": 0}
        marks = ", ".join("?" * len(kinds))
        unsent = self.store.query_one(f"SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'sending') AND kind IN "
                                      f"({marks})", kinds)[0]
        failed = self.store.query_one(f"SELECT COUNT(*) FROM outbox WHERE state = 'failed' AND kind IN ({marks})",
                                      kinds)[0]
        held = outbox.blocked(self.store, kinds)
        return {"due": unsent - held, "failed": failed, "blocked": held}

    def healthy(self) -> tuple[bool, str]:
        """For the systemd watchdog: the loop (or the item it is sending) moved within the last 100 s."""
        idle = time.monotonic() - self.last_progress
        if idle > 100:
            return False, f"sync loop has not moved for {idle:.0f} s"
        return True, f"sync running; link {self._link.get('cloud', 'unknown')}"

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
