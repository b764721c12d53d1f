"""`edgescreen doctor`: named checks, OK / WARN / FAIL with a fix for each failure, against real peers on loopback
(the DICOM service and web UI it diagnoses, Orthanc as the PACS, NUT's upsd as the UPS)."""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, free_port, run_cli
from tests.nut_server import nut_ups, requires_nut
from tests.orthanc_server import orthanc, requires_orthanc

ON_LINE = "ups.status: OL\nbattery.charge: 93\nbattery.runtime: 1500\nTIMER 60\n"


def doctor(data_dir: Path, config: Path | None = None, *extra: str) -> tuple[int, dict[str, dict]]:
    args = (["--config", str(config)] if config else []) + ["doctor", "--json", *extra]
    proc = run_cli(*args, data_dir=data_dir, timeout=180)
    checks = json.loads(proc.stdout)
    names = [c["name"] for c in checks]
    assert len(names) == len(set(names)), f"check names must be unique: {names}"
    for c in checks:
        assert set(c) == {"name", "status", "detail", "fix"} and c["status"] in ("ok", "warn", "fail"), c
        if c["status"] == "fail":
            assert c["fix"], f"{c['name']} fails without saying how to fix it"
    assert proc.returncode == (1 if any(c["status"] == "fail" for c in checks) else 0), proc.stderr
    return proc.returncode, {c["name"]: c for c in checks}


def test_json_is_a_list_of_named_checks_and_this_machine_passes(data_dir: Path) -> None:
    code, checks = doctor(data_dir)
    assert code == 0, [c for c in checks.values() if c["status"] == "fail"]
    for name in ("python", "packages", "hardware profile", "data dir", "disk space", "disk inodes", "database", "clock",
                 "service web", "service dicom", "service worker", "port web", "port dicom", "dicom echo self",
                 "dicom echo pacs", "allow-list", "ups", "bundle", "signing key", "backend onnxruntime", "self-test",
                 "telemetry", "cloud", "web exposure", "retention"):
        assert name in checks, name
    assert checks["backend onnxruntime"]["status"] == "ok"
    for name, check in checks.items():
        if name.startswith("backend ") and check["status"] != "ok":
            assert check["detail"].startswith("unavailable: ") and len(check["detail"]) > 20
    # a developer's machine (not provisioned): services not installed are warnings, not failures
    assert checks["service web"]["status"] == "warn" and "provision" in checks["service web"]["fix"]


def test_table_shows_the_fix_under_each_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("doctor", data_dir=blocker / "sub")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("FAIL  data dir"))
    assert "not writable" in lines[i] and lines[i + 1].strip().startswith("fix: run as root or the service user")
    assert "failed" in lines[-1]


def test_wrong_architecture_profile_fails(data_dir: Path) -> None:
    other = "jetson-orin-nano" if platform.machine() == "x86_64" else "x86-cpu"
    proc = run_cli("--profile", other, "doctor", "--json", data_dir=data_dir)
    check = {c["name"]: c for c in json.loads(proc.stdout)}["hardware profile"]
    assert proc.returncode == 1 and check["status"] == "fail" and "but this box is" in check["detail"]


def _service(data_dir: Path, config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgescreen.appliance.cli", "--config", str(config), "--data-dir", str(data_dir),
                             *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_port(port: int, timeout_s: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port}")


@requires_orthanc
@requires_nut
def test_live_services_pacs_and_ups(tmp_path: Path, data_dir: Path) -> None:
    dicom_port, web_port, dead_port = free_port(), free_port(), free_port()
    (tmp_path / "nut").mkdir()
    with orthanc(tmp_path / "pacs", aet="PACS") as pacs, nut_ups(tmp_path / "nut", ON_LINE) as ups:
        config = tmp_path / "site.toml"
        config.write_text(f"""
[dicom]
port = {dicom_port}
bind = "127.0.0.1"
allowed = [{{ ae_title = "CT_SCANNER", host = "127.0.0.1" }}, {{ ae_title = "MR_UNPINNED" }}]
[dicom.pacs]
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs.dicom_port}
[web]
port = {web_port}
[power]
nut_host = "{ups.host}"
nut_port = {ups.port}
nut_ups = "{ups.ups}"
""")
        procs = [_service(data_dir, config, "dicom"), _service(data_dir, config, "serve")]
        try:
            _wait_port(dicom_port)
            _wait_port(web_port)
            _, checks = doctor(data_dir, config)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=30)
        assert checks["port dicom"]["status"] == "ok" and checks["port web"]["status"] == "ok"
        # our own listener answers; its allow-list refuses the doctor's unknown AE, as it should
        assert checks["dicom echo self"]["status"] == "ok" and "allow-list refuses strangers" in checks["dicom echo self"]["detail"]
        assert checks["dicom echo pacs"]["status"] == "ok" and "answered 0x0000" in checks["dicom echo pacs"]["detail"]
        assert checks["ups"]["status"] == "ok" and "status OL" in checks["ups"]["detail"] and "charge 93%" in checks["ups"]["detail"]
        assert checks["allow-list"]["status"] == "warn" and "MR_UNPINNED may send from any address" in checks["allow-list"]["detail"]

        # the same box with the PACS and the UPS gone: each failure names its fix
        broken = config.read_text().replace(f"port = {pacs.dicom_port}", f"port = {dead_port}").replace(
            f"nut_port = {ups.port}", f"nut_port = {dead_port}")
        config.write_text(broken)
        code, checks = doctor(data_dir, config)
        assert code == 1
        assert checks["dicom echo pacs"]["status"] == "fail" and "check the PACS is on" in checks["dicom echo pacs"]["fix"]
        assert checks["ups"]["status"] == "fail" and "upsc" in checks["ups"]["fix"]
        assert checks["dicom echo self"]["status"] == "warn"  # not provisioned here: a stopped service warns


@requires_orthanc
def test_pacs_that_refuses_us_says_to_register_our_ae(tmp_path: Path, data_dir: Path) -> None:
    with orthanc(tmp_path / "pacs", aet="PACS", extra_config={"DicomAlwaysAllowEcho": False}) as pacs:
        config = tmp_path / "site.toml"
        config.write_text(f'[dicom.pacs]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n')
        _, checks = doctor(data_dir, config)
    check = checks["dicom echo pacs"]
    assert check["status"] == "fail" and "EDGESCREEN" in check["fix"], check
