"""The `edgescreen` command as a technician meets it: help, version, config (doctor: tests/test_doctor.py)."""

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


def test_studies_json_on_empty_store(data_dir: Path) -> None:
    proc = run_cli("studies", "--json", data_dir=data_dir, check=True)
    assert json.loads(proc.stdout) == []
