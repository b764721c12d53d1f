"""Helpers for the DICOM tests (no tests here): the service as a real subprocess, dcmtk peers, small series.

`dicom_server(...)` starts `edgescreen --data-dir D dicom --port P ...` exactly as a technician
would, waits until it answers C-ECHO, and stops it with SIGTERM on exit, checking it exited 0; its
log is kept in a file and quoted when something fails. dcmtk tools always run with TCP_NODELAY=1
(without it each C-STORE stalls ~40 ms on delayed ACKs) and by absolute path: the venv has
pynetdicom's own `storescu`/`echoscu` scripts, which would shadow dcmtk's on PATH.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    generate_uid,
)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin" / "edgescreen"
EDGESCREEN = [str(VENV_BIN)] if VENV_BIN.exists() else [sys.executable, "-m", "edgescreen.appliance.cli"]
STORESCU, ECHOSCU = "/usr/bin/storescu", "/usr/bin/echoscu"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
SERVICE_ENV = {**os.environ, "EDGESCREEN_CONFIG": "", "PYTHONPATH": str(REPO)}

requires_dcmtk = pytest.mark.skipif(not (Path(STORESCU).exists() and Path(ECHOSCU).exists()),
                                    reason="dcmtk not installed (apt install dcmtk)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo(port: int, aet: str = "ECHOSCU", aec: str = "EDGE") -> subprocess.CompletedProcess:
    return subprocess.run([ECHOSCU, "-aet", aet, "-aec", aec, "127.0.0.1", str(port)], env=DCMTK_ENV,
                          capture_output=True, text=True, timeout=30)


def storescu(port: int, paths: Sequence[Path] | Path, aet: str = "SCANNER", *extra: str,
             check: bool = True) -> subprocess.CompletedProcess:
    """Send files (or a directory, scanned for *.dcm) with dcmtk's storescu; returns the process."""
    targets = [str(paths), "+sd", "+sp", "*.dcm"] if isinstance(paths, Path) else [str(p) for p in paths]
    proc = subprocess.run([STORESCU, "-aet", aet, "-aec", "EDGE", *extra, "127.0.0.1", str(port), *targets],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"storescu exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class DicomServer:
    port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen = field(repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"edgescreen dicom ignored SIGTERM for {timeout} s:\n{self.log()[-3000:]}") from None
        return self.proc.returncode

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; service log:\n{self.log()[-4000:]}")


# The receive path dicom_server starts the service with ("fast" or "stock"): the receive tests run on both
# (tests/test_dicom_service.py switches it per test through its `receive_path` fixture).
RECEIVE_PATH = {"value": "fast"}


def start_dicom(tmp_path: Path, *args: str, config: str | None = None, data_dir: Path | None = None,
                allow_any: bool = True, stable_after: float = 1.0, port: int | None = None) -> DicomServer:
    """Start `edgescreen dicom` as a subprocess and wait until it answers C-ECHO (the crash drills kill it)."""
    data_dir = data_dir or tmp_path / "data"
    port = port or free_port()
    cmd = list(EDGESCREEN)
    if config is not None:
        cfg = tmp_path / f"site-{port}.toml"
        cfg.write_text(config)
        cmd += ["--config", str(cfg)]
    cmd += ["--data-dir", str(data_dir), "dicom", "--port", str(port), "--ae-title", "EDGE",
            "--stable-after", str(stable_after), "--receive-path", RECEIVE_PATH["value"], *args]
    if allow_any:
        cmd.append("--allow-any-ae")
    log_path = tmp_path / f"dicom-{port}-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=SERVICE_ENV, cwd=REPO)
    server = DicomServer(port, data_dir, log_path, proc)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"edgescreen dicom exited {proc.returncode} at start:\n{server.log()}")
        probe = echo(port)
        if probe.returncode == 0 or "Rejected" in probe.stdout + probe.stderr:  # up (and maybe strict)
            return server
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"edgescreen dicom did not listen within 60 s:\n{server.log()}")
        time.sleep(0.1)


@contextlib.contextmanager
def dicom_server(tmp_path: Path, *args: str, config: str | None = None, data_dir: Path | None = None,
                 allow_any: bool = True, stable_after: float = 1.0) -> Iterator[DicomServer]:
    """Run `edgescreen dicom` as a subprocess for the block; assert it stops cleanly (exit 0) on SIGTERM."""
    server = start_dicom(tmp_path, *args, config=config, data_dir=data_dir, allow_any=allow_any,
                         stable_after=stable_after)
    try:
        yield server
    finally:
        rc = server.stop()
    assert rc == 0, f"edgescreen dicom exited {rc} after SIGTERM:\n{server.log()[-4000:]}"
    assert "DICOM service stopped" in server.log()


# -- small synthetic series (fast to write; the rules, not the pixels, are under test) ---------------
def _file_dataset(sop_class: str, study: str, series: str, **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = attrs.pop("sop_uid", None) or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = attrs.pop("patient_id", "TEST-0001")
    ds.PatientName = "TEST^DICOM"
    ds.StudyDate = "20240101"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def write_ct_series(out: Path, n: int, *, thickness: float = 2.5, size: int = 64, study: str | None = None,
                    localizer: bool = False, orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
                    body_part: str = "ABDOMEN", series_number: int = 2) -> list[Path]:
    """n CT slices of size x size, 16-bit; the geometry attributes the assembly rules read."""
    out.mkdir(parents=True, exist_ok=True)
    study = study or generate_uid()
    series = generate_uid()
    rng = np.random.default_rng(n)
    paths = []
    for k in range(n):
        ds = _file_dataset(CTImageStorage, study, series, Modality="CT", SeriesNumber=series_number,
                           InstanceNumber=k + 1, BodyPartExamined=body_part,
                           ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER" if localizer else "AXIAL"],
                           ImageOrientationPatient=list(orientation), ImagePositionPatient=[0, 0, k * thickness],
                           SliceThickness=thickness, PixelSpacing=[0.8, 0.8], Rows=size, Columns=size,
                           SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=16,
                           BitsStored=12, HighBit=11, PixelRepresentation=0, RescaleIntercept=-1024,
                           RescaleSlope=1)
        ds.PixelData = rng.integers(0, 2000, (size, size), dtype=np.uint16).tobytes()
        path = out / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_mg_series(out: Path, views: Sequence[tuple[str, str]], *, study: str, series_number: int,
                    for_processing: bool = False, size: int = 96) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    sop = DigitalMammographyXRayImageStorageForProcessing if for_processing else \
        DigitalMammographyXRayImageStorageForPresentation
    paths = []
    for k, (laterality, view) in enumerate(views):
        ds = _file_dataset(sop, study, series, Modality="MG", SeriesNumber=series_number, InstanceNumber=k + 1,
                           ImageLaterality=laterality, ViewPosition=view, Rows=size, Columns=size,
                           SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=16,
                           BitsStored=12, HighBit=11, PixelRepresentation=0,
                           PresentationIntentType="FOR PROCESSING" if for_processing else "FOR PRESENTATION")
        ds.PixelData = np.full((size, size), 100 + k, dtype=np.uint16).tobytes()
        path = out / f"MG{series_number:02d}{k:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send_raw(port: int, path: Path, aet: str = "RAWSCU") -> int | None:
    """Send a file's data set bytes exactly as they are (pynetdicom, chunked: never decoded), even when
    they are garbage; the request's SOP class/instance come from the file meta. Returns the status."""
    from pynetdicom import AE, _config

    meta = pydicom.filereader.read_file_meta_info(path)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title=aet)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
        assert assoc.is_established, "association refused"
        try:
            rsp = assoc.send_c_store(path)
            return int(rsp.Status) if "Status" in rsp else None
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def open_store(data_dir: Path):
    from edgescreen.appliance.store import Store

    return Store(data_dir)
