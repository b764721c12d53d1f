"""Checks a technician runs on a box: each says what it found and, when it fails, what to do."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance.context import AppContext

MIN_FREE_GB = 5.0
REQUIRED_PACKAGES = ("numpy", "scipy", "pydicom", "pynetdicom", "highdicom", "flask", "waitress",
                     "onnxruntime", "psutil", "cryptography", "pydantic", "PIL")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True  # an optional check that fails is shown as a warning, not a failure

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("FAIL" if self.required else "warn")


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", ok, f"{platform.python_version()} ({sys.executable})" + ("" if ok else "; need 3.11 or newer"))


def check_packages() -> list[Check]:
    checks = []
    for name in REQUIRED_PACKAGES:
        try:
            module = importlib.import_module(name)
            checks.append(Check(f"package {name}", True, getattr(module, "__version__", "installed")))
        except ImportError as exc:
            checks.append(Check(f"package {name}", False, f"missing ({exc}); reinstall edgescreen"))
    return checks


def check_backends() -> list[Check]:
    from appliance.runtime import available_backends

    checks = []
    for name, (ok, detail) in available_backends().items():
        # ONNX Runtime is the baseline every box must have; the others depend on the hardware.
        checks.append(Check(f"backend {name}", ok, detail if ok else f"unavailable: {detail}",
                            required=name == "onnxruntime"))
    return checks


def check_data_dir(data_dir: Path) -> Check:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".doctor-probe"
        probe.write_bytes(b"ok")
        with open(probe, "rb+") as fh:
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        return Check("data dir writable", False, f"{data_dir}: {exc.strerror}; fix permissions or pass --data-dir")
    return Check("data dir writable", True, str(data_dir))


def check_disk(data_dir: Path) -> Check:
    usage = shutil.disk_usage(data_dir if data_dir.exists() else data_dir.parent)
    free_gb = usage.free / 1e9
    ok = free_gb >= MIN_FREE_GB
    detail = f"{free_gb:.1f} GB free of {usage.total / 1e9:.1f} GB"
    return Check("free disk", ok, detail if ok else f"{detail}; need {MIN_FREE_GB} GB: free space or move --data-dir")


def check_profile(ctx: AppContext) -> Check:
    from appliance.config import ConfigError

    try:
        profile = ctx.profile
    except ConfigError as exc:
        return Check("hardware profile", False, str(exc))
    machine = platform.machine()
    if profile.arch != machine:
        return Check("hardware profile", False, f"{profile.name} is for {profile.arch} but this box is {machine}; "
                     "choose another profile in [hardware] profile")
    return Check("hardware profile", True, f"{profile.name}: {profile.description}")


def check_store(ctx: AppContext) -> Check:
    from appliance.store import StoreError

    try:
        store = ctx.store
        ok = store.integrity_ok()
        report = store.recover(remove_temp=False)
    except StoreError as exc:
        return Check("database", False, str(exc))
    if not ok:
        return Check("database", False, f"{store.db_path}: integrity check failed; restore from backup")
    missing = len(report["missing_files"])
    detail = f"{store.db_path} schema v{store.schema_version()}"
    if missing:
        return Check("database", False, f"{detail}; {missing} instance files are missing on disk")
    return Check("database", True, detail)


def check_web_exposure(ctx: AppContext) -> Check:
    """The UI has no login yet: listening beyond loopback shows patient names to the whole LAN."""
    import ipaddress

    host = ctx.config.web.host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return Check("web exposure", True, f"UI on {host} only")
    return Check("web exposure", False, f"UI listens on {host} without staff login: anyone on the LAN sees patient "
                 "names; restrict the clinic LAN or set [web] host = \"127.0.0.1\"", required=False)


def run_checks(ctx: AppContext) -> list[Check]:
    checks = [check_python(), *check_packages(), *check_backends(), check_data_dir(ctx.data_dir),
              check_disk(ctx.data_dir), check_profile(ctx), check_web_exposure(ctx)]
    if checks[-4].ok:  # the data dir is writable
        checks.append(check_store(ctx))
    return checks
