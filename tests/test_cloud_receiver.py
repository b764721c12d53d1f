"""The fleet receiver as a real process: idempotent storage (a UNIQUE key, not a check in Python), resumable
uploads, device tokens, its page; on SQLite and on a real PostgreSQL with two receiver processes.

The API tests share one receiver (each its own devices); its teardown checks that SIGTERM stops it cleanly."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import EDGESCREEN, REPO, free_port
from tests.postgres_server import postgres, requires_postgres

ENV = {**os.environ, "EDGESCREEN_CONFIG": "", "PYTHONPATH": str(REPO)}


@dataclass
class Receiver:
    port: int
    data_dir: Path
    proc: subprocess.Popen
    log_path: Path
    args: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the receiver did not stop within 20 s of SIGTERM") from None
        return self.proc.returncode


def start_receiver(data_dir: Path, *extra: str, port: int | None = None, database_url: str | None = None,
                   name: str = "receiver") -> Receiver:
    """Start `edgescreen cloud-receiver` and wait for /healthz (the helper the sync tests use too)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    args = ["cloud-receiver", "--port", str(port), "--data-dir", str(data_dir), *extra]
    if database_url:
        args += ["--database-url", database_url]
    log_path = data_dir / f"{name}-{port}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([*EDGESCREEN, *args], stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
    rec = Receiver(port, data_dir, proc, log_path, tuple(args))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the receiver exited with {proc.returncode}:\n{rec.log()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(rec.url + "/healthz", timeout=2) as resp:
            if resp.status == 200:
                return rec
        time.sleep(0.1)
    rec.kill()
    raise AssertionError(f"the receiver did not answer /healthz within 60 s:\n{rec.log()}")


@contextlib.contextmanager
def receiver(data_dir: Path, *extra: str, **kwargs) -> Iterator[Receiver]:
    rec = start_receiver(data_dir, *extra, **kwargs)
    try:
        yield rec
    finally:
        if rec.proc.poll() is None:
            rec.proc.kill()
            rec.proc.wait()


def stored_bytes(data_dir: Path) -> bytes:
    """Everything the receiver keeps on disk: the database, its WAL (not yet checkpointed) and its logs."""
    return b"".join(p.read_bytes() for p in sorted(Path(data_dir).rglob("*")) if p.is_file())


def call(url: str, method: str = "GET", body: dict | bytes | None = None, headers: dict | None = None
         ) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json" if isinstance(body, dict) else "application/octet-stream",
        **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


DEV = {"X-Edgescreen-Device": "box-1", "X-Edgescreen-Site": "Clinic One"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    with receiver(tmp_path_factory.mktemp("cloud"), "--allow-any-device") as rec:
        yield rec
        assert rec.stop() == 0, "SIGTERM stops the receiver cleanly"


def test_items_are_stored_once_and_the_page_lists_the_site(shared: Receiver) -> None:
    rec = shared
    item = {"key": "cloud.finding:abc", "kind": "cloud.finding", "group": "cloud:s1",
            "body": {"study": "2.25.1", "pipeline": "pancreas", "triage": "suspicious",
                     "abnormal_probability": 0.93, "threshold": 0.5, "lesions": [{"id": "lesion_1"}]}}
    assert call(rec.url + "/api/v1/items", "POST", item, DEV) == (201, {"status": "stored"})
    assert call(rec.url + "/api/v1/items", "POST", item, DEV) == (200, {"status": "duplicate"})
    other = {**DEV, "X-Edgescreen-Device": "box-2"}
    assert call(rec.url + "/api/v1/items", "POST", item, other)[0] == 201, "keys are per device"
    health = {"key": "cloud.health:box-1:1", "kind": "cloud.health", "body": {"version": "9.9", "queue": {
        "queued": 3}, "outbox": {"pending": 1}, "disk": {"free_gb": 12.5}, "power": {"state": "mains"}}}
    assert call(rec.url + "/api/v1/items", "POST", health, DEV)[0] == 201
    # what the receiver refuses, and says why
    assert call(rec.url + "/api/v1/items", "POST", {**item, "kind": "cloud.bogus"}, DEV)[0] == 422
    assert call(rec.url + "/api/v1/items", "POST", {"kind": "cloud.finding"}, DEV)[0] == 400
    assert call(rec.url + "/api/v1/items", "POST", {**item, "key": "bad key!"}, DEV)[0] == 400
    assert call(rec.url + "/api/v1/items", "POST", b"not json", DEV)[0] == 400
    assert call(rec.url + "/api/v1/items", "POST", item)[0] == 400, "no device name"
    outside = {"key": "cloud.finding:out", "kind": "cloud.finding", "group": "cloud:s2", "body": {
        "study": "2.25.2", "pipeline": "mammo", "triage": "indeterminate", "abnormal_probability": 0.8, "threshold": 0.79,
        "domain": {"in_domain": False, "reasons": ["the mammo model card states no validated domain"]}}}
    assert call(rec.url + "/api/v1/items", "POST", outside, DEV)[0] == 201
    status, page = call(rec.url + "/")
    assert status == 200 and "box-1" in page and "Clinic One" in page and "suspicious" in page
    assert "no: the mammo model card states no validated domain" in page, "why a finding is indeterminate"
    assert "RESEARCH USE ONLY" in page and "edgescreen 9.9" in page and "queue 3" in page
    sites = {s["device_id"]: s for s in call(rec.url + "/api/v1/sites")[1]["sites"]}
    assert sites["box-1"]["counts"]["cloud.finding"] == 2 and sites["box-2"]["counts"]["cloud.finding"] == 1
    assert sites["box-1"]["last_contact"] > time.time() - 60
    import sqlite3

    with contextlib.closing(sqlite3.connect(rec.data_dir / "receiver.db", timeout=30)) as db:
        assert db.execute("SELECT COUNT(*) FROM items WHERE idempotency_key = 'cloud.finding:abc'").fetchone()[0] == 2
        with pytest.raises(sqlite3.IntegrityError):  # the constraint itself, not Python, refuses a second row
            db.execute("INSERT INTO items (device_id, idempotency_key, kind, received_at, size, sha256) "
                       "VALUES ('box-1', 'cloud.finding:abc', 'cloud.finding', 0, 0, '')")


def _upload(url: str, key: str, data: bytes, headers: dict, *, upto: int | None = None, chunk: int = 1000) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    status, opened = call(url + "/api/v1/uploads", "POST", {"key": key, "kind": "cloud.seg", "group": None,
                                                            "size": len(data), "sha256": digest}, headers)
    assert status == 200, opened
    if opened.get("status") == "duplicate":
        return opened
    upload, offset = opened["upload"], opened["offset"]
    stop = len(data) if upto is None else upto
    while offset < stop:
        status, answer = call(url + f"/api/v1/uploads/{upload}", "PUT", data[offset:offset + chunk],
                              {**headers, "Upload-Offset": str(offset)})
        assert status == 200, answer
        offset = answer["offset"]
    if upto is not None:
        return {"status": "partial", "upload": upload, "offset": offset}
    return call(url + f"/api/v1/uploads/{upload}/complete", "POST", b"", headers)[1]


def test_uploads_resume_where_they_stopped_and_are_checked(shared: Receiver) -> None:
    data = os.urandom(5500)
    rec, dev = shared, {"X-Edgescreen-Device": "box-up"}  # this test's own device
    partial = _upload(rec.url, "cloud.seg:k1", data, dev, upto=3000)
    assert partial["offset"] == 3000
    # a new client (the sync service after a restart) opens it again and is told where it stands
    status, again = call(rec.url + "/api/v1/uploads", "POST", {"key": "cloud.seg:k1", "kind": "cloud.seg",
                         "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, dev)
    assert (status, again["upload"], again["offset"]) == (200, partial["upload"], 3000)
    # a chunk at the wrong offset is refused with the offset to continue from
    status, answer = call(rec.url + f"/api/v1/uploads/{partial['upload']}", "PUT", data[:1000],
                          {**dev, "Upload-Offset": "0"})
    assert (status, answer["offset"]) == (409, 3000)
    assert _upload(rec.url, "cloud.seg:k1", data, dev) == {"status": "stored"}
    assert _upload(rec.url, "cloud.seg:k1", data, dev) == {"status": "duplicate"}
    # damaged on the way: the digest does not match, the upload is reset, nothing is stored
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    status, opened = call(rec.url + "/api/v1/uploads", "POST", {"key": "cloud.seg:k3", "kind": "cloud.seg",
                          "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, dev)
    call(rec.url + f"/api/v1/uploads/{opened['upload']}", "PUT", tampered, {**dev, "Upload-Offset": "0"})
    status, answer = call(rec.url + f"/api/v1/uploads/{opened['upload']}/complete", "POST", b"", dev)
    assert status == 422 and "sha256" in answer["error"]
    sites = {s["device_id"]: s for s in call(rec.url + "/api/v1/sites")[1]["sites"]}
    assert sites["box-up"]["counts"]["cloud.seg"] == 1


def test_device_tokens(tmp_path: Path) -> None:
    data_dir = tmp_path / "cloud"
    proc = subprocess.run([*EDGESCREEN, "cloud-receiver", "--data-dir", str(data_dir), "--add-device", "clinic-7",
                           "--site", "Clinic 7"], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip().splitlines()[-1]
    assert len(token) > 30 and token.encode() not in stored_bytes(data_dir), "stored hashed"
    item = {"key": "cloud.finding:t1", "kind": "cloud.finding", "body": {"triage": "not_suspicious"}}
    with receiver(data_dir) as rec:
        assert call(rec.url + "/api/v1/items", "POST", item, DEV)[0] == 401, "no token, no entry"
        wrong = {"Authorization": "Bearer nope", "X-Edgescreen-Device": "clinic-7"}
        status, answer = call(rec.url + "/api/v1/items", "POST", item, wrong)
        assert status == 401 and "token" in answer["error"]
        good = {"Authorization": f"Bearer {token}", "X-Edgescreen-Device": "someone-else"}
        assert call(rec.url + "/api/v1/items", "POST", item, good)[0] == 201
        sites = call(rec.url + "/api/v1/sites")[1]["sites"]
        assert [s["device_id"] for s in sites] == ["clinic-7"], "the token names the device, not the header"


def test_a_bad_database_url_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([*EDGESCREEN, "cloud-receiver", "--data-dir", str(tmp_path), "--port", str(free_port()),
                           "--database-url", f"postgresql://nobody@127.0.0.1:{free_port()}/none"],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "cannot use the database" in proc.stderr and "Traceback" not in proc.stderr


@requires_postgres
def test_two_receiver_processes_on_one_postgresql_keep_each_item_once(tmp_path: Path) -> None:
    with postgres() as pg, receiver(tmp_path / "a", "--allow-any-device", database_url=pg.url, name="a") as a, \
            receiver(tmp_path / "b", "--allow-any-device", database_url=pg.url, name="b") as b:
        # the same 20 items posted to both processes at once, from 4 threads: the database keeps one of each
        results: list[int] = []
        lock = threading.Lock()

        def post(url: str, start: int) -> None:
            for i in range(20):
                key = f"cloud.finding:{(i + start) % 20}"
                status, _ = call(url + "/api/v1/items", "POST",
                                 {"key": key, "kind": "cloud.finding", "body": {"n": i}}, DEV)
                with lock:
                    results.append(status)

        threads = [threading.Thread(target=post, args=(url, k * 7)) for k in range(2) for url in (a.url, b.url)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(201) == 20 and results.count(200) == 60, sorted(set(results))
        assert pg.psql("SELECT COUNT(*), COUNT(DISTINCT idempotency_key) FROM items").strip() == "20|20"
        # an upload begun at one process is finished at the other
        data = os.urandom(4000)
        partial = _upload(a.url, "cloud.sr:x", data, DEV, upto=2000)
        assert _upload(b.url, "cloud.sr:x", data, DEV) == {"status": "stored"}
        assert pg.psql("SELECT size, sha256 FROM items WHERE idempotency_key = 'cloud.sr:x'").strip() == \
            f"4000|{hashlib.sha256(data).hexdigest()}"
        assert partial["offset"] == 2000
        assert "CONSTRAINT items_device_key UNIQUE (device_id, idempotency_key)" in pg.dump().decode()
        assert call(b.url + "/healthz")[0] == 200
