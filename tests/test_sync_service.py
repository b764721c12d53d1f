"""`edgescreen sync` against a real receiver: the acceptance interface (`sync --once`, EDGESCREEN_CLOUD_URL,
`analyze --enqueue-sync`), link down and back, backoff with jitter, time windows, only-on-mains from a real
NUT UPS, the bandwidth cap, a resumable upload across a SIGKILL, heartbeats, and the outbox commands."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from appliance.config.site import SiteConfig
from appliance.context import AppContext
from appliance.store import Store
from appliance.sync.service import SyncService, in_windows
from appliance.sync.status import summary
from tests.conftest import EDGESCREEN, REPO, free_port
from tests.fault_proxy import FaultProxy
from tests.test_cloud_receiver import ENV, call, receiver, stored_bytes
from tests.test_sync_drill import PATIENT, patient_file, queue_items, sync_config, sync_process


def cli(data_dir: Path, *args: str, config: Path | None = None, env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [*EDGESCREEN, *(["--config", str(config)] if config else []), "--data-dir", str(data_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, cwd=REPO,
                          timeout=timeout)


def stored(url: str) -> dict[str, int]:
    sites = call(url + "/api/v1/sites")[1]["sites"]
    return {k: sum(s["counts"][k] for s in sites) for k in ("cloud.finding", "cloud.seg", "cloud.sr",
                                                            "cloud.health")}


def test_sync_once_with_the_url_from_the_environment(tmp_path: Path) -> None:
    data_dir = tmp_path / "box"
    queue_items(data_dir, 10, patient_file(tmp_path / "src"), file_every=5)
    with receiver(tmp_path / "cloud", "--allow-any-device") as rec:
        proc = cli(data_dir, "sync", "--once", env={"EDGESCREEN_CLOUD_URL": rec.url})
        assert proc.returncode == 0, proc.stderr
        assert stored(rec.url) == {"cloud.finding": 8, "cloud.seg": 2, "cloud.sr": 0, "cloud.health": 1}
        status = json.loads(proc.stdout.strip().splitlines()[-1])
        assert status["cloud"]["pending"] == 0 and status["cloud"]["sent"] == 11 and status["cloud"]["last_success"]
        again = cli(data_dir, "sync", "--once", env={"EDGESCREEN_CLOUD_URL": rec.url})
        assert again.returncode == 0 and stored(rec.url)["cloud.finding"] == 8, "nothing is sent twice"
    db = stored_bytes(tmp_path / "cloud")
    for needle in (PATIENT["PatientName"], PATIENT["PatientID"], PATIENT["AccessionNumber"]):
        assert needle.encode() not in db


def test_link_down_then_back(tmp_path: Path) -> None:
    data_dir = tmp_path / "box"
    queue_items(data_dir, 6, patient_file(tmp_path / "src"))
    port = free_port()
    config = sync_config(tmp_path / "site.toml", f"http://127.0.0.1:{port}")
    down = cli(data_dir, "sync", "--once", "--max-attempts", "3", config=config)
    assert down.returncode == 1 and "cloud: 7 pending" in down.stderr and "cannot reach" in down.stderr
    state = summary(Store(data_dir))["cloud"]
    assert state["pending"] == 7 and state["link"] == "link-down" and "cannot reach" in state["last_error"]
    with receiver(tmp_path / "cloud", "--allow-any-device", port=port) as rec:
        up = cli(data_dir, "sync", "--once", config=config)
        assert up.returncode == 0, up.stderr
        assert stored(rec.url)["cloud.finding"] == 6
    state = summary(Store(data_dir))["cloud"]
    assert state["pending"] == 0 and state["link"] == "ok"


def test_backoff_grows_with_jitter(tmp_path: Path) -> None:
    data_dir = tmp_path / "box"
    queue_items(data_dir, 1, patient_file(tmp_path / "src"))
    with receiver(tmp_path / "cloud", "--allow-any-device") as rec, \
            FaultProxy([rec.port], faults={"http503": 1.0}, exempt=["/healthz"]) as proxy:
        config = SiteConfig.model_validate({"sync": {"url": proxy.url, "retry_base_s": 10, "retry_max_s": 100,
                                                     "heartbeat_s": 3600}})
        service = SyncService(AppContext(config=config, data_dir=data_dir))
        waits = []
        from appliance.store import outbox

        for _ in range(4):
            outbox.expedite(service.store, ["cloud.finding"])  # skip the wait: the backoff is what we read
            before = time.time()
            service.cloud_round(force_probe=True)
            row = service.store.query_one("SELECT attempts, next_attempt_at, last_error FROM outbox")
            waits.append((row["attempts"], row["next_attempt_at"] - before))
            assert "HTTP 503" in row["last_error"]
        service.close()
    for attempts, wait in waits:  # equal jitter: between half and all of base * 2**(attempt-1), capped
        step = min(100, 10 * 2 ** (attempts - 1))
        assert step / 2 - 1 <= wait <= step + 1, (attempts, wait)
    assert [a for a, _ in waits] == [1, 2, 3, 4]
    assert len({round(w, 3) for _, w in waits}) == 4


def test_windows_and_only_on_mains(tmp_path: Path) -> None:
    t = time.struct_time((2026, 1, 1, 23, 30, 0, 3, 1, 0))
    assert in_windows(["22:00-06:00"], t) and not in_windows(["08:00-17:00"], t) and in_windows([], t)
    data_dir = tmp_path / "box"
    queue_items(data_dir, 2, patient_file(tmp_path / "src"))
    now = time.localtime()
    closed = f"{(now.tm_hour + 2) % 24:02d}:00-{(now.tm_hour + 3) % 24:02d}:00"
    with receiver(tmp_path / "cloud", "--allow-any-device") as rec:
        config = sync_config(tmp_path / "site.toml", rec.url, windows=[closed])
        proc = cli(data_dir, "sync", "--once", config=config)
        assert proc.returncode == 1 and stored(rec.url)["cloud.finding"] == 0
        assert "outside the sync window" in summary(Store(data_dir))["cloud"]["last_error"]

        from tests.nut_server import nut_ups

        on_battery = "ups.status: OB DISCHRG\nbattery.charge: 80\nbattery.runtime: 1800\n"
        with nut_ups(tmp_path, on_battery) as ups:
            power = f'\n[power]\nnut_host = "{ups.host}"\nnut_port = {ups.port}\nnut_ups = "{ups.ups}"\n'
            config.write_text(sync_config(tmp_path / "s2.toml", rec.url, only_on_mains=True).read_text() + power)
            proc = cli(data_dir, "sync", "--once", config=config)
            assert proc.returncode == 1 and stored(rec.url)["cloud.finding"] == 0
            assert "on battery" in summary(Store(data_dir))["cloud"]["last_error"]
        on_mains = "ups.status: OL\nbattery.charge: 100\nbattery.runtime: 3600\n"
        (tmp_path / "n2").mkdir()
        with nut_ups(tmp_path / "n2", on_mains) as ups:
            power = f'\n[power]\nnut_host = "{ups.host}"\nnut_port = {ups.port}\nnut_ups = "{ups.ups}"\n'
            config.write_text(sync_config(tmp_path / "s3.toml", rec.url, only_on_mains=True).read_text() + power)
            proc = cli(data_dir, "sync", "--once", config=config)
            assert proc.returncode == 0, proc.stderr
            assert stored(rec.url)["cloud.finding"] == 2


def test_bandwidth_cap_and_an_upload_resumed_after_sigkill(tmp_path: Path) -> None:
    """A 64 KiB item at 16 KiB/s in 4 KiB chunks: killed mid-upload, the next run continues where it was."""
    import pydicom

    src = patient_file(tmp_path / "src")
    ds = pydicom.dcmread(src)
    ds.PixelData = bytes(len(ds.PixelData)) * 8
    ds.Rows = ds.Rows * 8
    ds.save_as(src)
    data_dir = tmp_path / "box"
    queue_items(data_dir, 1, src, file_every=1)
    with receiver(tmp_path / "cloud", "--allow-any-device") as rec, FaultProxy([rec.port]) as proxy:
        config = sync_config(tmp_path / "site.toml", proxy.url, max_kib_s=16)
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
        started = time.monotonic()
        done = cli(data_dir, "sync", "--once", config=config)
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        assert stored(rec.url)["cloud.seg"] == 1
        resent_chunks = proxy.counts["pass"] - chunks_before - 3  # minus probe, open, complete (+ heartbeat)
        assert resent_chunks < -(-size // 4096), "the upload resumed instead of starting over"
        left = size - progress["sent"]
        assert elapsed >= (left / (16 * 1024)) * 0.7, "the bandwidth cap held"


def test_heartbeats_carry_health_and_supersede_each_other(tmp_path: Path) -> None:
    data_dir = tmp_path / "box"
    config = SiteConfig.model_validate({"sync": {"url": f"http://127.0.0.1:{free_port()}", "heartbeat_s": 10}})
    service = SyncService(AppContext(config=config, data_dir=data_dir))
    first = service.heartbeat(1000.0)
    assert service.heartbeat(1005.0) is None, "not due yet"
    second = service.heartbeat(1011.0)
    rows = {r["id"]: r["state"] for r in service.store.query("SELECT id, state FROM outbox")}
    assert rows == {first: "superseded", second: "pending"}
    body = json.loads(service.store.query_one("SELECT payload FROM outbox WHERE id = ?", (second,))[0])["health"]
    assert {"queue", "disk", "power", "version", "bundle", "last_errors", "outbox"} <= set(body)
    assert body["disk"]["free_gb"] > 0
    service.close()


def test_outbox_list_and_retry(tmp_path: Path) -> None:
    data_dir = tmp_path / "box"
    src = patient_file(tmp_path / "src")
    queue_items(data_dir, 2, src, file_every=2)
    src.unlink()  # the result file is gone before it could be sent: a permanent failure
    with receiver(tmp_path / "cloud", "--allow-any-device") as rec:
        config = sync_config(tmp_path / "site.toml", rec.url)
        proc = cli(data_dir, "sync", "--once", config=config)
        assert proc.returncode == 1 and "1 failed" in proc.stderr
        listing = cli(data_dir, "outbox", "list", "--json")
        items = json.loads(listing.stdout)["items"]
        failed = [i for i in items if i["state"] == "failed"]
        assert len(failed) == 1 and "result file missing" in failed[0]["last_error"]
        assert "payload" not in failed[0], "the listing never shows payloads (local paths, the original study)"
        text = cli(data_dir, "outbox", "list").stdout
        assert "cloud: 0 pending, 1 failed" in text and "result file missing" in text
        patient_file(tmp_path / "src2")
        src.write_bytes((tmp_path / "src2" / src.name).read_bytes())
        retried = cli(data_dir, "outbox", "retry", str(failed[0]["id"]), "--actor", "tech-anna")
        assert retried.returncode == 0, retried.stderr
        assert cli(data_dir, "outbox", "retry", "9999").returncode == 2
        assert cli(data_dir, "sync", "--once", config=config).returncode == 0
        assert stored(rec.url)["cloud.seg"] == 1
    audit = Store(data_dir).query_one("SELECT actor, action, target FROM audit WHERE action = 'outbox.retry'")
    assert tuple(audit) == ("tech-anna", "outbox.retry", str(failed[0]["id"]))


def test_sync_service_stops_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "box"
    queue_items(data_dir, 3, patient_file(tmp_path / "src"))
    with receiver(tmp_path / "cloud", "--allow-any-device") as rec:
        proc = sync_process(data_dir, sync_config(tmp_path / "site.toml", rec.url), "--poll", "0.2",
                            log=tmp_path / "sync.log")
        deadline = time.monotonic() + 60
        while stored(rec.url)["cloud.finding"] < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stored(rec.url)["cloud.finding"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize("bad", ['url = "http://example.org/"', 'windows = ["9-17"]'])
def test_bad_sync_config_is_a_clear_error(tmp_path: Path, bad: str) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(f"[sync]\n{bad}\n")
    proc = cli(tmp_path / "d", "sync", "--once", config=cfg)
    assert proc.returncode == 2 and ("https" in proc.stderr or "HH:MM" in proc.stderr)


def test_analyze_enqueue_sync_delivers_summary_seg_and_sr(tmp_path: Path) -> None:
    from tests.test_deid import _identify
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
    with receiver(tmp_path / "cloud", "--allow-any-device") as rec:
        assert cli(data_dir, "sync", "--once", env={"EDGESCREEN_CLOUD_URL": rec.url}).returncode == 0
        assert stored(rec.url) == {"cloud.finding": 1, "cloud.seg": 1, "cloud.sr": 1, "cloud.health": 1}
        site = call(rec.url + "/api/v1/sites")[1]["sites"][0]
        finding = site["findings"][0]
        assert finding["triage"] == "suspicious" and finding["study"].startswith("2.25.")
    from tests.test_deid import PHI

    study = json.loads((tmp_path / "out" / "findings.json").read_text())["study_uid"]
    db = stored_bytes(tmp_path / "cloud")
    for needle in (PHI["PatientName"], PHI["PatientID"], PHI["AccessionNumber"], study):
        assert needle.encode() not in db, f"{needle} reached the receiver"


def test_phi_leaves_only_when_the_site_says_so(tmp_path: Path) -> None:
    """The same SEG queued twice: de-identified by default; with send_phi (at queueing AND sending) as it is."""
    from appliance.store import outbox
    from appliance.sync.enqueue import cloud_items

    src = patient_file(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "seg.dcm").write_bytes(src.read_bytes())
    findings = {"pipeline": "pancreas", "triage": "suspicious", "study_uid": "1.2.3.4.5.6", "outputs": ["seg.dcm"]}
    with receiver(tmp_path / "cloud", "--allow-any-device") as rec:
        for send_phi, box in ((False, "a"), (True, "b")):
            data_dir = tmp_path / box
            cfg = SiteConfig.model_validate({"sync": {"url": rec.url, "send_phi": send_phi, "device_id": box}})
            store = Store(data_dir)
            with store.transaction() as conn:
                outbox.add_items(conn, cloud_items(cfg, data_dir=data_dir, study_uid="1.2.3.4.5.6",
                                                   findings=findings, outputs=[out / "seg.dcm"]))
            service = SyncService(AppContext(config=cfg, data_dir=data_dir))
            assert service.run_once() == 0
            service.close()
            arrived = PATIENT["PatientID"].encode() in stored_bytes(tmp_path / "cloud")
            assert arrived is send_phi, f"send_phi = {send_phi}, but the patient ID arrived: {arrived}"
