"""A small client for the NUT upsd network protocol (RFC 9271) and the UPS power source built on it.

Why our own client: the PyPI options (nut2, PyNUTClient and their forks) are built on ``telnetlib``,
which is deprecated in 3.11 and gone in 3.13, raise bare exceptions without the host or what to do,
and have no notion of per-call timeouts. The read-only part of the protocol we need is a handful of
line-oriented commands, so a direct socket implementation is shorter than wrapping one of them.

Protocol summary (RFC 9271 section 4): one command per LF-terminated line; replies are one line
(``VAR ups var "value"``, ``OK ...``, ``ERR CODE [extra]``) or a ``BEGIN LIST ...`` / ``END LIST ...``
block. Arguments containing spaces are double-quoted with backslash escapes for ``"`` and ``\\``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping
from types import TracebackType

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.power.sources import PowerReading, on_mains_from_flags, parse_status, to_float

log = get_logger(__name__)

DEFAULT_PORT = 3493
_MAX_LINE = 64 * 1024  # upsd lines are short; a longer one means we are not talking to upsd
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only

_ERR_HINTS: dict[str, str] = {
    "UNKNOWN-UPS": "check the ups name in the site config (upsd's LIST UPS shows the names it serves)",
    "VAR-NOT-SUPPORTED": "this UPS/driver does not report that variable",
    "DRIVER-NOT-CONNECTED": "upsd runs but the UPS driver does not: check the driver service "
    "(nut-driver / upsdrvctl start) and the UPS cable",
    "DATA-STALE": "the UPS driver stopped delivering fresh data: check the UPS USB/serial link and the driver log",
    "ACCESS-DENIED": "upsd refused this client: check upsd.users and upsd.conf LISTEN",
    "USERNAME-REQUIRED": "set the NUT username/password in the site config (see upsd.users)",
    "PASSWORD-REQUIRED": "set the NUT username/password in the site config (see upsd.users)",
    "INVALID-USERNAME": "check the NUT username in the site config against upsd.users",
    "INVALID-PASSWORD": "check the NUT password in the site config against upsd.users",
    "UNKNOWN-COMMAND": "this upsd does not know the command (NUT too old?)",
    "INVALID-ARGUMENT": "the command arguments were malformed (bug in edgescreen?)",
}


class NutError(Exception):
    """upsd answered ``ERR <code>``, or (subclass `NutUnavailable`) could not be reached at all."""

    def __init__(self, message: str, *, address: str, code: str | None = None) -> None:
        super().__init__(message)
        self.address = address
        self.code = code


class NutUnavailable(NutError):
    """No usable connection: refused, timed out, reset, unresolvable host or a garbled reply.

    ``timed_out`` tells a hung upsd (retrying would only wait again) from a dropped session.
    """

    def __init__(self, message: str, *, address: str, timed_out: bool = False) -> None:
        super().__init__(message, address=address)
        self.timed_out = timed_out


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_line(line: str) -> list[str]:
    """Tokenise a protocol line: words separated by spaces, ``"quoted strings"`` with ``\\`` escapes."""
    tokens: list[str] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] == " ":
            i += 1
        elif line[i] == '"':
            i += 1
            buf: list[str] = []
            while True:
                if i >= n:
                    raise ValueError(f"unterminated quoted string in {line!r}")
                c = line[i]
                if c == "\\" and i + 1 < n:
                    buf.append(line[i + 1])
                    i += 2
                elif c == '"':
                    i += 1
                    break
                else:
                    buf.append(c)
                    i += 1
            tokens.append("".join(buf))
        else:
            j = line.find(" ", i)
            j = n if j < 0 else j
            tokens.append(line[i:j])
            i = j
    return tokens


def quote(arg: str) -> str:
    """Quote an argument only when needed, so simple commands stay readable in upsd debug logs."""
    if arg and not any(c in arg for c in ' "\\\t'):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


class NutClient:
    """One TCP session with upsd. Not thread-safe; `NutPowerSource` serialises access.

    ``timeout_s`` bounds the connect and every single receive, so a wedged upsd costs the caller at
    most a few timeouts instead of hanging the scheduler.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        timeout_s: float = 2.0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.username, self.password = username, password
        self.address = format_address(host, port)
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> NutClient:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _unavailable(self, what: str, timed_out: bool = False) -> NutUnavailable:
        self._drop()
        return NutUnavailable(f"upsd at {self.address}: {what}", address=self.address, timed_out=timed_out)

    def connect(self) -> None:
        if self._sock is not None:
            return
        try:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except ConnectionRefusedError:
            raise self._unavailable(
                "connection refused: is upsd running (systemctl status nut-server) and does upsd.conf "
                "LISTEN on this address and port?"
            ) from None
        except TimeoutError:
            raise self._unavailable(
                f"no answer within {self.timeout_s:g}s: check the host is up and no firewall drops the port",
                timed_out=True,
            ) from None
        except socket.gaierror as exc:
            raise self._unavailable(f"cannot resolve host ({exc.strerror}): check the NUT host in the site config") from None
        except OSError as exc:
            raise self._unavailable(f"cannot connect ({exc.strerror or exc})") from None
        self._buf = b""
        try:
            if self.username is not None:
                self._simple("username", "USERNAME", self.username)
            if self.password is not None:
                self._simple("password", "PASSWORD", self.password)
        except NutError:
            self._drop()  # never keep a session whose credentials were refused
            raise

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._buf = b""

    def close(self) -> None:
        """Say LOGOUT (politeness: upsd logs abrupt disconnects) and close; never raises."""
        if self._sock is None:
            return
        try:
            self._sock.settimeout(min(self.timeout_s, 0.5))
            self._sock.sendall(b"LOGOUT\n")
            self._readline()
        except (NutError, OSError):
            pass
        self._drop()

    def _send(self, *words: str) -> None:
        if any(c in w for w in words for c in "\r\n\0"):
            # a newline in a ups name or password would smuggle a second command to upsd
            raise ValueError(f"NUT command argument contains a line break or NUL: {words[0]} ...")
        if self._sock is None:
            self.connect()
        if self._sock is None:  # connect() raises when it cannot connect; this is only for the type checker
            raise self._unavailable("not connected")
        try:
            self._sock.sendall((" ".join(quote(w) for w in words) + "\n").encode())
        except OSError as exc:
            raise self._unavailable(f"send failed ({exc.strerror or exc}): upsd restarted or dropped us") from None

    def _readline(self) -> str:
        if self._sock is None:
            raise self._unavailable("not connected (the session was dropped)")
        while b"\n" not in self._buf:
            if len(self._buf) > _MAX_LINE:
                raise self._unavailable("reply line too long: is this port really upsd?")
            try:
                if _QUICKACK is not None:
                    # upsd writes a LIST one line per send() with Nagle on; with our delayed ACK every
                    # LIST VAR on a kept session stalled ~40 ms (measured). Linux resets QUICKACK, so re-arm.
                    self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                chunk = self._sock.recv(4096)
            except TimeoutError:
                raise self._unavailable(f"no reply within {self.timeout_s:g}s: upsd is hung or overloaded",
                                        timed_out=True) from None
            except OSError as exc:
                raise self._unavailable(f"receive failed ({exc.strerror or exc})") from None
            if not chunk:
                raise self._unavailable("connection closed by upsd (restarted, or MAXCONN reached?)")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", errors="replace").rstrip("\r")

    def _reply(self, words: tuple[str, ...], subject: str, ups: str | None = None) -> list[str]:
        """Read one reply line; turn ``ERR`` into `NutError` naming what it was about.

        UPS-level errors name the UPS alone (that is what the technician must fix), others the
        full subject such as ``sim battery.charge``.
        """
        line = self._readline()
        try:
            tokens = split_line(line)
        except ValueError as exc:
            raise self._unavailable(f"garbled reply to {words[0]}: {exc}") from None
        if tokens and tokens[0] == "ERR":
            code = tokens[1] if len(tokens) > 1 else "UNKNOWN"
            hint = _ERR_HINTS.get(code, "see RFC 9271 section 4.3")
            if ups is not None and code in ("UNKNOWN-UPS", "DRIVER-NOT-CONNECTED", "DATA-STALE"):
                subject = ups
            raise NutError(f"upsd at {self.address}: ERR {code} for {subject!r}: {hint}", address=self.address, code=code)
        if not tokens:
            raise self._unavailable(f"empty reply to {words[0]}")
        return tokens

    def _simple(self, subject: str, *words: str, ups: str | None = None) -> list[str]:
        self._send(*words)
        return self._reply(words, subject, ups)

    def _list(self, subject: str, *words: str, ups: str | None = None) -> list[list[str]]:
        """Run ``LIST ...`` and return the token lists between BEGIN and END."""
        self._send("LIST", *words)
        first = self._reply(("LIST", *words), subject, ups)
        if first[:2] != ["BEGIN", "LIST"]:
            raise self._unavailable(f"unexpected reply to LIST {' '.join(words)}: {' '.join(first)!r}")
        rows: list[list[str]] = []
        while True:
            line = self._readline()
            try:
                tokens = split_line(line)
            except ValueError as exc:
                raise self._unavailable(f"garbled LIST row: {exc}") from None
            if tokens[:2] == ["END", "LIST"]:
                return rows
            rows.append(tokens)

    def list_ups(self) -> dict[str, str]:
        """UPS names served by this upsd, with their descriptions."""
        return {row[1]: (row[2] if len(row) > 2 else "") for row in self._list("UPS", "UPS") if len(row) >= 2}

    def list_vars(self, ups: str) -> dict[str, str]:
        """Every variable of one UPS in a single round trip (what a poll should use)."""
        return {row[2]: row[3] for row in self._list(ups, "VAR", ups, ups=ups) if len(row) >= 4 and row[0] == "VAR"}

    def get_var(self, ups: str, var: str) -> str:
        tokens = self._simple(f"{ups} {var}", "GET", "VAR", ups, var, ups=ups)
        if len(tokens) < 4 or tokens[0] != "VAR":
            raise self._unavailable(f"unexpected reply to GET VAR: {' '.join(tokens)!r}")
        return tokens[3]

    def version(self) -> str:
        self._send("VER")
        return self._readline()


def reading_from_vars(variables: Mapping[str, str], source: str, taken_at: float | None = None) -> PowerReading:
    """Map NUT variables (names as in the NUT variable list) onto a `PowerReading`."""
    status = variables.get("ups.status", "")
    flags = parse_status(status)
    load = to_float(variables.get("ups.load"))
    realpower = to_float(variables.get("ups.realpower"))
    derived = False
    if realpower is None:
        nominal = to_float(variables.get("ups.realpower.nominal"))
        if nominal is not None and load is not None:
            realpower, derived = nominal * load / 100.0, True
    if not status:
        problem: str | None = "upsd reports no ups.status for this UPS"
    elif "WAIT" in flags:  # NUT 2.8: driver connected but no data yet, or stopping
        problem = "UPS driver not ready (ups.status WAIT: it is starting or stopping)"
    else:
        problem = None
    return PowerReading(
        on_mains=on_mains_from_flags(flags),
        low_battery="LB" in flags,
        forced_shutdown="FSD" in flags,
        battery_percent=to_float(variables.get("battery.charge")),
        runtime_s=to_float(variables.get("battery.runtime")),
        ups_realpower_w=realpower,
        ups_load_percent=load,
        status_raw=status,
        source=source,
        taken_at=time.time() if taken_at is None else taken_at,
        stale=problem is not None,
        error=problem,
        status_flags=flags,
        realpower_derived=derived,
    )


class NutPowerSource:
    """Polls one UPS through upsd. `read` never raises; problems become stale readings.

    The TCP session is kept between polls (a poll is then one LIST VAR round trip, ~0.1 ms on
    loopback) and re-opened once per read if upsd dropped it, so a restarted upsd costs a reconnect,
    not a failed poll. A hung upsd costs at most about two ``timeout_s`` per read.
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        ups: str = "ups",
        timeout_s: float = 2.0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        for name, value in (("ups", ups), ("host", host), ("username", username), ("password", password)):
            if value is not None and any(c in value for c in "\r\n\0"):
                raise ValueError(f"NUT {name} contains a line break or NUL: fix the site config")
        self.ups = ups
        self.source = f"nut:{ups}@{format_address(host, port)}"
        self._client = NutClient(host, port, timeout_s, username, password)
        self._lock = threading.Lock()
        self._last_problem: str | None = None
        self._last_status: str | None = None

    def _list_vars(self) -> dict[str, str]:
        if self._client.connected:
            try:
                return self._client.list_vars(self.ups)
            except NutUnavailable as exc:
                if exc.timed_out:
                    raise  # a hung upsd would only make us wait again
                # else a dropped session (upsd restarted): one fresh attempt below
        self._client.connect()
        return self._client.list_vars(self.ups)

    def _fetch(self) -> dict[str, str]:
        try:
            return self._list_vars()
        except NutError as exc:
            if exc.code != "UNKNOWN-UPS":
                raise
            try:  # name the UPSes upsd does serve: usually the fix is obvious from that list
                known = ", ".join(sorted(self._client.list_ups())) or "none"
            except NutError:
                known = "?"
            raise NutError(f"{exc} (upsd serves: {known})", address=exc.address, code=exc.code) from None

    def read(self) -> PowerReading:
        taken_at = time.time()
        with self._lock:
            try:
                reading = reading_from_vars(self._fetch(), self.source, taken_at)
            except NutError as exc:
                reading = PowerReading.unavailable(self.source, str(exc), taken_at)
            except Exception as exc:  # never let a sensing bug stop the scheduler
                log.exception("nut read failed unexpectedly", source=self.source)
                reading = PowerReading.unavailable(self.source, f"internal error: {exc!r}", taken_at)
            self._log_transition(reading)
        return reading

    def _log_transition(self, reading: PowerReading) -> None:
        """Log changes only: a poll every few seconds must not flood the journal."""
        if reading.error != self._last_problem:
            if reading.error:
                log.warning("ups unavailable", source=self.source, error=reading.error)
            else:
                log.info("ups reachable again", source=self.source)
            self._last_problem = reading.error
        if not reading.stale and reading.status_raw != self._last_status:
            log.info("ups status", source=self.source, status=reading.status_raw,
                     battery_percent=reading.battery_percent, runtime_s=reading.runtime_s)
            self._last_status = reading.status_raw

    def close(self) -> None:
        with self._lock:
            self._client.close()
