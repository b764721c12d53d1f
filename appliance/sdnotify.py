"""systemd's readiness and watchdog protocol: a datagram to $NOTIFY_SOCKET, a few lines (sd_notify(3)).

Written here rather than taken from a package: the protocol is one sendto() of "KEY=VALUE" lines, and
the whole of it fits on this page. Outside systemd (tests, the demo, a shell) NOTIFY_SOCKET is unset
and every call is a no-op.

The watchdog is what makes Type=notify worth having: systemd restarts a service that stops sending
WATCHDOG=1 within WatchdogSec. A thread that pinged unconditionally would keep a hung service alive
forever, so each service passes a health check of its own main loop (the web server answers HTTP, the
DICOM listener's threads live and its port accepts, the worker's loop or its current job moved
recently) and the ping is sent only while that check passes.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

from edgescreen.appliance.logs import get_logger

log = get_logger(__name__)

Health = Callable[[], tuple[bool, str]]


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    return "\0" + addr[1:] if addr.startswith("@") else addr  # '@' names an abstract socket


def notify(*fields: str) -> bool:
    """Send "KEY=VALUE" fields to systemd; False when not run by systemd or the socket refused."""
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), addr)
        return True
    except OSError as exc:
        log.warning("sd_notify failed", socket=addr.lstrip("\0"), error=str(exc))
        return False


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def watchdog_interval() -> float | None:
    """Seconds within which systemd wants a ping (WatchdogSec), or None when no watchdog is armed for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec) / 1e6
    except ValueError:
        return None
    return value if value > 0 else None


class Watchdog:
    """Pings systemd every half WatchdogSec while `health()` says the service's own loop is working."""

    def __init__(self, health: Health, interval_s: float, name: str) -> None:
        self.health = health
        self.period = max(0.05, interval_s / 2)
        self.name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchdog-{name}", daemon=True)
        self.failing_since: float | None = None

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ok, detail = self.health()
            except Exception as exc:  # a broken check is an unhealthy service, never a dead watchdog thread
                ok, detail = False, f"health check raised {type(exc).__name__}: {exc}"
            if ok:
                if self.failing_since is not None:
                    log.info("health check passes again", service=self.name)
                self.failing_since = None
                notify("WATCHDOG=1", f"STATUS={detail}")
            elif self.failing_since is None:
                self.failing_since = time.monotonic()
                # no ping: if this lasts WatchdogSec, systemd kills and restarts the service
                log.error("health check failed; withholding the watchdog ping", service=self.name, reason=detail)
                notify(f"STATUS=unhealthy: {detail}")
            self._stop.wait(self.period)


def start_watchdog(health: Health, name: str) -> Watchdog | None:
    """Start the watchdog thread when systemd armed one for this process; None otherwise."""
    interval = watchdog_interval()
    if interval is None:
        return None
    log.info("watchdog armed", service=name, ping_every_s=round(interval / 2, 2))
    return Watchdog(health, interval, name).start()


def tcp_accepts(host: str, port: int, timeout_s: float = 2.0) -> tuple[bool, str]:
    """Whether something accepts a TCP connection on host:port (a wildcard bind is probed on loopback)."""
    probe = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        with socket.create_connection((probe, port), timeout=timeout_s):
            return True, f"accepting on {host}:{port}"
    except OSError as exc:
        return False, f"nothing accepts on {probe}:{port} ({exc.strerror or exc})"


def http_ok(host: str, port: int, path: str = "/healthz", timeout_s: float = 5.0) -> tuple[bool, str]:
    """Whether the web server answers `path` with 200 (it opens the store to answer: a wedged store fails it)."""
    import http.client

    probe = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    conn = http.client.HTTPConnection(probe, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        status = conn.getresponse().status
    except OSError as exc:
        return False, f"GET {path} on {probe}:{port} failed ({exc})"
    finally:
        conn.close()
    return status == 200, f"GET {path} answered {status}"


def dicom_health(store, host: str, port: int, beat_every_s: float) -> tuple[bool, str]:  # noqa: ANN001 - Store
    """The DICOM service's own loops: its heartbeat thread wrote the store lately and its port accepts."""
    from edgescreen.appliance.store import heartbeat

    beat = heartbeat.read(store, "dicom")
    age = time.time() - beat["beat_at"] if beat else None
    if age is None or age > 3 * beat_every_s:
        return False, f"heartbeat row {'missing' if age is None else f'{age:.0f} s old'}"
    return tcp_accepts(host, port)


def loop_health(alive_at: Callable[[], float], max_quiet_s: float, what: str) -> tuple[bool, str]:
    """A loop that stamps `alive_at` (time.monotonic) each turn and at each safe point of its work."""
    quiet = time.monotonic() - alive_at()
    if quiet > max_quiet_s:
        return False, f"{what} has not moved for {quiet:.0f} s"
    return True, f"{what} moved {quiet:.0f} s ago"
