"""The `edgescreen` command as a technician meets it: help, version, config (doctor: tests/test_doctor.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from edgescreen.appliance import __version__
from edgescreen.appliance.cli import COMMANDS
from tests.conftest import EDGESCREEN, REPO, catches_sigterm, run_cli


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


def test_studies_json_on_empty_store(data_dir: Path) -> None:
    proc = run_cli("studies", "--json", data_dir=data_dir, check=True)
    assert json.loads(proc.stdout) == []


@pytest.mark.parametrize("service", ["dicom", "worker", "sync", "serve"])
def test_a_service_stopped_while_it_starts_exits_cleanly(service: str, tmp_path: Path) -> None:
    """systemd may stop a unit the moment it (re)started: the service takes SIGTERM before it opens the store
    (so before it receives, claims or sends anything) and exits 0, never dying by the signal."""
    data = tmp_path / "data"
    args = {"dicom": ["--port", "0"], "worker": ["--poll", "0.2"], "sync": [], "serve": ["--port", "0"]}[service]
    proc = subprocess.Popen([*EDGESCREEN, "--data-dir", str(data), service, *args], cwd=REPO,
                            env={**os.environ, "EDGESCREEN_CONFIG": ""}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not catches_sigterm(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        store_opened = (data / "edgescreen.db").exists()
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        proc.kill()
    assert not store_opened, "SIGTERM is handled only once the service is up: a stop while it starts kills it"
    assert proc.returncode == 0, output
