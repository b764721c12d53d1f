"""`edgescreen demo` (what `make demo` runs), used the way a visitor would: log in with the password it prints,
watch the studies arrive and wait while the simulated scanner exam runs (the system page says why), then
see the CT analysed with its pancreas and lesion overlays."""

from __future__ import annotations

import http.cookiejar
import json
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tests.conftest import EDGESCREEN, REPO, free_port


class Browser:
    """A cookie-keeping HTTP client that fills in the CSRF token as a page's form would."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path: str) -> tuple[int, str]:
        with self.opener.open(self.base + path, timeout=30) as resp:
            return resp.status, resp.read().decode()

    def json(self, path: str) -> dict:
        return json.loads(self.get(path)[1])

    def post(self, path: str, form: dict, token_page: str) -> tuple[int, str]:
        token = re.search(r'name="csrf-token" content="([^"]+)"', self.get(token_page)[1]).group(1)
        data = urllib.parse.urlencode({**form, "csrf_token": token}).encode()
        with self.opener.open(self.base + path, data=data, timeout=30) as resp:
            return resp.status, resp.read().decode()


def test_demo_end_to_end(tmp_path: Path) -> None:
    web, dicom = free_port(), free_port()
    log_path = tmp_path / "demo.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*EDGESCREEN, "--data-dir", str(tmp_path / "data"), "demo", "--port", str(web),
                             "--dicom-port", str(dicom), "--cloud-port", str(free_port()), "--slices", "64",
                             "--exam-s", "6"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={"PATH": "/usr/bin:/bin", "EDGESCREEN_CONFIG": ""})
    base = f"http://127.0.0.1:{web}"
    try:
        deadline = time.monotonic() + 240
        password = None
        while password is None and time.monotonic() < deadline and proc.poll() is None:
            match = re.search(r"one-time password (\S+)", log_path.read_text())
            password = match.group(1) if match else None
            time.sleep(0.2)
        assert password, log_path.read_text()
        output = log_path.read_text()
        assert f"open {base}/" in output and "RESEARCH USE ONLY" in output
        assert output.count(password) == 1  # printed once

        browser = Browser(base)
        status, page = browser.post("/login", {"username": "admin", "password": password}, "/login")
        assert "/account" in page or "one-time password" in page  # must choose a new password first
        browser.post("/account/password", {"current_password": password, "new_password": "demo visitor 2024",
                                           "confirm_password": "demo visitor 2024"}, "/account")

        # while the simulated exam runs, the gate says the scanner is busy and why
        saw_busy = False
        while time.monotonic() < deadline and not saw_busy:
            system = browser.json("/api/v1/system")
            reason = system["gate"].get("decision", {}).get("reason", "")
            saw_busy = "MPPS" in reason and "DEMO_CT" in reason
            time.sleep(0.5)
        assert saw_busy, system
        _, html = browser.get("/system")
        assert "MPPS exam in progress on DEMO_CT" in html

        # the studies arrive; then the first CT is analysed, with its overlays
        deadline = time.monotonic() + 600
        done = None
        while time.monotonic() < deadline and proc.poll() is None:
            studies = browser.json("/api/v1/studies?modality=CT&state=done")["studies"]
            if studies:
                done = studies[0]
                break
            time.sleep(1)
        assert done is not None, log_path.read_text()[-4000:]
        names = {s["patient_name"] for s in browser.json("/api/v1/studies")["studies"]}
        assert {"PHANTOM, CT S0101", "PHANTOM, MG S0201"} <= names
        assert done["triage"] in ("suspicious", "indeterminate", "not_suspicious")
        _, page = browser.get(f"/studies/{done['study_uid']}")
        assert 'data-overlays="1"' in page and "ov-pancreas" in page and "ov-lesions" in page
        detail = browser.json(f"/api/v1/studies/{done['study_uid']}")
        outputs = {d["name"] for j in detail["jobs"] for d in j["downloads"]}
        assert "seg.dcm" in outputs
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    # the demo's services stop with it
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "data")], capture_output=True).stdout == b""
