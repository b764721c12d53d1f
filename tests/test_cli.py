"""The `edgescreen` command as a technician meets it: help, version, doctor, config."""

from __future__ import annotations

import json
from pathlib import Path

from appliance import __version__
from appliance.cli import COMMANDS
from tests.conftest import run_cli


def test_version() -> None:
    proc = run_cli("--version", check=True)
    assert proc.stdout.strip() == f"edgescreen {__version__}"


def test_help_lists_every_command_and_each_has_help() -> None:
    top = run_cli("--help", check=True).stdout
    assert "RESEARCH USE ONLY" in top
    for name in COMMANDS:
        assert name in top
        proc = run_cli(name, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "usage: edgescreen" in proc.stdout


def test_doctor_passes_on_this_machine(data_dir: Path) -> None:
    proc = run_cli("doctor", data_dir=data_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok    backend onnxruntime" in proc.stdout
    assert "data dir writable" in proc.stdout


def test_doctor_reports_unavailable_backends_with_reasons(data_dir: Path) -> None:
    proc = run_cli("doctor", "--json", data_dir=data_dir, check=True)
    checks = {c["check"]: c for c in json.loads(proc.stdout)}
    for name, check in checks.items():
        if name.startswith("backend ") and check["status"] != "ok":
            assert check["detail"].startswith("unavailable: ") and len(check["detail"]) > len("unavailable: ") + 5


def test_doctor_fails_on_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("doctor", data_dir=blocker / "sub")
    assert proc.returncode == 1
    assert "FAIL  data dir writable" in proc.stdout


def test_doctor_fails_on_wrong_architecture_profile(data_dir: Path) -> None:
    import platform

    other = "jetson-orin-nano" if platform.machine() == "x86_64" else "x86-cpu"
    proc = run_cli("--profile", other, "doctor", data_dir=data_dir)
    assert proc.returncode == 1 and "FAIL  hardware profile" in proc.stdout and "but this box is" in proc.stdout


def test_studies_json_on_empty_store(data_dir: Path) -> None:
    proc = run_cli("studies", "--json", data_dir=data_dir, check=True)
    assert json.loads(proc.stdout) == []
