"""A real Orthanc for tests (the PACS / cloud PACS), on loopback, with its own ports and storage.

Import it from a test module (``from tests.orthanc_server import orthanc, requires_orthanc``); like
nut_server it is not a conftest, so only tests that need a PACS pay for starting one (~0.5-1 s).

Orthanc runs as a child of the test process, is stopped by pid (SIGTERM, then SIGKILL) on exit,
and logs to a file in the temp dir that is quoted in the error if it does not come up. The HTTP API
is reached with urllib only; ``upload`` returns Orthanc's JSON answer, and raises with Orthanc's own
error text when it refuses an instance (that text is what a test needs to see).

For C-STORE tests pass ``modalities={"APPLIANCE": ["APPLIANCE", "127.0.0.1", port]}`` so Orthanc
knows the peer; ``aet`` and ``dicom_port`` are on the returned server.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGINS_DIR = "/usr/share/orthanc/plugins"


class OrthancError(RuntimeError):
    """Orthanc did not start, or refused a request; the message carries Orthanc's own words."""


def orthanc_available() -> bool:
    return Path(ORTHANC).exists()


requires_orthanc = pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed (apt install orthanc)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log file>"
    return text[-limit:].strip() or "<empty>"


@dataclass
class OrthancServer:
    host: str
    http_port: int
    dicom_port: int
    aet: str
    directory: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                timeout: float = 30.0) -> tuple[int, Any]:
        """(HTTP status, decoded JSON or text). HTTP errors come back as a status, not an exception."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise OrthancError(f"GET {path}: HTTP {status}: {body}")
        return body

    def upload(self, path: Path) -> dict[str, Any]:
        """POST one DICOM file to /instances; Orthanc's answer, or OrthancError with its reason."""
        status, body = self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")
        if status != 200 or not isinstance(body, dict):
            raise OrthancError(f"Orthanc refused {Path(path).name}: HTTP {status}: {body}\n"
                               f"--- Orthanc log ---\n{_tail(self.directory / 'orthanc.log')}")
        return body

    def log_text(self) -> str:
        return _tail(self.directory / "orthanc.log", 100_000)


def _config(directory: Path, http_port: int, dicom_port: int, aet: str, plugins: bool,
            modalities: dict[str, list[Any]] | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "Name": "edgescreen-test-orthanc",
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [PLUGINS_DIR] if plugins else [],
        "DicomModalities": modalities or {},
        "DicomCheckCalledAet": False,
        "HttpThreadsCount": 4,  # the CI box has two cores shared with the test itself
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "StorageCompression": False,
    }
    config.update(extra or {})
    return config


def _wait_ready(server: OrthancServer, deadline: float) -> str | None:
    """None once /system answers; 'exited' if Orthanc died (port taken, bad config)."""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return "exited"
        try:
            status, _ = server.request("GET", "/system", timeout=1.0)
            if status == 200:
                return None
        except OSError:
            pass
        time.sleep(0.1)
    return "timeout"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # Orthanc closes its SQLite index cleanly on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def orthanc(
    tmp_path: Path,
    *,
    aet: str = "ORTHANC",
    plugins: bool = False,
    modalities: dict[str, list[Any]] | None = None,
    extra_config: dict[str, Any] | None = None,
    start_timeout_s: float = 30.0,
    attempts: int = 3,
) -> Iterator[OrthancServer]:
    """Start Orthanc in ``tmp_path/orthanc``; yield an `OrthancServer`; always stop it on exit.

    Ports come from the kernel (bind to 0) and can be taken by someone else before Orthanc binds
    them; if Orthanc exits during start-up it is retried on fresh ports, up to ``attempts`` times.
    """
    if not orthanc_available():
        pytest.skip("Orthanc not installed")
    directory = Path(tmp_path) / "orthanc"
    directory.mkdir(parents=True, exist_ok=True)
    server: OrthancServer | None = None
    try:
        for attempt in range(1, attempts + 1):
            http_port, dicom_port = _free_port(), _free_port()
            cfg = directory / "orthanc.json"
            cfg.write_text(json.dumps(_config(directory, http_port, dicom_port, aet, plugins, modalities,
                                              extra_config), indent=2))
            with (directory / "orthanc.log").open("wb") as log:
                proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=directory)
            server = OrthancServer("127.0.0.1", http_port, dicom_port, aet, directory, proc)
            why = _wait_ready(server, time.monotonic() + start_timeout_s)
            if why is None:
                break
            _stop(proc)
            if why == "timeout" or attempt == attempts:
                raise OrthancError(f"Orthanc in {directory} did not come up ({why}, attempt {attempt}):\n"
                                   f"{_tail(directory / 'orthanc.log')}")
        assert server is not None
        yield server
    finally:
        if server is not None:
            _stop(server.proc)
