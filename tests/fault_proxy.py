"""A loopback HTTP/1.1 proxy that breaks things on purpose, for the sync fault drills.

Per request it picks (seeded, so a run can be replayed) one of:
    pass        forward to the next upstream (round robin: a client alternating between receivers)
    drop        close the client's connection without forwarding anything
    drop_after  forward, let the receiver store it, then close without an answer (the client must resend,
                and the receiver must answer "duplicate")
    delay       wait `delay_s`, then forward
    http500 / http503   answer an error without forwarding
    reset       forward part of the request body, then reset both connections (RST, SO_LINGER 0)
    truncate    forward, then send the client only the first part of the answer and close
A fault mix is {mode: probability}; the rest passes. `set_down(True)` refuses every connection (the link is
down) until `set_down(False)`. Counters say what was done, so a test can check its faults really happened.
With `tls_cert` it is also a TLS front (HTTPS to the client, HTTP to the upstream), as a load balancer is.
Only loopback: it listens on 127.0.0.1 and forwards to 127.0.0.1 ports.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Sequence

MODES = ("drop", "drop_after", "delay", "http500", "http503", "reset", "truncate")


def _read_message(sock: socket.socket, buffer: bytearray, *, limit: int = 1 << 30) -> tuple[bytes, bytes] | None:
    """One HTTP message (head, body) with a Content-Length body (or none); None at EOF."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    del buffer[:end]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            raise ValueError("chunked bodies are not supported by the fault proxy")
    if length > limit:
        raise ValueError("message too large")
    while len(buffer) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    return head, body


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _error_response(status: int) -> bytes:
    reason = {500: "Internal Server Error", 503: "Service Unavailable"}[status]
    body = f'{{"error": "injected {status}"}}'.encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "\r\n").encode() + body


class FaultProxy:
    def __init__(self, upstreams: Sequence[int], *, faults: dict[str, float] | None = None, seed: int = 0,
                 delay_s: float = 0.3, exempt: Sequence[str] = (), tls_cert: str | None = None) -> None:
        self.upstreams = list(upstreams)
        self.faults = dict(faults or {})
        unknown = set(self.faults) - set(MODES)
        if unknown:
            raise ValueError(f"unknown fault modes {unknown}")
        self.rng = random.Random(seed)
        self.delay_s = delay_s
        self.exempt = tuple(p.encode() for p in exempt)  # request paths that always pass (e.g. the probe)
        self.tls = None  # a TLS front (the certificate and key in one PEM): HTTPS outside, HTTP to the upstream
        if tls_cert is not None:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(tls_cert)
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.down = threading.Event()
        self._next = 0
        self._stop = threading.Event()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._accept.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        self._accept.join(timeout=5)

    def set_down(self, down: bool) -> None:
        (self.down.set if down else self.down.clear)()

    def set_faults(self, faults: dict[str, float]) -> None:
        with self.lock:
            self.faults = dict(faults)

    def _pick(self) -> tuple[str, int]:
        with self.lock:
            r = self.rng.random()
            mode = "pass"
            acc = 0.0
            for name, p in self.faults.items():
                acc += p
                if r < acc:
                    mode = name
                    break
            port = self.upstreams[self._next % len(self.upstreams)]
            self._next += 1
            self.counts[mode] += 1
            return mode, port

    def _accept_loop(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.down.is_set():
                with self.lock:
                    self.counts["refused"] += 1
                _reset(client)
                continue
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        buffer = bytearray()
        client.settimeout(60)
        try:
            if self.tls is not None:
                try:
                    client = self.tls.wrap_socket(client, server_side=True)
                except (ssl.SSLError, OSError):  # the client did not trust us: that is its answer
                    with self.lock:
                        self.counts["tls_refused"] += 1
                    client.close()
                    return
            while not self._stop.is_set():
                message = _read_message(client, buffer)
                if message is None:
                    break
                if self.down.is_set():
                    _reset(client)
                    return
                head, body = message
                mode, port = self._pick()
                path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
                if mode != "pass" and path in self.exempt:
                    mode = "pass"
                if mode == "drop":
                    client.close()
                    return
                if mode in ("http500", "http503"):
                    client.sendall(_error_response(500 if mode == "http500" else 503))
                    continue
                if mode == "delay":
                    time.sleep(self.delay_s)
                try:
                    upstream = socket.create_connection(("127.0.0.1", port), timeout=60)
                except OSError:  # that receiver is down: the client sees the connection close
                    with self.lock:
                        self.counts["upstream_down"] += 1
                    client.close()
                    return
                try:
                    if mode == "reset":
                        upstream.sendall(head + body[: max(0, len(body) // 2)])
                        time.sleep(0.01)
                        _reset(upstream)
                        _reset(client)
                        return
                    upstream.sendall(head + body)
                    answer = _read_message(upstream, bytearray())
                finally:
                    upstream.close()
                if answer is None:
                    client.close()
                    return
                rhead, rbody = answer
                if mode == "drop_after":
                    client.close()
                    return
                if mode == "truncate":
                    client.sendall(rhead + rbody[: len(rbody) // 2])
                    client.close()
                    return
                client.sendall(rhead + rbody)
                if b"connection: close" in rhead.lower():
                    break
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()
