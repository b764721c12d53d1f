"""Running the appliance's services together for a demo, and feeding them over DICOM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from appliance import RESEARCH_USE_BANNER
from appliance.context import AppContext
from appliance.logs import get_logger

log = get_logger(__name__)


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(proc.args[-4:])} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def _service(ctx: AppContext, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "appliance.cli", "--data-dir", str(ctx.data_dir)]
    if ctx.config_path:
        cmd += ["--config", str(ctx.config_path)]
    return subprocess.Popen(cmd + list(args), start_new_session=True)


def send_folders(folders: list[Path], host: str, port: int, called_ae: str) -> int:
    """C-STORE every DICOM file in the folders, one association per folder, as a scanner does."""
    from pydicom import dcmread
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title="EDGESCREEN_DEMO")
    ae.requested_contexts = StoragePresentationContexts
    sent = 0
    for folder in folders:
        assoc = ae.associate(host, port, ae_title=called_ae)
        if not assoc.is_established:
            raise RuntimeError(f"association to {called_ae}@{host}:{port} was not accepted")
        try:
            for path in sorted(folder.glob("*.dcm")):
                status = assoc.send_c_store(dcmread(path))
                if getattr(status, "Status", None) == 0x0000:
                    sent += 1
                else:
                    log.warning("C-STORE not accepted", file=str(path), status=str(status))
        finally:
            assoc.release()
    return sent


def run_demo(ctx: AppContext, folders: list[Path], *, web: tuple[str, int], dicom_port: int, send: bool) -> int:
    ae_title = ctx.config.dicom.ae_title
    # SIGTERM (systemd, a test, `kill`) must stop the services too, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    procs = [
        _service(ctx, "dicom", "--port", str(dicom_port), "--ae-title", ae_title, "--allow-any-ae"),
        _service(ctx, "serve", "--host", web[0], "--port", str(web[1])),
        _service(ctx, "worker"),
    ]
    try:
        _wait_port("127.0.0.1", dicom_port, procs[0])
        _wait_port(web[0], web[1], procs[1])
        if send:
            sent = send_folders(folders, "127.0.0.1", dicom_port, ae_title)
            print(f"sent {sent} phantom images to {ae_title} on port {dicom_port}", flush=True)
        print(f"\n  edgescreen demo is running: open http://{web[0]}:{web[1]}/\n  {RESEARCH_USE_BANNER}\n"
              "  Press Ctrl-C to stop.\n", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        failed = [p for p in procs if p.poll() is not None]
        log.error("a demo service stopped", cmd=" ".join(failed[0].args), code=failed[0].returncode)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
