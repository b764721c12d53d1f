"""The power-aware scheduler with every real component: the DICOM service receiving the study and the
scanner's MPPS, NUT's upsd with the dummy-ups driver as the UPS, and a worker running the real
pancreas cascade. A job is preempted within one tile batch of MPPS IN PROGRESS, resumes after
COMPLETED plus the grace period, and its findings equal an uninterrupted run's."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

from pydicom.uid import generate_uid

from edgescreen.models.phantom.ct import write_ct_study
from edgescreen.models.phantom.mg import write_mg_exam
from tests.conftest import EDGESCREEN, REPO, run_cli
from tests.nut_server import nut_ups
from tests.test_dicom_mpps import MppsScu, _create_attrs
from tests.test_dicom_support import SERVICE_ENV, dicom_server, open_store, requires_dcmtk, storescu

pytestmark = requires_dcmtk

GRACE_S = 4


def _config(tmp_path: Path, nut_host: str, nut_port: int, ups: str) -> tuple[Path, str]:
    path = tmp_path / "site.toml"
    text = f"""
[dicom]
allow_any_ae = true
stable_after_s = 1

[scheduler]
idle_grace_s = {GRACE_S}
store_quiet_s = 1
lease_s = 30

[power]
nut_host = "{nut_host}"
nut_port = {nut_port}
nut_ups = "{ups}"
min_battery_percent = 40
min_runtime_min = 1
"""
    path.write_text(text)
    return path, text


def _worker(config: Path, data_dir: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([*EDGESCREEN, "--config", str(config), "--data-dir", str(data_dir), "worker", "--poll", "0.2"],
                            cwd=REPO, env=SERVICE_ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115


def _wait(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{log.read_text()[-3000:]}" if log else ""))


def _tile(stage: str | None) -> int | None:
    match = re.search(r"@(\d+)$", stage or "")
    return int(match.group(1)) if match else None


def _comparable(findings: dict) -> dict:
    return {"triage": findings["triage"], "pancreas_volume_ml": findings.get("pancreas_volume_ml"),
            "lesions": [{k: v for k, v in lesion.items() if "time" not in k} for lesion in findings["lesions"]]}


def test_mpps_preempts_within_one_tile_batch_and_the_job_resumes_identically(tmp_path: Path) -> None:
    study = tmp_path / "ct"
    write_ct_study(study, 300_011, lesion="pdac", slices=160)
    reference = tmp_path / "reference"
    run_cli("analyze", str(study), "--out", str(reference), "--batch-size", "1", data_dir=tmp_path / "ref-data",
            timeout=900, check=True)
    expected = json.loads((reference / "findings.json").read_text())

    with nut_ups(tmp_path, "ups.status: OL\nbattery.charge: 100\nbattery.runtime: 3600\n") as ups:
        config, config_text = _config(tmp_path, ups.host, ups.port, ups.ups)
        data_dir = tmp_path / "data"
        with dicom_server(tmp_path, config=config_text, data_dir=data_dir) as server:
            storescu(server.port, sorted(study.glob("*.dcm")))
            store = open_store(data_dir)
            server.wait_for(lambda: store.query_one("SELECT id FROM jobs WHERE pipeline = 'pancreas'"), 60, "a job")
            log = tmp_path / "worker.log"
            worker = _worker(config, data_dir, log)
            try:
                # the worker reaches stage 1's sliding window: its safe points are tile batches
                # (the stage column says "stage1" and how far; the tile index is in the safe point it stops at)
                _wait(lambda: (r := store.query_one("SELECT stage, progress FROM jobs")) and r[0] == "stage1"
                      and 0 < (r[1] or 0) < 0.5, 600, "stage 1 tile batches", log)
                scanner = MppsScu(server.port)
                uid = generate_uid()
                assert scanner.create(uid, _create_attrs()) == 0x0000
                t_busy = time.monotonic()
                job = _wait(lambda: (r := store.query_one("SELECT * FROM jobs")) and r["state"] == "queued" and r,
                            120, "preemption", log)
                latency = time.monotonic() - t_busy
                assert "MPPS exam in progress" in job["waiting_reason"]
                preempted = json.loads(store.query_one(
                    "SELECT detail FROM events WHERE kind = 'job' AND state = 'preempted'")[0])
                # it stopped at the next safe point of stage 1's sliding window, between two tile batches: within
                # one batch of the scanner going busy (the MPPS source is read at every safe point)
                assert preempted["at"].startswith("pancreas.stage1.tiles@") and (_tile(preempted["at"]) or 0) > 0, preempted
                assert latency < 30, f"preemption took {latency:.1f} s"
                print(f"preemption latency {latency:.2f} s, stopped at {preempted['at']}")

                time.sleep(2)
                assert store.query_one("SELECT state FROM jobs")[0] == "queued", "ran while the scanner was busy"
                assert scanner.set(uid, "COMPLETED") == 0x0000
                t_idle = time.monotonic()
                _wait(lambda: store.query_one("SELECT state FROM jobs")[0] == "running", 120, "resumption", log)
                assert time.monotonic() - t_idle >= GRACE_S - 0.5, "resumed before the idle grace period"
                _wait(lambda: store.query_one("SELECT state FROM jobs")[0] == "done", 900, "completion", log)
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=120)
            states = [r[0] for r in store.query("SELECT state FROM events WHERE kind = 'job' ORDER BY id")]
            assert states[:4] == ["started", "preempted", "resumed", "done"], states
            result = store.query_one("SELECT findings FROM results")
            assert _comparable(json.loads(result[0])) == _comparable(expected)


def test_battery_and_low_battery_keep_work_waiting_with_reasons(tmp_path: Path) -> None:
    exam = tmp_path / "mg"
    write_mg_exam(exam, 31)
    sequence = ("ups.status: OB DISCHRG\nbattery.charge: 30\nbattery.runtime: 1200\nTIMER 10\n"
                "ups.status: OB DISCHRG LB\nbattery.charge: 8\nbattery.runtime: 120\nTIMER 600\n")
    with nut_ups(tmp_path, sequence) as ups:
        config, config_text = _config(tmp_path, ups.host, ups.port, ups.ups)
        data_dir = tmp_path / "data"
        # the DICOM service keeps running: without its heartbeat the scanner's state would be unknown
        with dicom_server(tmp_path, config=config_text, data_dir=data_dir) as server:
            storescu(server.port, sorted(exam.glob("*.dcm")))
            store = open_store(data_dir)
            server.wait_for(lambda: store.query_one("SELECT id FROM jobs"), 60, "a job")
            log = tmp_path / "worker.log"
            worker = _worker(config, data_dir, log)
            try:
                reason = lambda: store.query_one("SELECT waiting_reason FROM jobs")[0] or ""  # noqa: E731
                _wait(lambda: "on battery, 30% < 40%" in reason(), 60, "the battery reason", log)
                _wait(lambda: "UPS low battery" in reason(), 60, "the low-battery reason", log)
                assert store.query_one("SELECT state FROM jobs")[0] == "queued"
                assert not store.query("SELECT 1 FROM events WHERE kind = 'job' AND state = 'started'")
                power = [r[0] for r in store.query("SELECT state FROM events WHERE kind = 'power' ORDER BY id")]
                assert power[:2] == ["battery", "battery-low"], power
            finally:
                worker.send_signal(signal.SIGTERM)
                assert worker.wait(timeout=60) == 0
