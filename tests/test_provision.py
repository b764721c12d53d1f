"""`edgescreen provision` into staging roots (issue 13): config, user, keys, a bundle built on the box (the optimiser,
bounded) or prebuilt, first admin, units, telemetry opt-out and a passing self-test; a second run changes no file;
the services' user cannot read the signing key; the self-test fails loudly on a mismatch."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgescreen.appliance.bundle import (
    current_bundle,
    key_paths,
    load_trusted_keys,
    sign_bytes,
    verify_bundle,
)
from edgescreen.appliance.config import load_site_config
from tests.conftest import REPO, run_cli

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="provisioning runs as root (it creates users and root keys)"),
              pytest.mark.timeout(2400)]  # the first test carries the optimiser run of the module's box

ROLES = "pancreas.stage1,pancreas.stage2,pancreas.stage3"
# The optimiser on the box, bounded for the test: the CT models only (mammography calibration needs mini-MIAS),
# FP32 ONNX Runtime only (no quantisation), two held-out gate cases. A real box runs the full profile.
OPTIMIZE = [f"--optimize-arg=--roles={ROLES}", "--optimize-arg=--calibration-cases=1",
            "--optimize-arg=--heldout-cases=2", "--optimize-arg=--warmup=0", "--optimize-arg=--volume-cases=0"]


def quick_profile(directory: Path) -> Path:
    text = (REPO / "firmware_config/profiles/x86-cpu.toml").read_text()
    text = text.replace('name = "x86-cpu"', 'name = "x86-cpu-quick"')
    text = re.sub(r"candidates = \[.*?\n\]", 'candidates = [\n  { backend = "onnxruntime", device = "CPU", '
                  'precision = "fp32" },\n]', text, flags=re.S)
    path = directory / "x86-cpu-quick.toml"
    path.write_text(text)
    return path


def staging_root(prefix: str) -> Path:
    """Under /tmp and world-traversable, so an unprivileged user can reach what it should (pytest's own tmp is 0700)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    return root


def provision(root: Path, profile: Path, *extra: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    return run_cli("provision", "--profile", str(profile), "--site-id", "test", "--root", str(root), "--no-start",
                   *extra, timeout=timeout)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: content hash (or link target), mode, owner, mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                what = "-> " + os.readlink(p)
            elif p.is_file():
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = "dir"
            out[str(p.relative_to(root))] = (what, st.st_mode, st.st_uid, st.st_gid,
                                             None if p.is_dir() and not p.is_symlink() else st.st_mtime_ns)
    return out


@dataclass
class Box:
    root: Path
    profile: Path
    first: subprocess.CompletedProcess

    @property
    def etc(self) -> Path:
        return self.root / "etc/edgescreen"

    @property
    def data(self) -> Path:
        return self.root / "var/lib/edgescreen"

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run_cli("--config", str(self.etc / "site.toml"), *args, data_dir=self.data, **kw)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """One box provisioned the slow way: no prebuilt bundle, so the optimiser runs on it (about a minute here)."""
    root = staging_root("edgescreen-prov-")
    try:
        profile = quick_profile(tmp_path_factory.mktemp("profile"))
        proc = provision(root, profile, *OPTIMIZE)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        yield Box(root, profile, proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_provision_installs_a_running_appliance_and_its_selftest_passes(box: Box) -> None:
    out = box.first.stdout
    assert "no prebuilt bundle fits this box: optimising the models for x86-cpu-quick here" in out
    assert re.search(r"\[#+\] 3/3 models", box.first.stderr), "the optimiser's progress bar (on stderr)"
    assert "PASS  ct-ipmn" in out and "self-test passed" in out
    assert re.search(r"one-time password\n\n\s+\S{8,}\n", out), "the first admin's password, printed once"
    # config, validated, with the box's paths (as the box sees them)
    config = load_site_config(box.etc / "site.toml")
    assert config.site.id == "test" and config.data_dir == "/var/lib/edgescreen"
    assert config.hardware.profile == str(box.profile)
    assert stat.S_IMODE((box.etc / "site.toml").stat().st_mode) == 0o640
    # units with this install's path, enabled under the target
    units = box.root / "etc/systemd/system"
    assert f"ExecStart={Path(sys.executable).parent / 'edgescreen'} worker" in (units / "edgescreen-worker.service").read_text()
    assert (units / "multi-user.target.wants/edgescreen.target").is_symlink()
    assert (box.root / "etc/sysusers.d/edgescreen.conf").read_text().splitlines()[1].startswith(
        "u edgescreen - \"edgescreen appliance\" /var/lib/edgescreen")
    # keys: private root-only outside the data dir, the bundle verifies with the public key alone
    private, public, _ = key_paths(box.etc)
    st = private.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert not (box.data / "keys").exists()
    manifest = verify_bundle(current_bundle(box.data), load_trusted_keys(box.etc))
    assert manifest.profile == "x86-cpu-quick" and set(manifest.models) == set(ROLES.split(","))
    assert (current_bundle(box.data) / "selftest/expected.json").is_file()
    # the first admin exists, with a password to change at first login
    import sqlite3

    with sqlite3.connect(box.data / "edgescreen.db") as conn:
        assert conn.execute("SELECT role, must_change_password FROM users WHERE username = 'admin'").fetchone() == ("admin", 1)
    # telemetry opted out for root and the service user (openvino_telemetry reads ~/intel/openvino_telemetry)
    assert (box.root / "root/intel/openvino_telemetry").read_text().strip() == "0"
    assert (box.data / "intel/openvino_telemetry").read_text().strip() == "0"
    assert json.loads((box.data / "selftest.json").read_text())["passed"]


def test_second_identical_run_changes_no_file(box: Box) -> None:
    before = snapshot(box.root)
    proc = provision(box.root, box.profile, *OPTIMIZE)
    assert proc.returncode == 0, proc.stderr
    assert "no changes: this box was already provisioned with these options" in proc.stdout
    steps = [line for line in proc.stdout.splitlines() if re.match(r"^\s+(ok|changed)\s", line)]
    assert steps and all(line.strip().startswith("ok") for line in steps), steps
    assert "optimising" not in proc.stdout and "self-test: nothing changed, not repeated" in proc.stdout
    after = snapshot(box.root)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}


def test_doctor_on_the_provisioned_box_names_every_check_and_fix(box: Box) -> None:
    proc = box.cli("doctor", "--json", "--root", str(box.root), timeout=180)
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    assert {"bundle", "signing key", "self-test", "service web", "dicom echo self", "web exposure"} <= set(checks)
    for name in ("bundle", "signing key", "self-test", "telemetry", "database", "hardware profile"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "root-only (0600), outside the data dir" in checks["signing key"]["detail"]
    assert checks["service web"]["status"] == "warn" and "systemd is not running here" in checks["service web"]["detail"]
    # nothing is started in a staging root: on a provisioned box that is a failure, and each says what to do
    assert checks["port dicom"]["status"] == "fail" and "systemctl start edgescreen-dicom" in checks["port dicom"]["fix"]
    assert checks["allow-list"]["status"] == "fail" and "--scanner-ae" in checks["allow-list"]["fix"]
    for c in checks.values():
        assert c["status"] != "fail" or c["fix"], c
    assert proc.returncode == 1


def test_a_new_option_changes_only_what_it_names_and_keeps_hand_edits(box: Box) -> None:
    root = staging_root("edgescreen-prov-edit-")
    try:
        shutil.copytree(box.root, root, symlinks=True, dirs_exist_ok=True)
        site = root / "etc/edgescreen/site.toml"
        site.write_text(site.read_text() + "\n[scheduler]\nidle_grace_s = 30.0\n")
        before = snapshot(root)
        proc = provision(root, box.profile, *OPTIMIZE, "--scanner-ae", "CT_SCANNER", "--scanner-host", "10.0.0.5",
                         "--skip-selftest")
        assert proc.returncode == 0, proc.stderr
        after = snapshot(root)
        assert {k for k in set(before) | set(after) if before.get(k) != after.get(k)} == {"etc/edgescreen/site.toml"}
        config = load_site_config(site)
        assert config.scheduler.idle_grace_s == 30.0, "the technician's own setting survives"
        assert [(p.ae_title, p.host) for p in config.dicom.allowed] == [("CT_SCANNER", "10.0.0.5")]
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def service_user() -> Iterator[str]:
    name = f"es-svc-{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def _as(user: str, *cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "EDGESCREEN_CONFIG": "", **(env or {})}
    return subprocess.run(["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in full.items()), *cmd],
                          capture_output=True, text=True, cwd="/", timeout=300)


def _python_for(user: str) -> tuple[str, dict[str, str]]:
    """This environment's interpreter, or, where the user cannot run it (a developer's pyenv under /root), the
    system Python 3.11 with this environment's packages: the same code either way."""
    if _as(user, sys.executable, "-c", "pass").returncode == 0:
        return sys.executable, {}
    import sysconfig

    # purelib as a site directory, not a plain path entry, so that its .pth files (the editable install's finder
    # for the edgescreen namespace) are read: a sitecustomize on PYTHONPATH adds it at start-up
    shim = Path(tempfile.mkdtemp(prefix="edgescreen-site-"))
    shim.chmod(0o755)
    (shim / "sitecustomize.py").write_text(f"import site\nsite.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    (shim / "sitecustomize.py").chmod(0o644)
    return "/usr/bin/python3", {"PYTHONPATH": f"{shim}:{REPO}"}


def test_prebuilt_bundle_and_the_services_user_cannot_read_the_signing_key(box: Box, service_user: str) -> None:
    """A second box of the same kind takes the first one's bundle (trusting its key) instead of optimising; then,
    as the unprivileged user the services run as, the private key is unreadable while everything else works."""
    root = staging_root("edgescreen-prov-user-")
    try:
        bundle = current_bundle(box.data)
        proc = provision(root, box.profile, "--service-user", service_user, "--bundle", str(bundle.parent),
                         "--trust-key", str(key_paths(box.etc)[1]), "--skip-selftest")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"installed prebuilt bundle {bundle.name}" in proc.stdout and "optimising" not in proc.stdout
        etc, data = root / "etc/edgescreen", root / "var/lib/edgescreen"
        private, public, _ = key_paths(etc)
        python, env = _python_for(service_user)
        denied = _as(service_user, python, "-c", f"open({str(private)!r}, 'rb').read()")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        assert _as(service_user, python, "-c", f"open({str(public)!r}).read()").returncode == 0
        # the services' view: the config (group-readable), the data dir (theirs), bundles verified by public key
        cli = [python, "-m", "edgescreen.appliance.cli", "--config", str(etc / "site.toml"), "--data-dir", str(data)]
        listing = _as(service_user, *cli, "bundle", "list", "--json", env=env)
        assert listing.returncode == 0, listing.stderr
        (entry,) = json.loads(listing.stdout)
        assert entry["current"] and entry["problem"] is None
        doctor = _as(service_user, *cli, "doctor", "--json", "--root", str(root), env=env)
        checks = {c["name"]: c for c in json.loads(doctor.stdout)}
        assert checks["signing key"]["status"] == "ok" and "not readable by this user" in checks["signing key"]["detail"]
        assert checks["data dir"]["status"] == "ok" and checks["bundle"]["status"] == "ok"
        assert (data / "edgescreen.db").stat().st_uid == (data / "bundles").stat().st_uid != 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_signing_key_left_in_the_data_dir_is_moved_out(box: Box) -> None:
    root = staging_root("edgescreen-prov-legacy-")
    try:
        shutil.copytree(box.root, root, symlinks=True, dirs_exist_ok=True)
        etc, data = root / "etc/edgescreen", root / "var/lib/edgescreen"
        private, _, _ = key_paths(etc)
        legacy, _, _ = key_paths(data)  # the layout before: the box's only key inside the data directory
        legacy.parent.mkdir()
        legacy.write_bytes(private.read_bytes())
        private.unlink()
        proc = provision(root, box.profile, *OPTIMIZE, "--skip-selftest")
        assert proc.returncode == 0, proc.stderr
        assert "moved the signing key out of the data directory" in proc.stdout
        assert not legacy.exists() and stat.S_IMODE(private.stat().st_mode) == 0o600
        assert "model bundle: " in proc.stdout and "active, verified" in proc.stdout, "its bundles still verify"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _bundle_copy(box: Box, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(current_bundle(box.data), copy)
    return copy


def test_selftest_refuses_expected_findings_not_signed(box: Box, tmp_path: Path) -> None:
    copy = _bundle_copy(box, tmp_path)
    expected = copy / "selftest/expected.json"
    expected.write_text(expected.read_text().replace('"triage": "', '"triage": "x'))
    proc = run_cli("--config", str(box.etc / "site.toml"), "selftest", "--bundle", str(copy),
                   data_dir=tmp_path / "scratch")
    assert proc.returncode == 1 and "signature does not match" in proc.stdout


def test_selftest_mismatch_fails_loudly_with_the_differences(box: Box, tmp_path: Path) -> None:
    copy = _bundle_copy(box, tmp_path)
    expected = copy / "selftest/expected.json"
    doc = json.loads(expected.read_text())
    case = doc["cases"][0]["expected"]
    case["abnormal_probability"] = round(1.0 - case["abnormal_probability"], 4)
    case["pancreas_volume_ml"] = (case["pancreas_volume_ml"] or 0) * 2 + 10
    data = (json.dumps(doc, indent=2) + "\n").encode()
    expected.write_bytes(data)
    (copy / "selftest/expected.sig").write_text(json.dumps(sign_bytes(key_paths(box.etc)[0], data)))
    proc = run_cli("--config", str(box.etc / "site.toml"), "selftest", "--bundle", str(copy),
                   data_dir=tmp_path / "scratch", timeout=900)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  ct-ipmn" in proc.stdout and "self-test FAILED" in proc.stdout
    assert "- abnormal_probability: expected" in proc.stdout and "- pancreas_volume_ml: expected" in proc.stdout
    assert not json.loads((tmp_path / "scratch/selftest.json").read_text())["passed"]
