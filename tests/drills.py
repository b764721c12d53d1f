"""The whole-box crash drill (no tests here; tests/test_drills_box.py runs it).

A box on loopback: `edgescreen dicom` (receiving, assembling series), `edgescreen worker` (analysing),
`edgescreen sync` (PACS export to a real Orthanc, de-identified cloud items to a real
`edgescreen cloud-receiver`). A scanner (pynetdicom, in a thread) sends phantom mammography exams and,
like a real modality, resends every instance until it is acknowledged. A killer SIGKILLs one service at
a random moment (receiving, analysing, exporting, syncing), or all of them at once (a power cut as far
as the processes can tell: what was only in a process's memory is gone), and restarts what it killed.

Then everything drains and the drill counts, from the box's store, Orthanc and the receiver's database:
* lost: instances acknowledged to the scanner that are not indexed whole; finished results whose PACS
  export or cloud item never arrived;
* duplicated: a job finished twice (two `job.finish` audit rows or two results), a cloud item stored
  twice by the receiver;
and the services must all stop cleanly at the end (exit 0 on SIGTERM).
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import EDGESCREEN, REPO, catches_sigterm
from tests.test_dicom_support import SERVICE_ENV, free_port

SERVICES = ("dicom", "worker", "sync")


@dataclass
class Box:
    tmp: Path
    data_dir: Path
    config: Path
    dicom_port: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)

    def start(self, name: str) -> None:
        args = {"dicom": ["dicom", "--port", str(self.dicom_port), "--bind", "127.0.0.1"],
                "worker": ["worker", "--poll", "0.2"],
                "sync": ["sync", "--poll", "0.2"]}[name]
        self.starts[name] = self.starts.get(name, 0) + 1
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child writes it; closed with the process
        self.procs[name] = subprocess.Popen([*EDGESCREEN, "--config", str(self.config), "--data-dir",
                                             str(self.data_dir), "--log-level", "debug", *args], cwd=REPO,
                                            env=SERVICE_ENV, stdout=log,
                                            stderr=subprocess.STDOUT)
        log.close()

    def kill(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.procs[name].send_signal(signal.SIGKILL)
        for name in names:
            self.procs[name].wait(timeout=30)

    def stop_all(self) -> dict[str, int]:
        # A service restarted a moment ago may still be in the interpreter's own start-up, before any Python
        # code could install a handler (the CLI installs one first thing): SIGTERM there is death by signal,
        # which systemd counts as a clean stop (SuccessExitStatus). The drill asks more of the code: from the
        # moment it runs, a SIGTERM stops it with exit 0.
        for proc in self.procs.values():
            deadline = time.monotonic() + 30
            while proc.poll() is None and not catches_sigterm(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        return {name: proc.wait(timeout=120) for name, proc in self.procs.items()}

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Scanner(threading.Thread):
    """Sends each exam's files, resending any instance not acknowledged (as a modality does) until all are."""

    def __init__(self, port: int, exams: list[list[Path]], gap_s: float) -> None:
        super().__init__(daemon=True)
        self.port, self.exams, self.gap_s = port, exams, gap_s
        self.acknowledged: set[str] = set()
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import pydicom
        from pynetdicom import AE

        for files in self.exams:
            pending = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
            while pending and not self.stop.is_set():
                ae = AE(ae_title="MG_ROOM_1")
                ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
                for p in pending.values():
                    meta = pydicom.filereader.read_file_meta_info(p)
                    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
                try:
                    assoc = ae.associate("127.0.0.1", self.port, ae_title="EDGE")
                    if assoc.is_established:
                        for sop, p in list(pending.items()):
                            rsp = assoc.send_c_store(p)
                            if rsp is not None and "Status" in rsp and rsp.Status == 0:
                                self.acknowledged.add(sop)
                                del pending[sop]
                            if not assoc.is_established:
                                break
                        if assoc.is_established:
                            assoc.release()
                except Exception:  # the service was killed mid-association: resend what is not acknowledged
                    pass
                if pending:
                    self.failures += 1
                    self.stop.wait(0.5)
            self.stop.wait(self.gap_s)


def config_text(orthanc, receiver_url: str, port: int) -> str:
    return f"""
[dicom]
ae_title = "EDGE"
allow_any_ae = true
stable_after_s = 1
min_free_mb = 0

[dicom.pacs]
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
retry_base_s = 0.2
retry_max_s = 1

[scheduler]
idle_grace_s = 0
store_quiet_s = 0
lease_s = 3
max_crashes = 100
failsafe = "idle"
dicom_stale_s = 3

[sync]
enabled = true
url = "{receiver_url}"
interval_s = 0.2
retry_base_s = 0.1
retry_max_s = 1
heartbeat_s = 3600
"""


def run_box_drill(tmp: Path, *, kills: int, exams: int, seed: int, gap_s: float = 1.0,
                  drain_timeout_s: float = 900) -> dict:
    from edgescreen.models.phantom.mg import write_mg_exam
    from tests.orthanc_server import orthanc
    from tests.test_cloud_receiver import start_receiver

    rng = random.Random(seed)
    exam_files = []
    for i in range(exams):
        folder = tmp / f"exam-{i}"
        write_mg_exam(folder, 100 + seed * 50 + i, finding="malignant" if i % 2 else None)
        exam_files.append(sorted(folder.glob("*.dcm")))
    with orthanc(tmp) as pacs:
        receiver = start_receiver(tmp / "receiver", "--allow-any-device")
        box = Box(tmp, tmp / "data", tmp / "site.toml", free_port())
        box.config.write_text(config_text(pacs, receiver.url, box.dicom_port))
        try:
            for name in SERVICES:
                box.start(name)
            time.sleep(3)  # the DICOM service listens (the scanner retries until it does anyway)
            scanner = Scanner(box.dicom_port, exam_files, gap_s)
            scanner.start()
            killed: dict[str, int] = {}
            during: dict[str, int] = {"receive": 0, "analysis": 0, "export_or_sync": 0}
            for _ in range(kills):
                time.sleep(rng.uniform(0.5, 4.0))
                target = rng.choice([*SERVICES, "power-cut"])
                names = SERVICES if target == "power-cut" else (target,)
                for phase, active in _activity(box, scanner).items():
                    during[phase] += int(active)
                box.kill(names)
                killed[target] = killed.get(target, 0) + 1
                time.sleep(rng.uniform(0.0, 1.0))
                for name in names:
                    box.start(name)
            scanner.join(timeout=drain_timeout_s)
            result = _drain(box, pacs, receiver, exams, time.monotonic() + drain_timeout_s)
            result.update({"kills": kills, "killed": killed, "kills_during": during, "scanner_resends": scanner.failures,
                           "acknowledged": len(scanner.acknowledged)})
            result["lost_instances"] = _lost_instances(box, scanner.acknowledged)
        finally:
            exit_codes = box.stop_all()
            receiver.stop()
        result["exit_codes"] = exit_codes
        result["phi_in_logs"] = _phi_in_logs([box.log(n) for n in SERVICES] + [receiver.log()], exam_files)
        result["lost"] = (len(result["lost_instances"]) + result["missing_exports"] + result["missing_cloud_items"]
                          + result["missing_results"])
        result["duplicated"] = result["jobs_finished_twice"] + result["cloud_items_stored_twice"]
    return result


def _activity(box: Box, scanner: Scanner) -> dict[str, bool]:
    """What the box was doing at the moment of a kill (several at once is common)."""
    try:
        conn = sqlite3.connect(box.data_dir / "edgescreen.db", timeout=5)
        try:
            running = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()[0]
            pending = conn.execute("SELECT COUNT(*) FROM outbox WHERE state <> 'sent' AND kind <> 'cloud.health'"
                                   ).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        running = pending = 0
    return {"receive": scanner.is_alive(), "analysis": running > 0, "export_or_sync": pending > 0}


def _counts(box: Box) -> dict:
    conn = sqlite3.connect(box.data_dir / "edgescreen.db", timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        jobs = conn.execute("SELECT id, state FROM jobs").fetchall()
        outbox = conn.execute("SELECT kind, idempotency_key, state FROM outbox WHERE kind <> 'cloud.health'").fetchall()
        finishes = conn.execute("SELECT target, COUNT(*) AS n FROM audit WHERE action = 'job.finish' "
                                "GROUP BY target").fetchall()
        results = conn.execute("SELECT job_id, COUNT(*) AS n FROM results GROUP BY job_id").fetchall()
    finally:
        conn.close()
    return {"jobs": [dict(r) for r in jobs], "outbox": [dict(r) for r in outbox],
            "finishes": {r["target"]: r["n"] for r in finishes}, "results": {r["job_id"]: r["n"] for r in results}}


def _drain(box: Box, pacs, receiver, exams: int, deadline: float) -> dict:
    """Wait until every exam is analysed and every outbox row sent (restarting any service that died)."""
    while time.monotonic() < deadline:
        for name, proc in box.procs.items():
            if proc.poll() is not None:  # a service that exits on its own is a failure of the drill...
                raise AssertionError(f"{name} exited {proc.returncode} by itself:\n{box.log(name)[-3000:]}")
        c = _counts(box)
        done = [j for j in c["jobs"] if j["state"] == "done"]
        if len(c["jobs"]) == exams and len(done) == exams and c["outbox"] and \
                all(o["state"] == "sent" for o in c["outbox"]):
            break
        time.sleep(1.0)
    else:
        c = _counts(box)
        raise AssertionError(f"the box did not drain: jobs {c['jobs']}, outbox states "
                             f"{sorted({o['state'] for o in c['outbox']})}\nworker:\n{box.log('worker')[-2500:]}\n"
                             f"sync:\n{box.log('sync')[-2500:]}")
    c = _counts(box)
    rec = sqlite3.connect(receiver.data_dir / "receiver.db", timeout=30)
    try:
        stored = [r[0] for r in rec.execute("SELECT idempotency_key FROM items WHERE kind <> 'cloud.health'")]
    finally:
        rec.close()
    cloud_keys = {o["idempotency_key"] for o in c["outbox"] if o["kind"].startswith("cloud.")}
    pacs_rows = [o for o in c["outbox"] if o["kind"] == "pacs"]
    return {
        "jobs": len(c["jobs"]),
        "missing_results": sum(1 for j in c["jobs"] if c["results"].get(j["id"], 0) == 0),
        "jobs_finished_twice": sum(1 for n in c["finishes"].values() if n > 1)
        + sum(1 for n in c["results"].values() if n > 1),
        "missing_exports": max(0, exams - len(pacs_rows)) + sum(1 for o in pacs_rows if o["state"] != "sent"),
        "missing_cloud_items": len(cloud_keys - set(stored)),
        "cloud_items_stored_twice": len(stored) - len(set(stored)),
        "orthanc_instances": len(pacs.get("/instances")),
    }


def _phi_in_logs(logs: list[str], exams: list[list[Path]]) -> list[str]:
    """Patient names, IDs, birth dates and accession numbers of the exams found in any service's log (debug
    level included): none may be there."""
    import pydicom

    identity: set[str] = set()
    for files in exams:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
            value = str(ds.get(keyword) or "").strip()
            if len(value) >= 4:
                identity.add(value)
    text = "\n".join(logs)
    return sorted(v for v in identity if v in text)


def _lost_instances(box: Box, acknowledged: set[str]) -> list[str]:
    conn = sqlite3.connect(box.data_dir / "edgescreen.db", timeout=30)
    try:
        rows = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT sop_uid, path, size FROM instances")}
    finally:
        conn.close()
    lost = []
    for sop in acknowledged:
        row = rows.get(sop)
        if row is None or not (box.data_dir / row[0]).is_file() or (box.data_dir / row[0]).stat().st_size != row[1]:
            lost.append(sop)
    return lost


def record(figures: dict) -> None:
    """The `drills` section of bench/results.json (make drills only)."""
    import os

    if os.environ.get("EDGESCREEN_DRILL_RESULTS") != "1":
        return
    from bench.results_io import write_section

    keep = {k: v for k, v in figures.items() if k != "lost_instances"}
    write_section("drills", json.loads(json.dumps(keep)), command="make drills")
