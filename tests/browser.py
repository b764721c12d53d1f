"""A real headless Chromium (Debian's) driven by Playwright, and a real `edgescreen serve` to point it at."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import EDGESCREEN, REPO, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@contextlib.contextmanager
def web_server(data_dir: Path, *extra: str) -> Iterator[str]:
    port = free_port()
    log_path = data_dir / "serve.log"  # a file, not a pipe: a chatty server must never block on a full pipe
    log = open(log_path, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([*EDGESCREEN, "--data-dir", str(data_dir), *extra, "serve", "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "EDGESCREEN_CONFIG": ""})
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"edgescreen serve exited {proc.returncode}: {log_path.read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("edgescreen serve did not listen within 30 s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def chromium_page() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page()
        finally:
            browser.close()
