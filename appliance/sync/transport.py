"""HTTPS to the fleet receiver: JSON items, resumable chunked uploads, a probe, and a bandwidth cap.

Certificates are always verified (requests' default), against the system store or the CA bundle the site
pins in sync.ca_file. Every failure is sorted into what the caller does next: LinkError (the receiver
cannot be reached, or its answer was cut short: stop the round, probe again later), AuthError (the receiver
refuses this device: no item can go until the token is fixed), TransientError (a 5xx, an upload the
receiver lost: retry the item with backoff) or PermanentError (the receiver refuses the item itself:
400/413/422; retrying cannot help, a technician looks at it).

An upload is resumable across crashes and across receiver processes: opening it again returns how many
bytes the receiver already holds (chunks are rows in its database), and the client continues from there.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from edgescreen.appliance import __version__


class TransientError(RuntimeError):
    """Try again later (with backoff); the message is what `last_error` shows."""


class LinkError(TransientError):
    """The receiver did not answer (or its answer was cut short): the link, not the item, is at fault."""


class AuthError(TransientError):
    """The receiver refuses this device (HTTP 401/403): nothing can be sent until sync.token_file is fixed."""


class PermanentError(RuntimeError):
    """The receiver refuses this item; retrying it unchanged cannot succeed."""


class Throttle:
    """A token bucket: at most `rate` bytes per second on average, bursts of at most one chunk."""

    def __init__(self, rate_bytes_s: float | None, *, stop: threading.Event | None = None) -> None:
        self.rate = rate_bytes_s
        self.stop = stop or threading.Event()
        self.allowance = 0.0
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def consume(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            self.allowance = min(self.allowance + (now - self.last) * self.rate, max(self.rate, n))
            self.last = now
            self.allowance -= n
            debt = -self.allowance
        if debt > 0:
            self.stop.wait(debt / self.rate)


class CloudClient:
    """One device's connection to the receiver (a requests session: kept-alive, verified TLS)."""

    def __init__(self, url: str, *, device_id: str, site: str | None = None, token: str | None = None,
                 ca_file: str | None = None, timeout_s: float = 30.0, chunk_bytes: int = 256 * 1024,
                 throttle: Throttle | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout_s
        self.chunk = chunk_bytes
        self.throttle = throttle or Throttle(None)
        self.session = requests.Session()
        self.session.verify = ca_file if ca_file else True
        self.session.trust_env = False  # a proxy in the environment must not silently reroute patient data
        self.session.headers.update({"User-Agent": f"edgescreen/{__version__}", "X-Edgescreen-Device": device_id})
        if site:
            self.session.headers["X-Edgescreen-Site"] = site.encode("ascii", "replace").decode()
        self.set_token(token)

    def set_token(self, token: str | None) -> None:
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        else:
            self.session.headers.pop("Authorization", None)

    def close(self) -> None:
        self.session.close()

    # -- plumbing -----------------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any) -> requests.Response:
        url = self.url + path
        try:
            return self.session.request(method, url, timeout=timeout or self.timeout, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise LinkError(f"TLS verification of {self.url} failed ({_short(exc)}); check sync.ca_file "
                            "and the receiver's certificate") from None
        except requests.RequestException as exc:
            raise LinkError(f"cannot reach {self.url}: {_short(exc)}") from None

    @staticmethod
    def _json(resp: requests.Response) -> dict[str, Any]:
        try:
            doc = resp.json()
        except ValueError:
            raise LinkError(f"the receiver's answer (HTTP {resp.status_code}) was cut short or is not "
                            "JSON") from None
        if not isinstance(doc, dict):
            raise TransientError(f"the receiver answered HTTP {resp.status_code} with a non-object")
        return doc

    def _check(self, resp: requests.Response, what: str) -> dict[str, Any]:
        status = resp.status_code
        if status in (200, 201):
            return self._json(resp)
        detail = ""
        try:
            doc = resp.json()
            detail = str(doc.get("error", ""))[:200] if isinstance(doc, dict) else ""
        except ValueError:
            detail = resp.text[:120].strip()
        if status in (401, 403):
            raise AuthError(f"the receiver refused this device (HTTP {status}: {detail}); check sync.token_file "
                            "(a token from `edgescreen cloud-receiver --add-device`) and sync.device_id")
        if status in (400, 413, 415, 422):
            raise PermanentError(f"{what}: the receiver refused the item (HTTP {status}: {detail})")
        raise TransientError(f"{what}: HTTP {status}" + (f": {detail}" if detail else ""))

    # -- the API ------------------------------------------------------------------------------------
    def probe(self) -> str | None:
        """None when the receiver answers its health check; else why not (the link is down)."""
        try:
            resp = self._call("GET", "/healthz", timeout=min(5.0, self.timeout))
        except TransientError as exc:
            return str(exc)
        if resp.status_code != 200:
            return f"receiver health check: HTTP {resp.status_code}"
        return None

    def send_json(self, key: str, kind: str, group: str | None, body: dict[str, Any]) -> str:
        """Deliver one JSON item; "stored" or "duplicate" (already there: exactly once either way)."""
        doc = {"key": key, "kind": kind, "group": group, "body": body}
        payload = json.dumps(doc).encode()
        self.throttle.consume(len(payload))
        resp = self._call("POST", "/api/v1/items", data=payload, headers={"Content-Type": "application/json"})
        return str(self._check(resp, kind).get("status"))

    def send_file(self, key: str, kind: str, group: str | None, data: bytes,
                  on_progress: Callable[[int, int], None] | None = None) -> str:
        """Resumable chunked upload of `data`; "stored" or "duplicate"."""
        digest = hashlib.sha256(data).hexdigest()
        opened = self._check(self._call("POST", "/api/v1/uploads", json={
            "key": key, "kind": kind, "group": group, "size": len(data), "sha256": digest}), f"{kind} upload")
        if opened.get("status") == "duplicate":
            return "duplicate"
        upload, offset = str(opened["upload"]), int(opened["offset"])
        while offset < len(data):
            part = data[offset:offset + self.chunk]
            self.throttle.consume(len(part))
            resp = self._call("PUT", f"/api/v1/uploads/{upload}", data=part,
                              headers={"Upload-Offset": str(offset), "Content-Type": "application/octet-stream"})
            if resp.status_code == 409:  # the receiver is elsewhere (a retried chunk it already has)
                offset = int(self._json(resp).get("offset", 0))
                continue
            if resp.status_code == 404:
                raise TransientError(f"{kind} upload vanished at the receiver; it is opened again next time")
            offset = int(self._check(resp, f"{kind} chunk").get("offset", offset))
            if on_progress is not None:
                on_progress(offset, len(data))
        done = self._call("POST", f"/api/v1/uploads/{upload}/complete")
        if done.status_code == 404:  # completed by an earlier attempt whose answer we lost: ask again
            again = self._check(self._call("POST", "/api/v1/uploads", json={
                "key": key, "kind": kind, "group": group, "size": len(data), "sha256": digest}), f"{kind} upload")
            if again.get("status") == "duplicate":
                return "duplicate"
            raise TransientError(f"{kind} upload was lost at the receiver; it starts again next time")
        if done.status_code == 422:
            raise TransientError(f"{kind} upload arrived damaged (sha256 mismatch); the receiver reset it")
        return str(self._check(done, f"{kind} upload").get("status"))


def _short(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Caused by ", "(Caused by"):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.strip("()' ")[:200]
