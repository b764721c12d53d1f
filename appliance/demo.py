"""Running the appliance's services together for a demo, and feeding them over DICOM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edgescreen.appliance import RESEARCH_USE_BANNER
from edgescreen.appliance.context import AppContext
from edgescreen.appliance.logs import get_logger

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
    cmd = [sys.executable, "-m", "edgescreen.appliance.cli", "--data-dir", str(ctx.data_dir)]
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


class ScannerExam:
    """A simulated CT exam, as a real scanner announces one: MPPS N-CREATE (IN PROGRESS) when it starts, N-SET
    (COMPLETED) when it ends. Between the two the gate reads the scanner as busy and the worker waits with that
    reason, which the web UI's system page and worklist show."""

    STATION = "DEMO_CT"

    def __init__(self, host: str, port: int, called_ae: str) -> None:
        from pydicom.uid import generate_uid

        self.host, self.port, self.called_ae = host, port, called_ae
        self.uid = generate_uid()

    def _send(self, create: bool) -> int:
        from pydicom.dataset import Dataset
        from pynetdicom import AE
        from pynetdicom.sop_class import ModalityPerformedProcedureStep

        ae = AE(ae_title=self.STATION)
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae)
        if not assoc.is_established:
            raise RuntimeError(f"MPPS association to {self.called_ae}@{self.host}:{self.port} was not accepted")
        ds = Dataset()
        now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
        try:
            if create:
                step = Dataset()
                step.StudyInstanceUID, step.AccessionNumber, step.ReferencedStudySequence = "", "DEMO", []
                step.RequestedProcedureID, step.ScheduledProcedureStepID = "DEMO", "DEMO"
                ds.ScheduledStepAttributesSequence = [step]
                ds.PatientName, ds.PatientID = "PHANTOM^NEXT^PATIENT", "PHANTOM-NEXT"
                ds.PerformedProcedureStepID, ds.PerformedStationAETitle = "DEMO1", self.STATION
                ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = now
                ds.PerformedProcedureStepDescription, ds.Modality = "CT ABDOMEN WO", "CT"
                ds.PerformedProcedureStepStatus = "IN PROGRESS"
                status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, self.uid)
            else:
                ds.PerformedProcedureStepStatus = "COMPLETED"
                ds.PerformedProcedureStepEndDate, ds.PerformedProcedureStepEndTime = now
                status, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, self.uid)
            return int(getattr(status, "Status", -1))
        finally:
            assoc.release()

    def __enter__(self) -> ScannerExam:
        self._send(create=True)
        return self

    def __exit__(self, *exc_info) -> None:
        self._send(create=False)


def _cloud_link(ctx: AppContext, procs: list[subprocess.Popen], cloud_port: int, started: float) -> bool:
    """The demo's cloud link "comes back" once the first study is analysed (or after two minutes): only then
    does the fleet receiver start, so its page shows the queued findings arriving. True once it is up."""
    first_done = ctx.store.query_one("SELECT 1 FROM jobs WHERE state = 'done' LIMIT 1") is not None
    if not first_done and time.monotonic() - started < 120:
        return False
    procs.append(_service(ctx, "cloud-receiver", "--port", str(cloud_port), "--data-dir",
                          str(ctx.data_dir / "cloud"), "--allow-any-device"))
    _wait_port("127.0.0.1", cloud_port, procs[-1])
    print(f"\n  cloud link is back: findings arrive, de-identified, at http://127.0.0.1:{cloud_port}/\n", flush=True)
    return True


def run_demo(ctx: AppContext, folders: list[Path], *, web: tuple[str, int], dicom_port: int, send: bool,
             cloud_port: int | None = None, exam_s: float = 45.0) -> int:
    from edgescreen.appliance.accounts import FIRST_ADMIN, ensure_first_admin

    ae_title = ctx.config.dicom.ae_title
    password = ensure_first_admin(ctx.store)  # printed once below; `serve` then finds a user and prints nothing
    # SIGTERM (systemd, a test, `kill`) must stop the services too, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    procs = [
        _service(ctx, "dicom", "--port", str(dicom_port), "--ae-title", ae_title, "--allow-any-ae"),
        _service(ctx, "serve", "--host", web[0], "--port", str(web[1])),
        _service(ctx, "worker"),
    ]
    if cloud_port:  # results queue in the outbox while the cloud link is down (issue 12)
        procs.append(_service(ctx, "sync", "--poll", "2"))
    started, link_up = time.monotonic(), not cloud_port
    try:
        _wait_port("127.0.0.1", dicom_port, procs[0])
        _wait_port(web[0], web[1], procs[1])
        login = (f"  log in as '{FIRST_ADMIN}' with the one-time password {password} (shown once; you choose "
                 "your own at that login)\n" if password else "  log in with your edgescreen user\n")
        print(f"\n  edgescreen demo is running: open http://{web[0]}:{web[1]}/\n{login}  {RESEARCH_USE_BANNER}\n"
              "  Press Ctrl-C to stop.\n", flush=True)
        if send:
            # the scanner is busy while it sends and for a while after (the next patient): analysis waits, and
            # the System page says why; then the idle grace passes and the studies are analysed
            with ScannerExam("127.0.0.1", dicom_port, ae_title):
                print(f"  a simulated CT exam is in progress (MPPS from {ScannerExam.STATION}) for {exam_s:.0f} s: "
                      "analysis waits for the scanner", flush=True)
                sent = send_folders(folders, "127.0.0.1", dicom_port, ae_title)
                print(f"  sent {sent} phantom images to {ae_title} on port {dicom_port}", flush=True)
                deadline = time.monotonic() + exam_s
                while time.monotonic() < deadline and all(p.poll() is None for p in procs):
                    time.sleep(1)
            print("  the simulated exam ended: analyses start after the idle grace period", flush=True)
        if cloud_port:
            print(f"  cloud link is down: results wait in the outbox (receiver: http://127.0.0.1:{cloud_port}/)\n",
                  flush=True)
        while all(p.poll() is None for p in procs):
            if not link_up:
                link_up = _cloud_link(ctx, procs, cloud_port, started)
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
