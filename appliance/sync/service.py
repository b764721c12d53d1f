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
receiver answers "duplicate". The service runs niced (and idle I/O class under systemd) so it never
competes with inference or the UI.
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

from appliance.config.site import RetryPolicy, check_transport_url
from appliance.context import AppContext
from appliance.logs import get_logger
from appliance.store import outbox
from appliance.store.outbox import OutboxItem
from appliance.sync.enqueue import CLOUD_KINDS, FINDING_KIND, HEALTH_KIND
from appliance.sync.status import record_link
from appliance.sync.transport import CloudClient, PermanentError, Throttle, TransientError

log = get_logger(__name__)

BATCH = 20


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
        self._deid = None
        self._power = None
        self._link: dict[str, str] = {}
        self.link_failures = 0
        self.link_retry_at = 0.0
        self.last_heartbeat = 0.0
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

    @property
    def deid(self):  # noqa: ANN201 - built on first use: reading the secret and the profile tables costs
        if self._deid is None:
            from appliance.sync.deid import Deidentifier, DeidPolicy

            self._deid = Deidentifier(DeidPolicy.from_config(self.ctx.config, self.ctx.data_dir))
        return self._deid

    # -- may we use the link now? ----------------------------------------------------------------------
    def _on_mains(self) -> str | None:
        """None when on mains (or the box has no power source to ask); else why we wait."""
        if self._power is None:
            from appliance.scheduler.live import LiveGate

            self._power = LiveGate(self.ctx).power_source or False
        if self._power is False:
            return None
        reading = self._power.read()
        if reading.error or reading.stale:
            return f"waiting: power source unreadable ({reading.error or 'stale'}); sync.only_on_mains"
        if reading.on_mains is not True:
            return "waiting: on battery (sync.only_on_mains)"
        return None

    def gate(self, now: float) -> str | None:
        if not in_windows(self.cfg.windows, time.localtime(now)):
            return f"waiting: outside the sync window(s) {', '.join(self.cfg.windows)}"
        if self.cfg.only_on_mains:
            return self._on_mains()
        return None

    # -- one round ---------------------------------------------------------------------------------------
    def heartbeat(self, now: float) -> int | None:
        """Queue a health item when one is due; an older unsent one is superseded (only the newest matters)."""
        if self.client is None or now - self.last_heartbeat < self.cfg.heartbeat_s:
            return None
        from appliance.sync.health import health

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
        from appliance.dicom.export import export_pending

        return export_pending(self.store, self.ctx.config, owner=self.owner)

    def cloud_round(self, now: float | None = None, *, force_probe: bool = False) -> dict[str, int]:
        """Deliver due cloud items; counts of sent, deferred, failed, and `waiting` when the link may not be used."""
        counts = {"sent": 0, "deferred": 0, "failed": 0, "waiting": 0}
        if self.client is None:
            return counts
        now = time.time() if now is None else now
        reason = self.gate(now)
        if reason is not None:
            record_link(self.store, "cloud", "waiting", reason, self._link)
            counts["waiting"] = 1
            return counts
        if now < self.link_retry_at and not force_probe:
            counts["waiting"] = 1
            return counts
        down = self.client.probe()
        if down is not None:
            self.link_failures += 1
            wait = self._delay(self.link_failures)
            self.link_retry_at = now + wait
            record_link(self.store, "cloud", "link-down", down, self._link)
            (log.warning if self.link_failures in (1, 10, 100) else log.debug)(
                "cloud receiver unreachable; will probe again", url=self.url, retry_in_s=round(wait, 1),
                failures=self.link_failures, error=down)
            counts["waiting"] = 1
            return counts
        if self.link_failures:
            log.info("cloud link is back", url=self.url, after_failures=self.link_failures)
        self.link_failures, self.link_retry_at = 0, 0.0
        record_link(self.store, "cloud", "ok", None, self._link)
        while not self.stop.is_set():
            batch = outbox.claim(self.store, self.owner, self.lease_s, kinds=CLOUD_KINDS, limit=BATCH)
            if not batch:
                break
            for row in batch:
                if self.stop.is_set():  # give the rest back at once rather than leaving them leased
                    outbox.settle(self.store, row["id"], "defer", self.owner, next_attempt_at=0)
                    continue
                counts[self.deliver(row)] += 1
                self.last_progress = time.monotonic()
                if self.link_failures:
                    break
            if self.link_failures:  # the link went down mid-batch: return what is left, probe again later
                for row in batch:
                    outbox.settle(self.store, row["id"], "defer", self.owner, next_attempt_at=0)
                break
        return counts

    def _delay(self, attempt: int) -> float:
        from appliance.scheduler.retry import delay

        return delay(self.policy, attempt, self.rng)

    def deliver(self, row: dict[str, Any]) -> str:
        """Send one claimed item; settle its row. Returns "sent", "deferred" or "failed"."""
        from appliance.sync.deid import DeidError

        item_id, kind = row["id"], row["kind"]
        ilog = log.bind(outbox=item_id, kind=kind)
        attempts = row["attempts"] + 1
        try:
            payload = json.loads(row["payload"])
            status = self._send(row, payload, ilog)
        except TransientError as exc:
            wait = self._delay(attempts)
            if "cannot reach" in str(exc) or "cut short" in str(exc):
                self.link_failures += 1
                self.link_retry_at = time.time() + self._delay(self.link_failures)
            outbox.settle(self.store, item_id, "defer", self.owner, attempts=attempts,
                          next_attempt_at=time.time() + wait, last_error=str(exc)[:500])
            ilog.warning("cloud item not delivered; will retry", attempts=attempts, retry_in_s=round(wait, 1),
                         error=str(exc))
            return "deferred"
        except (PermanentError, DeidError, FileNotFoundError, ValueError, KeyError) as exc:
            text = (f"result file missing ({Path(exc.filename).name}); it was deleted before it was sent"
                    if isinstance(exc, FileNotFoundError) else str(exc))
            outbox.settle(self.store, item_id, "give_up", self.owner, attempts=attempts, last_error=text[:500])
            ilog.error("cloud item refused; a technician can retry it with `edgescreen outbox retry`",
                       attempts=attempts, error=text)
            return "failed"
        if not outbox.settle(self.store, item_id, "sent", self.owner, attempts=attempts, sent_at=time.time(),
                             last_error=None):
            ilog.warning("delivered, but another sender took the item over meanwhile (the receiver keeps one copy)")
        ilog.info("cloud item delivered", receiver=status, attempts=attempts)
        return "sent"

    def _send(self, row: dict[str, Any], payload: dict[str, Any], ilog: Any) -> str:
        assert self.client is not None
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
                from appliance.sync.health import _phi_of_study
                from appliance.sync.summary import finding_summary

                forbidden = _phi_of_study(self.store, payload.get("study_uid"))
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
            from appliance.store.heartbeat import beat

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
            try:
                self.heartbeat(time.time())
                self.pacs_round()
                counts = self.cloud_round()
            except Exception:  # noqa: BLE001 - the service never dies of one bad round
                log.exception("sync round failed; will try again")
                counts = {}
            if not counts.get("sent"):
                self.stop.wait(poll)
        log.info("sync stopped", owner=self.owner)

    def _kinds(self) -> tuple[str, ...]:
        return (("pacs",) if self.ctx.config.dicom.pacs is not None else ()) + (CLOUD_KINDS if self.client else ())

    def run_once(self, *, max_attempts: int = 6, deadline_s: float = 600.0) -> int:
        """Deliver what is pending now, retrying transient failures (at most `max_attempts` per item, within
        `deadline_s`); 0 when nothing is left, 1 when items remain."""
        kinds = self._kinds()
        if not kinds:
            return 0
        outbox.reclaim_dead(self.store, self.host, _alive)
        outbox.expedite(self.store, kinds)
        start = time.monotonic()
        self.last_heartbeat = 0.0
        self.heartbeat(time.time())
        tried = {r["id"]: r["attempts"] for r in self.store.query(
            f"SELECT id, attempts FROM outbox WHERE state IN ('pending', 'sending') AND kind IN "
            f"({', '.join('?' * len(kinds))})", kinds)}
        waiting_rounds = 0
        while not self.stop.is_set() and time.monotonic() - start < deadline_s:
            self.pacs_round()
            counts = self.cloud_round(force_probe=True)
            left = self.remaining()
            if not left["due"]:
                break
            if counts.get("sent"):
                waiting_rounds = 0  # the link works: only consecutive failed probes end the run
            elif counts.get("waiting"):
                waiting_rounds += 1
                if waiting_rounds >= max_attempts or self.gate(time.time()) is not None:
                    break
            now_attempts = {r["id"]: r["attempts"] for r in self.store.query(
                f"SELECT id, attempts FROM outbox WHERE state IN ('pending', 'sending') AND kind IN "
                f"({', '.join('?' * len(kinds))})", kinds)}
            if now_attempts and all(a - tried.get(i, 0) >= max_attempts for i, a in now_attempts.items()):
                break
            wake = self.store.query_one(f"SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending' AND kind IN "
                                        f"({', '.join('?' * len(kinds))})", kinds)[0] or 0
            wake = max(wake, self.link_retry_at)
            self.stop.wait(min(max(0.05, wake - time.time()), 30.0))
        left = self.remaining()
        return 0 if not left["due"] and not left["failed"] else 1

    def remaining(self) -> dict[str, int]:
        kinds = self._kinds()
        if not kinds:
            return {"due": 0, "failed": 0}
        marks = ", ".join("?" * len(kinds))
        due = self.store.query_one(f"SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'sending') AND kind IN "
                                   f"({marks})", kinds)[0]
        failed = self.store.query_one(f"SELECT COUNT(*) FROM outbox WHERE state = 'failed' AND kind IN ({marks})",
                                      kinds)[0]
        return {"due": due, "failed": failed}

    def healthy(self) -> tuple[bool, str]:
        """For the systemd watchdog: the loop (or the item it is sending) moved within the last 100 s."""
        idle = time.monotonic() - self.last_progress
        if idle > 100:
            return False, f"sync loop has not moved for {idle:.0f} s"
        return True, f"sync running; link {self._link.get('cloud', 'unknown')}"

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
