"""The DICOM service's heartbeat: while it beats, MPPS and C-STORE activity are trusted; once it is killed
(or stopped) they are stale and the scheduler's fail-safe decides, with a reason that says so, instead of
reading the silence as "no exam". A restart re-checks only what was written since its last beat."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.conftest import run_cli
from tests.test_dicom_support import (
    dicom_server,
    open_store,
    requires_dcmtk,
    start_dicom,
    storescu,
    write_ct_series,
)

pytestmark = requires_dcmtk

CONFIG = """
[scheduler]
idle_grace_s = 0
store_quiet_s = 1
dicom_stale_s = 3
"""


def _status(tmp_path: Path, data_dir: Path) -> dict:
    config = tmp_path / "gate.toml"
    config.write_text(CONFIG)
    proc = run_cli("--config", str(config), "scanner", "status", "--json", data_dir=data_dir, check=True)
    return json.loads(proc.stdout)


def _signal(status: dict, source: str) -> dict:
    return next(s for s in status["signals"] if s["source"] == source)


def test_killed_dicom_service_makes_the_gate_fail_safe(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    srv = start_dicom(tmp_path, data_dir=data_dir, config=CONFIG)
    try:
        status = _status(tmp_path, data_dir)
        assert not _signal(status, "mpps")["stale"] and not _signal(status, "store")["stale"]
        assert status["gate_open"], status
        beat = open_store(data_dir).query_one("SELECT * FROM heartbeats WHERE service = 'dicom'")
        assert beat["pid"] == srv.proc.pid and beat["stopped_at"] is None
    finally:
        srv.proc.send_signal(signal.SIGKILL)  # a crash: no last word
        srv.proc.wait()
    time.sleep(4)
    status = _status(tmp_path, data_dir)
    for source in ("mpps", "store"):
        sig = _signal(status, source)
        assert sig["stale"] and "silent since" in sig["reason"], sig
    assert not status["gate_open"] and status["scanner_busy"]
    assert "fail-safe busy" in status["decision"], status["decision"]


def test_cleanly_stopped_service_is_stale_at_once_and_a_restart_beats_again(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    files = write_ct_series(tmp_path / "s", 3)
    with dicom_server(tmp_path, data_dir=data_dir, config=CONFIG) as srv:
        storescu(srv.port, files)
    status = _status(tmp_path, data_dir)
    assert "was stopped at" in _signal(status, "mpps")["reason"] and not status["gate_open"]
    beat = open_store(data_dir).query_one("SELECT * FROM heartbeats WHERE service = 'dicom'")
    assert beat["durable_before"] is not None and beat["stopped_at"] is not None
    with dicom_server(tmp_path, data_dir=data_dir, config=CONFIG) as srv:
        assert not _signal(_status(tmp_path, data_dir), "mpps")["stale"]
        # the second start looks only at series changed since the first service's last durable beat
        srv.wait_for(lambda: 'recovery done" scope="changed series"' in srv.log(), what="the bounded recovery")
