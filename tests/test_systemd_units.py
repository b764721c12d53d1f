"""systemd units as provisioning writes them (verified by systemd-analyze, offline), and the sd_notify protocol the
services speak to them: READY=1 once serving, WATCHDOG=1 only while their own loop is healthy, STOPPING=1."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgescreen.appliance import sdnotify
from edgescreen.appliance.config import load_profile
from edgescreen.appliance.config.site import SiteConfig
from edgescreen.appliance.provisioning import Installer, Options, step_units
from tests.conftest import REPO, free_port

ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (Debian package systemd)")


def render(tmp_path: Path, profile: str = "x86-cpu", **config) -> Path:
    """Units for a site config, into a staging root; returns the unit directory."""
    cfg = SiteConfig.model_validate({"data_dir": "/var/lib/edgescreen", **config})
    inst = Installer(tmp_path / "root", "edgescreen")
    step_units(inst, cfg, load_profile(profile), Options(profile=profile, site_id="t"),
               Path("/etc/edgescreen/site.toml"), Path("/var/lib/edgescreen"))
    return tmp_path / "root" / "etc" / "systemd" / "system"


def directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def verify(units: list[Path]) -> subprocess.CompletedProcess:
    # no running systemd is needed: verify loads the files, checks every directive and that ExecStart exists
    return subprocess.run([ANALYZE, "verify", *map(str, units)], capture_output=True, text=True, timeout=120)


def test_generated_units_verify_clean(tmp_path: Path) -> None:
    unit_dir = render(tmp_path, sync={"enabled": True, "url": "https://fleet.example.org"})
    units = sorted(u for u in unit_dir.glob("edgescreen*") if u.is_file())
    assert {u.name for u in units} == {"edgescreen-web.service", "edgescreen-dicom.service",
                                       "edgescreen-worker.service", "edgescreen-sync.service", "edgescreen.target"}
    proc = verify(units)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    # and verify does catch a broken unit: the check above is not vacuous
    broken = tmp_path / "edgescreen-broken.service"
    broken.write_text((unit_dir / "edgescreen-web.service").read_text().replace("WatchdogSec=60", "WatchdogSec=soon"))
    assert "Failed to parse sec value" in verify([broken]).stderr


def test_units_run_the_real_install_with_notify_watchdog_and_hardening(tmp_path: Path) -> None:
    unit_dir = render(tmp_path)
    exe = Path(sys.executable).parent / "edgescreen"
    for name, service in (("web", "serve"), ("dicom", "dicom"), ("worker", "worker")):
        d = directives(unit_dir / f"edgescreen-{name}.service")
        assert d["ExecStart"] == [f"{exe} {service}"] and exe.is_file()
        assert d["Type"] == ["notify"] and int(d["WatchdogSec"][0]) > 0 and d["Restart"] == ["on-failure"]
        assert d["User"] == ["edgescreen"] and d["NoNewPrivileges"] == ["yes"] and d["ProtectSystem"] == ["strict"]
        assert d["ReadWritePaths"] == ["/var/lib/edgescreen"] and d["PrivateTmp"] == ["yes"]
        assert d["ProtectHome"] == ["yes"] and d["CapabilityBoundingSet"] == [""] and d["AmbientCapabilities"] == [""]
        assert d["Environment"] == ["EDGESCREEN_CONFIG=/etc/edgescreen/site.toml"]
    target = directives(unit_dir / "edgescreen.target")
    assert target["Wants"][0].split() == ["edgescreen-web.service", "edgescreen-dicom.service",
                                          "edgescreen-worker.service"]
    # enabled as `systemctl enable` would: the .wants links
    assert os.readlink(unit_dir / "multi-user.target.wants" / "edgescreen.target") == "/etc/systemd/system/edgescreen.target"
    assert (unit_dir / "edgescreen.target.wants" / "edgescreen-dicom.service").is_symlink()
    assert not (unit_dir / "edgescreen-sync.service").exists(), "no cloud configured: no sync service"


def test_dicom_below_1024_gets_only_net_bind_service(tmp_path: Path) -> None:
    unit_dir = render(tmp_path, dicom={"port": 104})
    d = directives(unit_dir / "edgescreen-dicom.service")
    assert d["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"] and d["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    for other in ("web", "worker"):
        assert directives(unit_dir / f"edgescreen-{other}.service")["CapabilityBoundingSet"] == [""]


def test_gpu_profile_gives_the_worker_its_devices_only(tmp_path: Path) -> None:
    unit_dir = render(tmp_path, profile="x86-nvidia")
    worker = directives(unit_dir / "edgescreen-worker.service")
    assert worker["PrivateDevices"] == ["no"] and worker["SupplementaryGroups"] == ["video render"]
    assert directives(unit_dir / "edgescreen-web.service")["PrivateDevices"] == ["yes"]
    assert verify(sorted(u for u in unit_dir.glob("edgescreen*") if u.is_file())).stderr.strip() == ""


def test_hardening_exposure_stays_low(tmp_path: Path) -> None:
    """systemd's own exposure score (0 = locked down, 10 = unprotected), offline: a regression that drops a
    hardening line raises it."""
    unit_dir = render(tmp_path)
    for name in ("web", "dicom", "worker"):
        proc = subprocess.run([ANALYZE, "security", "--offline=true", str(unit_dir / f"edgescreen-{name}.service")],
                              capture_output=True, text=True, timeout=120)
        score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout + proc.stderr).group(1))
        assert score <= 3.2, f"{name}: exposure {score}\n{proc.stdout[-3000:]}"


# ------------------------------------------------------------------------------------------ sd_notify


@pytest.fixture
def notify_socket(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(30)
    yield sock, path
    sock.close()


def _receive_until(sock: socket.socket, wanted: str, timeout_s: float = 60) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if any(wanted in m.split("\n") for m in got):
            return got
    raise AssertionError(f"no {wanted} from the service; got {got}")


@pytest.mark.parametrize("service", ["worker", "dicom", "serve"])
def test_service_says_ready_feeds_the_watchdog_and_says_stopping(service: str, notify_socket, data_dir: Path) -> None:
    sock, path = notify_socket
    args = {"worker": ["worker", "--poll", "0.2"], "dicom": ["dicom", "--port", str(free_port()), "--bind", "127.0.0.1"],
            "serve": ["serve", "--port", str(free_port())]}[service]
    env = {**os.environ, "EDGESCREEN_CONFIG": "", "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen([sys.executable, "-m", "edgescreen.appliance.cli", "--data-dir", str(data_dir), *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        msgs = _receive_until(sock, "READY=1")
        pings = _receive_until(sock, "WATCHDOG=1", timeout_s=30)
        assert any("STATUS=" in m for m in pings)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        if service != "serve":
            msgs += _receive_until(sock, "STOPPING=1", timeout_s=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watchdog_withholds_pings_while_the_loop_is_unhealthy(notify_socket, monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = notify_socket
    sock.settimeout(0.3)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    healthy = {"ok": False}
    dog = sdnotify.Watchdog(lambda: (healthy["ok"], "test loop"), 0.2, "test").start()
    try:
        first = sock.recv(4096).decode()
        assert first.startswith("STATUS=unhealthy") and "WATCHDOG=1" not in first
        with pytest.raises(TimeoutError):  # no ping at all while unhealthy: systemd would restart us
            while True:
                assert "WATCHDOG=1" not in sock.recv(4096).decode()
        healthy["ok"] = True
        sock.settimeout(5)
        assert "WATCHDOG=1" in sock.recv(4096).decode().split("\n")
    finally:
        dog.stop()


def test_notify_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.ready() is False and sdnotify.watchdog_interval() is None
    assert sdnotify.start_watchdog(lambda: (True, ""), "x") is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # armed for another process (our parent, say): not for us
    assert sdnotify.watchdog_interval() is None
