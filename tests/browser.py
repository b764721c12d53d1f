"""A real headless Chromium (Debian's) driven by Playwright, and a real `edgescreen serve` to point it at."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import EDGESCREEN, REPO, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
LANDSCAPE = {"width": 1280, "height": 800}
PORTRAIT = {"width": 800, "height": 1280}


@contextlib.contextmanager
def web_server(data_dir: Path, *extra: str, env: dict | None = None) -> Iterator[str]:
    """`edgescreen serve` on a free loopback port; its output (the first-run password included) in serve.log."""
    port = free_port()
    log_path = data_dir / "serve.log"  # a file, not a pipe: a chatty server must never block on a full pipe
    log = open(log_path, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([*EDGESCREEN, "--data-dir", str(data_dir), *extra, "serve", "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "EDGESCREEN_CONFIG": "", **(env or {})})
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"edgescreen serve exited {proc.returncode}: {log_path.read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("edgescreen serve did not listen within 60 s")
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


def first_run_password(data_dir: Path) -> str:
    """The one-time admin password `serve` printed (once) on a box without users."""
    match = re.search(r"one-time password\s+(\S+)", (data_dir / "serve.log").read_text())
    assert match, (data_dir / "serve.log").read_text()
    return match.group(1)


@contextlib.contextmanager
def launch() -> Iterator[object]:
    """One real Chromium for a whole module: each test opens its own context (cookies, viewport, language)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def page_in(browser, viewport: dict | None = None, locale: str = "en-GB") -> Iterator[object]:
    """A fresh browser context (its own cookies: a new person at a new screen) in `browser`; yields a page."""
    context = browser.new_context(viewport=viewport or LANDSCAPE, locale=locale)
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        yield page
    finally:
        context.close()


@contextlib.contextmanager
def chromium(viewport: dict | None = None, locale: str = "en-GB") -> Iterator[object]:
    """A browser of its own with one page (for a script or a single test)."""
    with launch() as browser, page_in(browser, viewport, locale) as page:
        yield page


def login(page, url: str, username: str, password: str) -> None:
    page.goto(url + "/login")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("form button.primary")
    page.wait_for_load_state("load")


_ARTIFACTS: Path | None = None


def artifacts_dir() -> Path:
    """Where screenshots are kept for a person to look at (printed once per run)."""
    global _ARTIFACTS
    if _ARTIFACTS is None:
        root = os.environ.get("EDGESCREEN_ARTIFACTS") or os.path.join(tempfile.gettempdir(), "edgescreen-artifacts")
        _ARTIFACTS = Path(root) / time.strftime("web-%Y%m%d-%H%M%S")
        _ARTIFACTS.mkdir(parents=True, exist_ok=True)
        print(f"\nweb screenshots: {_ARTIFACTS}")
    return _ARTIFACTS


def screenshot(page, name: str) -> Path:
    path = artifacts_dir() / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path
