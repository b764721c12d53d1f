"""`edgescreen demo` (what `make demo` runs): phantoms generated, sent over DICOM, listed on the page."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.conftest import EDGESCREEN, REPO, free_port


def test_demo_serves_the_generated_phantom_studies(tmp_path: Path) -> None:
    web, dicom = free_port(), free_port()
    log = open(tmp_path / "demo.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*EDGESCREEN, "--data-dir", str(tmp_path / "data"), "demo", "--port", str(web),
                             "--dicom-port", str(dicom), "--slices", "100"], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin", "EDGESCREEN_CONFIG": ""})
    try:
        deadline = time.monotonic() + 300
        studies: list = []
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/studies", timeout=5) as resp:
                    studies = json.load(resp)["studies"]
            except OSError:
                pass
            # the demo prints where to open it once every phantom is sent; studies show up while it sends
            ready = f"open http://127.0.0.1:{web}/" in (tmp_path / "demo.log").read_text()
            if ready and len(studies) == 5 and all(se["instances"] for st in studies for se in st["series"]):
                break
            time.sleep(2)
        output = (tmp_path / "demo.log").read_text()
        assert proc.poll() is None, f"demo exited early:\n{output}"
        names = sorted(st["patient_name"] for st in studies)
        assert names == ["PHANTOM^CT^S0101", "PHANTOM^CT^S0102", "PHANTOM^CT^S0103",
                         "PHANTOM^MG^S0201", "PHANTOM^MG^S0202"], output
        assert f"open http://127.0.0.1:{web}/" in output
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/", timeout=10) as resp:
            page = resp.read().decode()
        assert "PHANTOM^CT^S0101" in page and "RESEARCH USE ONLY" in page
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    # the demo's services stop with it
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "data")], capture_output=True).stdout == b""
