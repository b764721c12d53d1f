"""A real NUT server for tests: Debian's dummy-ups driver behind /lib/nut/upsd, on loopback.

Import it from a test module (``from tests.nut_server import nut_ups``); it is deliberately not a
conftest, so only the tests that need a UPS pay for starting one (~3 s: dummy-ups creates its
socket only after its first 1 s update, and upsd gets the first data dump a second or two later).
Share one server per module where the UPS state is not changed by the test.

Both daemons run in the foreground (``-F``) as children of the test process, so they can be
terminated by pid and never outlive the test; their stdout/stderr go to files in the temp dir and
are quoted in the error if the server does not come up. NUT_CONFPATH/NUT_STATEPATH are set only in
the children's environment, never in the test process.

dummy-ups facts this relies on (dummy-ups(8), NUT 2.8): a ``*.seq`` port runs in "dummy-loop" mode,
re-reading the file forever; ``TIMER n`` pauses n seconds before the following lines apply; at the end
of the file it starts again, so end a sequence with a long TIMER to hold the last state. Updates are
applied at the driver's poll interval (set to 1 s here) plus a 1 s sleep per file cycle. While the
driver starts or stops, upsd reports ``ups.status`` as ``WAIT``; once it is gone, ERR
DRIVER-NOT-CONNECTED.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DUMMY_UPS = Path("/lib/nut/dummy-ups")
DRIVER_DEBUG: list[str] = []  # e.g. ["-DDD"] to see dummy-ups parse the sequence in driver.log
UPSD = Path("/lib/nut/upsd")  # /usr/sbin/upsd is a wrapper that insists on /etc/nut/nut.conf


class NutServerError(RuntimeError):
    """The test UPS could not be started; the message carries the daemons' own output."""


@dataclass
class NutServer:
    """Unpacks as ``host, port, ups``; the rest is there for tests that poke the daemons."""

    host: str
    port: int
    ups: str
    directory: Path
    driver: subprocess.Popen[bytes] = field(repr=False)
    upsd: subprocess.Popen[bytes] = field(repr=False)
    _daemons: _Daemons = field(repr=False)

    def __iter__(self) -> Iterator[str | int]:
        return iter((self.host, self.port, self.ups))

    def stop_driver(self) -> None:
        """Kill the UPS driver only, as when a USB cable is pulled: upsd stays up."""
        _stop(self.driver)

    def restart_upsd(self, timeout_s: float = 20.0) -> None:
        """Restart upsd on the same port (a package upgrade does this); clients' sessions drop."""
        _stop(self.upsd)
        self._daemons.procs.remove(self.upsd)
        self.upsd = self._daemons.spawn([str(UPSD), "-u", "root", "-F"], "upsd")
        deadline = time.monotonic() + timeout_s
        while (reason := _ups_ready(self.host, self.port, self.ups)) is not None:
            if self.upsd.poll() is not None or time.monotonic() > deadline:
                raise self._daemons.failure(f"upsd did not come back: {reason}")
            time.sleep(0.05)


def nut_available() -> bool:
    return DUMMY_UPS.exists() and UPSD.exists()


requires_nut = pytest.mark.skipif(not nut_available(), reason="NUT not installed (apt install nut-server)")


def _die_with_parent() -> None:
    """Child-side: get SIGTERM if the test process dies, even by SIGKILL (Linux PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 == PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no output file>"
    return text[-limit:].strip() or "<empty>"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _ups_ready(host: str, port: int, ups: str) -> str | None:
    """None once upsd serves a real ups.status (not the start-up WAIT); otherwise why not yet."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(f"GET VAR {ups} ups.status\n".encode())
            reply = s.recv(4096).decode(errors="replace").strip()
    except OSError as exc:
        return f"port {port}: {exc}"
    return None if reply.startswith("VAR ") and not reply.endswith('"WAIT"') else reply


def initial_state(sequence: str) -> str:
    """The lines before the first TIMER: the state the UPS is held in while the server starts."""
    lines: list[str] = []
    for line in sequence.splitlines():
        if line.strip().upper().startswith("TIMER"):
            break
        lines.append(line)
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    """Write then rename, so dummy-ups never reads a half-written device file."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text)
    temp.chmod(0o600)  # upsd warns about world-readable configs
    os.replace(temp, path)


def _write_config(directory: Path, device_text: str, port: int, ups: str, desc: str) -> None:
    files = {
        "ups.conf": f'[{ups}]\n  driver = dummy-ups\n  port = {ups}.seq\n  pollinterval = 1\n  desc = "{desc}"\n',
        "upsd.conf": f"LISTEN 127.0.0.1 {port}\n",
        "upsd.users": "",
        "nut.conf": "MODE=standalone\n",
        f"{ups}.seq": device_text,
    }
    for name, text in files.items():
        _write(directory / name, text)


class _Daemons:
    """The two child processes of one attempt, and the error that quotes their output."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory, self.env = directory, env
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        with (self.directory / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.directory, preexec_fn=_die_with_parent)
        self.procs.append(proc)
        return proc

    def failure(self, what: str) -> NutServerError:
        return NutServerError(
            f"test NUT server in {self.directory} did not come up: {what}\n"
            f"--- dummy-ups output ---\n{_tail(self.directory / 'driver.log')}\n"
            f"--- upsd output ---\n{_tail(self.directory / 'upsd.log')}"
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):  # upsd first, so it does not log the driver vanishing
            _stop(proc)
        self.procs.clear()


def _start(directory: Path, device_text: str, port: int, ups: str, desc: str, timeout_s: float, daemons: _Daemons
           ) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]] | None:
    """Start driver then upsd; None if upsd could not bind the port (caller retries another)."""
    _write_config(directory, device_text, port, ups, desc)
    deadline = time.monotonic() + timeout_s
    driver = daemons.spawn([str(DUMMY_UPS), "-a", ups, "-u", "root", "-F", *DRIVER_DEBUG], "driver")
    driver_socket = directory / f"dummy-ups-{ups}"
    while not driver_socket.exists():  # upsd only retries a missing driver every few seconds
        if driver.poll() is not None:
            raise daemons.failure(f"dummy-ups exited with status {driver.returncode}")
        if time.monotonic() > deadline:
            raise daemons.failure(f"no driver socket {driver_socket} after {timeout_s:g}s")
        time.sleep(0.05)
    upsd = daemons.spawn([str(UPSD), "-u", "root", "-F"], "upsd")
    while (reason := _ups_ready("127.0.0.1", port, ups)) is not None:
        if upsd.poll() is not None:
            if "not listening" in _tail(directory / "upsd.log"):
                return None
            raise daemons.failure(f"upsd exited with status {upsd.returncode}")
        if driver.poll() is not None:
            raise daemons.failure(f"dummy-ups exited with status {driver.returncode}")
        if time.monotonic() > deadline:
            raise daemons.failure(f"upsd did not serve {ups!r} within {timeout_s:g}s: {reason}")
        time.sleep(0.05)
    return driver, upsd


@contextlib.contextmanager
def nut_ups(
    tmp_path: Path, sequence: str, *, ups: str = "sim", desc: str = "edgescreen test UPS", start_timeout_s: float = 20.0
) -> Iterator[NutServer]:
    """Run dummy-ups + upsd with ``sequence`` as the device file; yield a `NutServer`.

    dummy-ups starts walking a sequence before its socket even exists (~1 s, plus ~2 s until upsd
    has the first dump), so a sequence given as-is would have its first steps skipped unseen. The
    fixture therefore starts the driver on the sequence's initial state (the lines before the first
    TIMER, with no TIMER: re-read every cycle) and, once upsd serves it, swaps the full sequence in
    by rename; the driver picks it up on its next cycle (within ~2 s) and runs it from the top.

    Raises `NutServerError` (with the daemons' output) if the UPS is not served within
    ``start_timeout_s``; the processes are always stopped and the state dir removed on exit.
    """
    if not nut_available():
        pytest.skip("NUT not installed (apt install nut-server)")
    directory = tmp_path / f"nut-{ups}"
    directory.mkdir(mode=0o700)
    full = sequence if sequence.endswith("\n") else sequence + "\n"
    env = {**os.environ, "NUT_CONFPATH": str(directory), "NUT_STATEPATH": str(directory)}
    daemons = _Daemons(directory, env)
    try:
        started = None
        for _attempt in range(3):  # the probed free port can be taken before upsd binds it
            port = _free_port()
            started = _start(directory, initial_state(full), port, ups, desc, start_timeout_s, daemons)
            if started is not None:
                break
            daemons.stop()
        if started is None:
            raise daemons.failure("upsd could not bind a free loopback port in 3 attempts")
        driver, upsd = started
        if full != initial_state(full):
            _write(directory / f"{ups}.seq", full)
        yield NutServer("127.0.0.1", port, ups, directory, driver, upsd, daemons)
    finally:
        daemons.stop()
        shutil.rmtree(directory, ignore_errors=True)
