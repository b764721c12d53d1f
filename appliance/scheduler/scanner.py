"""Scanner-state sources: each says busy, idle or no opinion, with the reason a person can read.

A clinic may have MPPS, or only C-STORE traffic, or a power meter on the scanner's circuit, or only
a switch the radiographer flips. Each is a small source; `combine` applies the site's rule and the
fail-safe for sources that cannot be trusted right now.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Protocol

from edgescreen.appliance.store import Store, heartbeat

DICOM_SERVICE = "dicom"  # the heartbeat row the DICOM service writes (appliance.dicom.scp)
MANUAL_KEY = "scanner.manual"
MANUAL_MODES = ("busy", "idle", "auto")
MANUAL_IDLE_MAX_S = 8 * 3600  # a forgotten "idle" must not override MPPS for days; "busy" only errs safe


@dataclass(frozen=True)
class ScannerSignal:
    source: str
    busy: bool | None  # None: this source has no opinion right now
    since: float | None  # when the current state began, if known
    reason: str
    stale: bool = False  # the source should have an opinion but cannot be trusted (unreachable, too old)


@dataclass(frozen=True)
class ScannerState:
    busy: bool
    since: float | None
    reason: str
    signals: tuple[ScannerSignal, ...]


class ScannerSource(Protocol):
    name: str

    def read(self, now: float) -> ScannerSignal: ...


def _clock(ts: float | None) -> str:
    return time.strftime("%H:%M", time.localtime(ts)) if ts else "?"


class MppsSource:
    """Busy while any modality has an MPPS step IN PROGRESS (N-CREATE) not yet COMPLETED or DISCONTINUED (N-SET).

    Read per procedure step from the DICOM service's `mpps` table, so one station's N-SET never
    clears another's exam. A step left IN PROGRESS longer than `max_busy_s` (a scanner that never
    sent its N-SET) is stale: then the fail-safe and the staff's manual switch decide.
    """

    name = "mpps"

    def __init__(self, store: Store, max_busy_s: float = 4 * 3600, stale_after_s: float = 30.0) -> None:
        self.store = store
        self.max_busy_s = max_busy_s
        self.stale_after_s = stale_after_s

    def read(self, now: float) -> ScannerSignal:
        down = heartbeat.staleness(self.store, DICOM_SERVICE, self.stale_after_s, now)
        if down:
            return ScannerSignal(self.name, None, None, f"MPPS unknown: {down}", stale=True)
        open_steps = self.store.query(
            "SELECT station_ae, calling_ae, modality, created_at FROM mpps WHERE status = 'IN PROGRESS' "
            "ORDER BY created_at")
        fresh = [r for r in open_steps if now - r["created_at"] <= self.max_busy_s]
        if fresh:
            first = fresh[0]
            station = first["station_ae"] or first["calling_ae"] or "the scanner"
            more = f" (+{len(fresh) - 1} more)" if len(fresh) > 1 else ""
            return ScannerSignal(self.name, True, first["created_at"],
                                 f"MPPS exam in progress on {station} since {_clock(first['created_at'])}{more}")
        if open_steps:
            old = open_steps[0]
            return ScannerSignal(self.name, True, old["created_at"], f"MPPS exam in progress on "
                                 f"{old['station_ae'] or old['calling_ae'] or 'the scanner'} since "
                                 f"{_clock(old['created_at'])} without N-SET for over {self.max_busy_s / 3600:.0f} h",
                                 stale=True)
        last = self.store.query_one("SELECT MAX(updated_at) FROM mpps")[0]
        if last is None:
            return ScannerSignal(self.name, False, None, "no MPPS exam seen")
        return ScannerSignal(self.name, False, last, f"last MPPS exam ended at {_clock(last)}")


class StoreActivitySource:
    """Busy while images keep arriving from the scanner: a scanner sending images is a scanner scanning."""

    name = "store"

    def __init__(self, store: Store, quiet_s: float, scanner_aes: list[str] | None = None,
                 stale_after_s: float = 30.0) -> None:
        self.store = store
        self.quiet_s = quiet_s
        self.scanner_aes = scanner_aes
        self.stale_after_s = stale_after_s

    def last_received(self) -> tuple[float | None, str | None]:
        """The newest instance received over the network (uploads and re-ingests have no calling AE), by
        index: one probe per scanner AE, or a walk down the received_at index, never a scan of the table."""
        if self.scanner_aes:
            best: tuple[float | None, str | None] = (None, None)
            for ae in self.scanner_aes:
                t = self.store.query_one("SELECT MAX(received_at) FROM instances WHERE calling_ae = ?", (ae,))[0]
                if t is not None and (best[0] is None or t > best[0]):
                    best = (t, ae)
            return best
        row = self.store.query_one("SELECT received_at, calling_ae FROM instances INDEXED BY instances_received "
                                   "WHERE calling_ae IS NOT NULL ORDER BY received_at DESC LIMIT 1")
        return (row["received_at"], row["calling_ae"]) if row else (None, None)

    def read(self, now: float) -> ScannerSignal:
        down = heartbeat.staleness(self.store, DICOM_SERVICE, self.stale_after_s, now)
        if down:
            return ScannerSignal(self.name, None, None, f"image arrivals unknown: {down}", stale=True)
        last, calling_ae = self.last_received()
        if last is None or now - last >= self.quiet_s:
            return ScannerSignal(self.name, False, last, "no images arriving")
        return ScannerSignal(self.name, True, last, f"receiving images from {calling_ae or 'the scanner'} "
                             f"({now - last:.0f} s ago)")


class PowerDrawSource:
    """Busy while the scanner's circuit draws more than a threshold (a NUT variable such as ups.realpower)."""

    name = "power-draw"

    def __init__(self, read_value, variable: str, threshold: float, stale_after_s: float) -> None:
        self._read_value = read_value  # () -> (value or None, taken_at, error or None)
        self.variable = variable
        self.threshold = threshold
        self.stale_after_s = stale_after_s

    def read(self, now: float) -> ScannerSignal:
        value, taken_at, error = self._read_value()
        if error or value is None or now - taken_at > self.stale_after_s:
            return ScannerSignal(self.name, None, None, f"{self.variable} unavailable: {error or 'no value'}", stale=True)
        busy = value > self.threshold
        return ScannerSignal(self.name, busy, taken_at, f"{self.variable} = {value:g} "
                             f"({'above' if busy else 'below'} {self.threshold:g})")


class ManualSource:
    """The staff switch: busy or idle overrides every other source; auto hands back to them."""

    name = "manual"

    def __init__(self, store: Store) -> None:
        self.store = store

    def read(self, now: float) -> ScannerSignal:
        row = self.store.query_one("SELECT value, updated_at FROM settings WHERE key = ?", (MANUAL_KEY,))
        mode = row["value"] if row else "auto"
        if mode == "auto":
            return ScannerSignal(self.name, None, None, "manual switch on auto")
        if mode == "idle" and now - row["updated_at"] > MANUAL_IDLE_MAX_S:
            return ScannerSignal(self.name, None, None, f"manual idle set at {_clock(row['updated_at'])} has expired")
        return ScannerSignal(self.name, mode == "busy", row["updated_at"],
                             f"set {mode} by staff at {_clock(row['updated_at'])}")


def set_manual(store: Store, mode: str, actor: str) -> None:
    if mode not in MANUAL_MODES:
        raise ValueError(f"scanner mode {mode!r}: use one of {', '.join(MANUAL_MODES)}")
    now = time.time()
    with store.transaction() as conn:
        conn.execute("INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                     (MANUAL_KEY, mode, now))
        store.audit(actor, "scanner.manual", mode, conn=conn)
        conn.execute("INSERT INTO events (ts, kind, source, state, detail) VALUES (?, 'scanner', 'manual', ?, ?)",
                     (now, mode, json.dumps({"actor": actor})))


class ClinicHoursSource:
    """Outside clinic hours the scanner is off: idle. Inside, no opinion (the other sources decide)."""

    name = "clinic-hours"

    def __init__(self, hours: str) -> None:
        start, end = hours.split("-")
        self.start = int(start[:2]) * 60 + int(start[3:])
        self.end = int(end[:2]) * 60 + int(end[3:])

    def read(self, now: float) -> ScannerSignal:
        t = time.localtime(now)
        minute = t.tm_hour * 60 + t.tm_min
        inside = self.start <= minute < self.end if self.start <= self.end else (minute >= self.start or minute < self.end)
        if inside:
            return ScannerSignal(self.name, None, None, "within clinic hours")
        return ScannerSignal(self.name, False, None, "outside clinic hours")


def combine(signals: list[ScannerSignal], *, rule: str = "any_busy", failsafe: str = "busy") -> ScannerState:
    """Manual busy/idle wins; a stale source counts as the fail-safe; then `any_busy` or `all_busy`."""
    manual = [s for s in signals if s.source == "manual" and s.busy is not None]
    if manual:
        s = manual[0]
        return ScannerState(s.busy, s.since, f"scanner {'busy' if s.busy else 'idle'}: {s.reason} (manual)", tuple(signals))
    votes: list[tuple[bool, ScannerSignal, str]] = []
    for s in signals:
        if s.stale:
            votes.append((failsafe == "busy", s, f"{s.reason}; fail-safe {failsafe}"))
        elif s.busy is not None:
            votes.append((s.busy, s, s.reason))
    if not votes:
        return ScannerState(False, None, "scanner idle: no source reports activity", tuple(signals))
    busy_votes = [v for v in votes if v[0]]
    busy = bool(busy_votes) if rule == "any_busy" else len(busy_votes) == len(votes)
    chosen = busy_votes if busy else [v for v in votes if not v[0]]
    # the earliest "since" among the deciding sources is when this state began
    since_values = [v[1].since for v in chosen if v[1].since is not None]
    since = min(since_values) if busy and since_values else (max(since_values) if since_values else None)
    reason = "; ".join(f"{v[2]} ({v[1].source})" for v in chosen)
    return ScannerState(busy, since, f"scanner {'busy' if busy else 'idle'}: {reason}", tuple(signals))
