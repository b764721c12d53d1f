"""The wheel a box installs: one `edgescreen` namespace, and the data the code reads beside it (issue 17.6)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


def _setuptools_major() -> int:
    if importlib.util.find_spec("setuptools") is None:
        return 0
    from importlib.metadata import version

    return int(version("setuptools").split(".")[0])


# built offline from this environment's setuptools (the dev extra installs >= 77, which the licence expression needs)
@pytest.mark.skipif(_setuptools_major() < 77, reason="needs setuptools >= 77 here (pip install 'setuptools>=77')")
def test_the_wheel_installs_under_edgescreen_with_its_data(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "--disable-pip-version-check", "-w", str(tmp_path), str(REPO)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("edgescreen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"edgescreen", wheel.name.split("-py3")[0] + ".dist-info"}
    for needed in ("edgescreen/appliance/cli/__init__.py", "edgescreen/optimize/cli.py", "edgescreen/models/cli.py",
                   "edgescreen/appliance/web/templates/base.html", "edgescreen/appliance/web/static/viewer.js",
                   "edgescreen/appliance/web/translations/zh/LC_MESSAGES/messages.mo",
                   "edgescreen/firmware_config/profiles/x86-cpu.toml",
                   "edgescreen/appliance/scheduler/traces/busy-urban-day.json",
                   "edgescreen/models/pancreas.stage1.onnx", "edgescreen/models/pancreas.stage1.json"):
        assert needed in names, needed
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "edgescreen = edgescreen.appliance.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
