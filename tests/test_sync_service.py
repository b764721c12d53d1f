"""`edgescreen sync` against a real receiver: the acceptance interface (`sync --once`, EDGESCREEN_CLOUD_URL,
`analyze --enqueue-sync`), link down and back, backoff with jitter, time windows, only-on-mains from a real
NUT UPS, the bandwidth cap, a resumable upload across a SIGKILL, heartbeats, the outbox commands, and what
a technician sees when an item cannot go (a corrupt result file, a refused device token, a failed study).

One receiver serves the whole module (each test is its own device, so counts never mix); a test starts a
process only where a process is what it tests (the CLI's exit codes and messages, SIGKILL, SIGTERM).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from edgescreen.appliance.config.site import SiteConfig
from edgescreen.appliance.context import AppContext
from edgescreen.appliance.store import Store, outbox
from edgescreen.appliance.sync.service import LINK_PROBE_MAX_S, SyncService, in_windows
from edgescreen.appliance.sync.status import summary
from tests.conftest import EDGESCREEN, REPO, free_port
from tests.fault_proxy import FaultProxy
from tests.test_cloud_receiver import ENV, Receiver, call, receiver, stored_bytes
from tests.test_sync_drill import PATIENT, patient_file, queue_items, sync_config, sync_process

FAST = {"retry_base_s": 0.05, "retry_max_s": 0.4, "timeout_s": 5, "heartbeat_s": 3600, "interval_s": 0.2,
        "chunk_kib": 4}


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    with receiver(tmp_path_factory.mktemp("cloud"), "--allow-any-device") as r:
        yield r


def cli(data_dir: Path, *args: str, config: Path | None = None, env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [*EDGESCREEN, *(["--config", str(config)] if config else []), "--data-dir", str(data_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, cwd=REPO,
                          timeout=timeout)


def stored(url: str, device: str | None = None) -> dict[str, int]:
    sites = [s for s in call(url + "/api/v1/sites")[1]["sites"] if device is None or s["device_id"] == device]
    return {k: sum(s["counts"][k] for s in sites) for k in ("cloud.finding", "cloud.seg", "cloud.sr",
                                                            "cloud.health")}


def service(data_dir: Path, url: str, device: str, **sync: object) -> SyncService:
    """The sync service in this process, with the drills' short timings; `sync` overrides [sync] keys."""
    config = SiteConfig.model_validate({"sync": {"url": url, "device_id": device, **FAST, **sync}})
    return SyncService(AppContext(config=config, data_dir=data_dir))


def test_sync_once_with_the_url_from_the_environment(tmp_path: Path, rec: Receiver) -> None:
    data_dir = tmp_path / "box"
    queue_items(data_dir, 10, patient_file(tmp_path / "src"), file_every=5)
    cfg = tmp_path / "site.toml"
    cfg.write_text('[sync]\ndevice_id = "env-box"\n')  # no url: it comes from the environment
    proc = cli(data_dir, "sync", "--once", config=cfg, env={"EDGESCREEN_CLOUD_URL": rec.url})
    assert proc.returncode == 0, proc.stderr
    assert stored(rec.url, "env-box") == {"cloud.finding": 8, "cloud.seg": 2, "cloud.sr": 0, "cloud.health": 1}
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert status["cloud"]["pending"] == 0 and status["cloud"]["sent"] == 11 and status["cloud"]["last_success"]
    again = service(data_dir, rec.url, "env-box")
    assert again.run_once() == 0 and stored(rec.url, "env-box")["cloud.finding"] == 8, "nothing is sent twice"
    again.close()
    db = stored_bytes(rec.data_dir)
    for needle in (PATIENT["PatientName"], PATIENT["PatientID"], PATIENT["AccessionNumber"]):
        assert needle.encode() not in db


def test_link_down_then_back(tmp_path: Path, rec: Receiver) -> None:
    data_dir = tmp_path / "box"
    queue_items(data_dir, 6, patient_file(tmp_path / "src"))
    with FaultProxy([rec.port]) as link:
        link.set_down(True)
        config = sync_config(tmp_path / "site.toml", link.url, device_id="link-box")
        down = cli(data_dir, "sync", "--once", "--max-attempts", "3", config=config)
        assert down.returncode == 1 and "cloud: 7 pending" in down.stderr and "cannot reach" in down.stderr
        state = summary(Store(data_dir))["cloud"]
        assert state["pending"] == 7 and state["link"] == "link-down" and "cannot reach" in state["last_error"]
        link.set_down(False)
        up = service(data_dir, link.url, "link-box")
        assert up.run_once() == 0
        up.close()
    assert stored(rec.url, "link-box")["cloud.finding"] == 6
    state = summary(Store(data_dir))["cloud"]
    assert state["pending"] == 0 and state["link"] == "ok"


def test_backoff_grows_with_jitter(tmp_path: Path, rec: Receiver) -> None:
    data_dir = tmp_path / "box"
    queue_items(data_dir, 1, patient_file(tmp_path / "src"))
    with FaultProxy([rec.port], faults={"http503": 1.0}, exempt=["/healthz"]) as proxy:
        sync = service(data_dir, proxy.url, "backoff-box", retry_base_s=10, retry_max_s=100)
        waits = []
        for _ in range(4):
            outbox.expedite(sync.store, ["cloud.finding"])  # skip the wait: the backoff is what we read
            before = time.time()
            sync.cloud_round(force_probe=True)
            row = sync.store.query_one("SELECT attempts, next_attempt_at, last_error FROM outbox")
            waits.append((row["attempts"], row["next_attempt_at"] - before))
            assert "HTTP 503" in row["last_error"]
        sync.close()
    for attempts, wait in waits:  # equal jitter: between half and all of base * 2**(attempt-1), capped
        step = min(100, 10 * 2 ** (attempts - 1))
        assert step / 2 - 1 <= wait <= step + 1, (attempts, wait)
    assert [a for a, _ in waits] == [1, 2, 3, 4]
    assert len({round(w, 3) for _, w in waits}) == 4


def test_the_link_probe_backs_off_but_never_beyond_its_cap(tmp_path: Path) -> None:
    """A link down all night must not leave the backlog waiting the items' long backoff once it is back: the
    probe (one GET) backs off with jitter up to LINK_PROBE_MAX_S, whatever retry_max_s says."""
    sync = service(tmp_path / "box", f"http://127.0.0.1:{free_port()}", "probe-box", retry_base_s=5,
                   retry_max_s=3600)
    waits = []
    for _ in range(12):
        assert sync.cloud_round(force_probe=True)["waiting"] == 1
        waits.append(sync.link_retry_at - time.monotonic())
    sync.link_failures = 5000  # a week offline: the backoff's exponent is capped (2**5000 overflows a float)
    assert sync.cloud_round(force_probe=True)["waiting"] == 1
    waits.append(sync.link_retry_at - time.monotonic())
    sync.close()
    assert waits[0] <= 5 and max(waits) <= LINK_PROBE_MAX_S and waits[-1] >= LINK_PROBE_MAX_S / 2 - 1, waits


def test_windows_and_only_on_mains(tmp_path: Path, rec: Receiver) -> None:
    t = time.struct_time((2026, 1, 1, 23, 30, 0, 3, 1, 0))
    assert in_windows(["22:00-06:00"], t) and not in_windows(["08:00-17:00"], t) and in_windows([], t)
    data_dir = tmp_path / "box"
    queue_items(data_dir, 2, patient_file(tmp_path / "src"))
    now = time.localtime()
    closed = f"{(now.tm_hour + 2) % 24:02d}:00-{(now.tm_hour + 3) % 24:02d}:00"
    sync = service(data_dir, rec.url, "window-box", windows=[closed])
    assert sync.run_once() == 1 and stored(rec.url, "window-box")["cloud.finding"] == 0
    assert "outside the sync window" in summary(Store(data_dir))["cloud"]["last_error"]
    sync.close()

    from tests.nut_server import nut_ups

    with nut_ups(tmp_path, "ups.status: OB DISCHRG\nbattery.charge: 80\nbattery.runtime: 1800\n") as ups:
        power = {"nut_host": ups.host, "nut_port": ups.port, "nut_ups": ups.ups}

        def on_mains_service() -> SyncService:
            config = SiteConfig.model_validate({"sync": {"url": rec.url, "device_id": "window-box",
                                                         "only_on_mains": True, **FAST}, "power": power})
            return SyncService(AppContext(config=config, data_dir=data_dir))

        sync = on_mains_service()
        assert sync.run_once() == 1 and stored(rec.url, "window-box")["cloud.finding"] == 0
        assert "on battery" in summary(Store(data_dir))["cloud"]["last_error"]
        # the mains come back: the UPS now reports OL (dummy-ups re-reads its sequence file)
        seq = ups.directory / f"{ups.ups}.seq"
        seq.with_suffix(".new").write_text("ups.status: OL\nbattery.charge: 100\nbattery.runtime: 3600\n")
        seq.with_suffix(".new").replace(seq)
        deadline = time.monotonic() + 30
        while sync.gate(time.time()) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sync.gate(time.time()) is None, "the UPS never reported mains"
        assert sync.run_once() == 0
        sync.close()
    assert stored(rec.url, "window-box")["cloud.finding"] == 2


def test_bandwidth_cap_and_an_upload_resumed_after_sigkill(tmp_path: Path, rec: Receiver) -> None:
    """A 64 KiB item at 16 KiB/s in 4 KiB chunks: killed mid-upload, the next run continues where it was."""
    src = patient_file(tmp_path / "src")
    ds = pydicom.dcmread(src)
    ds.PixelData = bytes(len(ds.PixelData)) * 8
    ds.Rows = ds.Rows * 8
    ds.save_as(src)
    data_dir = tmp_path / "box"
    queue_items(data_dir, 1, src, file_every=1)
    with FaultProxy([rec.port]) as proxy:
        config = sync_config(tmp_path / "site.toml", proxy.url, max_kib_s=16, device_id="cap-box")
        proc = sync_process(data_dir, config, "--poll", "0.1", log=tmp_path / "sync.log")
        store = Store(data_dir)
        deadline = time.monotonic() + 60
        progress = None
        while time.monotonic() < deadline and progress is None:
            row = store.query_one("SELECT progress FROM outbox WHERE kind = 'cloud.seg'")
            if row["progress"] and json.loads(row["progress"])["sent"] >= 16 * 1024:
                progress = json.loads(row["progress"])
            time.sleep(0.1)
        assert progress is not None, (tmp_path / "sync.log").read_text()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        size = progress["size"]
        assert progress["sent"] < size, "killed mid-upload"
        chunks_before = proxy.counts["pass"]
        sync = service(data_dir, proxy.url, "cap-box", max_kib_s=16)
        started = time.monotonic()
        assert sync.run_once() == 0
        elapsed = time.monotonic() - started
        sync.close()
        assert stored(rec.url, "cap-box")["cloud.seg"] == 1
        resent_chunks = proxy.counts["pass"] - chunks_before - 3  # minus probe, open, complete (+ heartbeat)
        assert resent_chunks < -(-size // 4096), "the upload resumed instead of starting over"
        left = size - progress["sent"]
        assert elapsed >= (left / (16 * 1024)) * 0.7, "the bandwidth cap held"


def test_heartbeats_carry_health_and_supersede_each_other(tmp_path: Path) -> None:
    data_dir = tmp_path / "box"
    sync = service(data_dir, f"http://127.0.0.1:{free_port()}", "beat-box", heartbeat_s=10)
    first = sync.heartbeat(1000.0)
    assert sync.heartbeat(1005.0) is None, "not due yet"
    second = sync.heartbeat(1011.0)
    third = sync.heartbeat(900.0)
    assert third is not None, "a clock set back makes a heartbeat due at once, not after the gap"
    rows = {r["id"]: r["state"] for r in sync.store.query("SELECT id, state FROM outbox")}
    assert rows == {first: "superseded", second: "superseded", third: "pending"}
    body = json.loads(sync.store.query_one("SELECT payload FROM outbox WHERE id = ?", (third,))[0])["health"]
    assert {"queue", "disk", "power", "version", "bundle", "last_errors", "outbox"} <= set(body)
    assert body["disk"]["free_gb"] > 0
    sync.close()


def test_heartbeat_errors_leave_without_what_they_quote(tmp_path: Path) -> None:
    """A failed job's error quotes a header (a study description naming the patient) and a file path: the
    heartbeat's last errors keep the sentence, not the quote, the path or the patient's identifiers."""
    from edgescreen.appliance.sync.health import health

    store = Store(tmp_path / "box")
    now = time.time()
    with store.transaction() as conn:
        conn.execute("INSERT INTO studies (study_uid, patient_id, patient_name, accession, received_at, updated_at) "
                     "VALUES ('1.2.3.4.5', 'MRN-5521', 'ROE^RICHARD', 'ACC-1', ?, ?)", (now, now))
        conn.execute("INSERT INTO series (series_uid, study_uid, first_received_at, last_received_at) VALUES "
                     "('1.2.3.4.5.1', '1.2.3.4.5', ?, ?)", (now, now))
        conn.execute("INSERT INTO jobs (study_uid, series_uid, pipeline, state, error, created_at, updated_at) VALUES "
                     "('1.2.3.4.5', '1.2.3.4.5.1', 'pancreas', 'failed', ?, ?, ?)",
                     ("series 'CT ABD FOR ROE RICHARD' unreadable: /data/incoming/ROE_RICHARD/1.2.3.4.5.9.dcm "
                      "(patient MRN-5521)", now, now))
    errors = health(store, SiteConfig(), device_id="d")["last_errors"]
    text = json.dumps(errors)
    assert errors and "unreadable" in text
    for needle in ("ROE", "RICHARD", "MRN-5521", "CT ABD", "/data/incoming", "1.2.3.4.5"):
        assert needle not in text, (needle, text)


def test_outbox_list_and_retry(tmp_path: Path, rec: Receiver) -> None:
    """A study whose SEG file is gone: the SEG fails (a technician sees why), the study's SR waits behind it
    (blocked, not retried in a loop), other studies go; after the file is back and a retry, all arrive."""
    data_dir = tmp_path / "box"
    src = patient_file(tmp_path / "src")
    queue_items(data_dir, 3, src, file_every=2)  # one study: summary, SEG, summary
    src.unlink()  # the result file is gone before it could be sent: a permanent failure
    sync = service(data_dir, rec.url, "retry-box")
    started = time.monotonic()
    assert sync.run_once(deadline_s=120) == 1
    assert time.monotonic() - started < 60, "a run with nothing left to move ends, it does not spin to the deadline"
    assert sync.remaining() == {"due": 0, "failed": 1, "blocked": 1}
    listing = cli(data_dir, "outbox", "list", "--json")
    items = json.loads(listing.stdout)["items"]
    failed = [i for i in items if i["state"] == "failed"]
    assert len(failed) == 1 and "result file missing" in failed[0]["last_error"]
    assert "payload" not in failed[0], "the listing never shows payloads (local paths, the original study)"
    assert json.loads(listing.stdout)["summary"]["cloud"]["blocked"] == 1
    text = cli(data_dir, "outbox", "list").stdout
    assert "cloud: 1 pending (1 behind a failed item of their study), 1 failed" in text, text
    assert "result file missing" in text
    patient_file(tmp_path / "src2")
    src.write_bytes((tmp_path / "src2" / src.name).read_bytes())
    retried = cli(data_dir, "outbox", "retry", str(failed[0]["id"]), "--actor", "tech-anna")
    assert retried.returncode == 0, retried.stderr
    assert sync.run_once() == 0
    sync.close()
    assert stored(rec.url, "retry-box")["cloud.seg"] == 1 and stored(rec.url, "retry-box")["cloud.finding"] == 2
    audit = Store(data_dir).query_one("SELECT actor, action, target FROM audit WHERE action = 'outbox.retry'")
    assert tuple(audit) == ("tech-anna", "outbox.retry", str(failed[0]["id"]))


def test_a_corrupt_result_file_fails_its_item_not_the_run(tmp_path: Path, rec: Receiver) -> None:
    data_dir = tmp_path / "box"
    src = patient_file(tmp_path / "src")
    keys, _ = queue_items(data_dir, 8, src, file_every=4)  # two studies, each ending with a SEG
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not DICOM at all " * 64)
    store = Store(data_dir)
    seg = store.query_one("SELECT id, payload FROM outbox WHERE kind = 'cloud.seg' ORDER BY id LIMIT 1")
    with store.transaction() as conn:  # (test setup: the first study's SEG names a damaged file)
        conn.execute("UPDATE outbox SET payload = ? WHERE id = ?",
                     (json.dumps({**json.loads(seg["payload"]), "file": str(bad)}), seg["id"]))
    sync = service(data_dir, rec.url, "corrupt-box")
    assert sync.run_once() == 1
    sync.close()
    row = store.query_one("SELECT state, attempts, last_error FROM outbox WHERE id = ?", (seg["id"],))
    assert row["state"] == "failed" and row["attempts"] == 1 and "not readable DICOM" in row["last_error"]
    assert stored(rec.url, "corrupt-box")["cloud.finding"] == 6 and stored(rec.url, "corrupt-box")["cloud.seg"] == 1


def test_a_refused_device_token_costs_no_attempts_and_says_what_to_fix(tmp_path: Path, rec: Receiver) -> None:
    from edgescreen.appliance.cloud.db import ReceiverDB, engine_for

    token = ReceiverDB(engine_for(None, rec.data_dir)).add_device("token-box", "Token Clinic")
    data_dir = tmp_path / "box"
    queue_items(data_dir, 4, patient_file(tmp_path / "src"))
    (tmp_path / "token").write_text("not-the-token\n")
    sync = service(data_dir, rec.url, "ignored-name", token_file=str(tmp_path / "token"))
    assert sync.run_once(max_attempts=3) == 1
    state = summary(Store(data_dir))["cloud"]
    assert state["link"] == "refused" and "sync.token_file" in state["last_error"]
    attempts = [r[0] for r in Store(data_dir).query("SELECT attempts FROM outbox WHERE kind = 'cloud.finding'")]
    assert attempts == [0, 0, 0, 0], "the device was refused, not the items: they keep their attempts"
    (tmp_path / "token").write_text(token + "\n")  # fixed while the service runs: no restart needed
    assert sync.run_once() == 0
    sync.close()
    assert stored(rec.url, "token-box")["cloud.finding"] == 4, "the token names the device"


def test_sync_service_stops_on_sigterm(tmp_path: Path, rec: Receiver) -> None:
    data_dir = tmp_path / "box"
    queue_items(data_dir, 3, patient_file(tmp_path / "src"))
    proc = sync_process(data_dir, sync_config(tmp_path / "site.toml", rec.url, device_id="term-box"), "--poll", "0.2",
                        log=tmp_path / "sync.log")
    deadline = time.monotonic() + 60
    while stored(rec.url, "term-box")["cloud.finding"] < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stored(rec.url, "term-box")["cloud.finding"] == 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize("bad", ['url = "http://example.org/"', 'windows = ["9-17"]'])
def test_bad_sync_config_is_a_clear_error(tmp_path: Path, bad: str) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(f"[sync]\n{bad}\n")
    proc = cli(tmp_path / "d", "sync", "--once", config=cfg)
    assert proc.returncode == 2 and ("https" in proc.stderr or "HH:MM" in proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr


def test_analyze_enqueue_sync_delivers_summary_seg_and_sr(tmp_path: Path, rec: Receiver) -> None:
    from tests.test_deid import PHI, _identify
    from tests.test_pancreas_pipeline import write_study, write_test_models

    models = write_test_models(tmp_path / "models")
    write_study(tmp_path / "ct")
    _identify(tmp_path / "ct")
    data_dir = tmp_path / "box"
    proc = cli(data_dir, "analyze", str(tmp_path / "ct"), "--out", str(tmp_path / "out"), "--models", str(models),
               "--enqueue-sync")
    assert proc.returncode == 0, proc.stderr
    assert "queued for sync: outbox item(s)" in proc.stdout
    kinds = [r["kind"] for r in Store(data_dir).query("SELECT kind FROM outbox ORDER BY id")]
    assert kinds == ["cloud.finding", "cloud.seg", "cloud.sr"], "one study's items, in order"
    sync = service(data_dir, rec.url, "analyze-box")
    assert sync.run_once() == 0
    sync.close()
    assert stored(rec.url, "analyze-box") == {"cloud.finding": 1, "cloud.seg": 1, "cloud.sr": 1, "cloud.health": 1}
    site = next(s for s in call(rec.url + "/api/v1/sites")[1]["sites"] if s["device_id"] == "analyze-box")
    finding = site["findings"][0]
    assert finding["triage"] == "suspicious" and finding["study"].startswith("2.25.")
    study = json.loads((tmp_path / "out" / "findings.json").read_text())["study_uid"]
    db = stored_bytes(rec.data_dir)
    for needle in (PHI["PatientName"], PHI["PatientID"], PHI["AccessionNumber"], study):
        assert needle.encode() not in db, f"{needle} reached the receiver"


def test_phi_leaves_only_when_the_site_says_so(tmp_path: Path, rec: Receiver) -> None:
    """The same SEG queued twice: de-identified by default; with send_phi (at queueing AND sending) as it is."""
    from edgescreen.appliance.sync.enqueue import cloud_items

    src = patient_file(tmp_path / "src")
    ds = pydicom.dcmread(src)
    ds.PatientID = "AGREED-PHI-4417"  # this test's own patient: the shared receiver keeps the others' checks
    ds.save_as(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "seg.dcm").write_bytes(src.read_bytes())
    findings = {"pipeline": "pancreas", "triage": "suspicious", "study_uid": "1.2.3.4.5.6", "outputs": ["seg.dcm"]}
    for send_phi, box in ((False, "phi-a"), (True, "phi-b")):
        data_dir = tmp_path / box
        cfg = SiteConfig.model_validate({"sync": {"url": rec.url, "send_phi": send_phi, "device_id": box}})
        store = Store(data_dir)
        with store.transaction() as conn:
            outbox.add_items(conn, cloud_items(cfg, data_dir=data_dir, study_uid="1.2.3.4.5.6",
                                               findings=findings, outputs=[out / "seg.dcm"]))
        sync = SyncService(AppContext(config=cfg, data_dir=data_dir))
        assert sync.run_once() == 0
        sync.close()
        arrived = b"AGREED-PHI-4417" in stored_bytes(rec.data_dir)
        assert arrived is send_phi, f"send_phi = {send_phi}, but the patient ID arrived: {arrived}"


def test_sync_to_the_receiver_over_tls_with_a_pinned_ca(tmp_path: Path, rec: Receiver) -> None:
    from tests.test_export_orthanc import _tls_material

    ca_pem, server_pem = _tls_material(tmp_path)
    data_dir = tmp_path / "box"
    queue_items(data_dir, 3, patient_file(tmp_path / "src"))
    with FaultProxy([rec.port], tls_cert=str(server_pem)) as front:
        assert front.url.startswith("https://")
        refused = service(data_dir, front.url, "tls-box")
        assert refused.run_once(max_attempts=2) == 1
        refused.close()
        assert "TLS verification" in summary(Store(data_dir))["cloud"]["last_error"]
        assert front.counts["tls_refused"] >= 1
        pinned = service(data_dir, front.url, "tls-box", ca_file=str(ca_pem))
        assert pinned.run_once() == 0
        pinned.close()
    assert stored(rec.url, "tls-box")["cloud.finding"] == 3


def test_an_unusable_site_secret_never_costs_a_finished_job_its_result(tmp_path: Path) -> None:
    """The worker writes a finished job's result and exports in one transaction: a damaged de-identification
    secret must not fail it. The PACS item is queued; the cloud items are not (the log says why and how)."""
    from edgescreen.appliance.sync.enqueue import outbox_items_for_result

    secret = tmp_path / "deid-secret"
    secret.write_text("short\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "seg.dcm").write_bytes(patient_file(tmp_path / "src").read_bytes())
    config = SiteConfig.model_validate({
        "sync": {"enabled": True, "url": "http://127.0.0.1:9", "deid": {"secret_file": str(secret)}},
        "dicom": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}})
    items = outbox_items_for_result(config, data_dir=tmp_path, study_uid="1.2.3.4.5.6",
                                    findings={"study_uid": "1.2.3.4.5.6", "outputs": ["seg.dcm"]}, out_dir=out)
    assert [i.kind for i in items] == ["pacs"]
    secret.write_text("b" * 64 + "\n")  # fixed: the study's cloud items can be queued
    kinds = [i.kind for i in outbox_items_for_result(config, data_dir=tmp_path, study_uid="1.2.3.4.5.6",
                                                     findings={"study_uid": "1.2.3.4.5.6", "outputs": ["seg.dcm"]},
                                                     out_dir=out)]
    assert kinds == ["pacs", "cloud.finding", "cloud.seg"]


def test_the_service_yields_to_a_running_analysis(tmp_path: Path, rec: Receiver) -> None:
    """While a worker holds a running job (a live lease), the service prepares and sends no cloud item, and
    says why; a technician's `sync --once` does not wait; once the job is over (or its worker died and the
    lease ran out) the service goes on."""
    from edgescreen.appliance.store import jobs

    data_dir = tmp_path / "box"
    queue_items(data_dir, 4, patient_file(tmp_path / "src"))
    store = Store(data_dir)
    now = time.time()
    with store.transaction() as conn:  # (test setup: a received series, as the DICOM service records it)
        conn.execute("INSERT INTO studies (study_uid, received_at, updated_at) VALUES ('1.2.3.9', ?, ?)", (now, now))
        conn.execute("INSERT INTO series (series_uid, study_uid, first_received_at, last_received_at) VALUES "
                     "('1.2.3.9.1', '1.2.3.9', ?, ?)", (now, now))
    jobs.enqueue(store, "1.2.3.9", "1.2.3.9.1", "pancreas")
    job = jobs.claim_next(store, "worker-host:1:w", 30)
    assert job is not None and job["state"] == "running"
    sync = service(data_dir, rec.url, "yield-box")
    counts = sync.cloud_round(yield_to_inference=True)
    assert counts["yielded"] == 1 and counts["sent"] == 0 and stored(rec.url, "yield-box")["cloud.finding"] == 0
    assert "analysis is running" in summary(store)["cloud"]["last_error"]
    assert sync.run_once() == 0, "a technician's sync --once does not wait"
    assert stored(rec.url, "yield-box")["cloud.finding"] == 4
    queue_items(data_dir, 3, patient_file(tmp_path / "src2"), seed=1)
    assert sync.cloud_round(yield_to_inference=True)["yielded"] == 1
    # the worker died: a minute later its lease has run out, and nothing holds the cloud back
    assert sync.cloud_round(time.time() + 60, yield_to_inference=True)["sent"] == 3
    sync.close()
    assert stored(rec.url, "yield-box")["cloud.finding"] == 7
