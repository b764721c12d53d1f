"""A synthetic store the size of a clinic's year: 1 M instances, 10,000 studies, 10,000 jobs (issue 16).

    python bench/gen_store.py --data-dir /tmp/edgescreen-1m            # about 4 GB of small files, minutes
    python bench/gen_store.py --data-dir D --studies 1000 --no-files   # rows only, for a quick look

The shape follows the worklist target of the web issue: 3,000 CT studies of a 300-slice axial series
plus a 24-slice localizer series, and 7,000 four-view mammography exams; 1,000 jobs queued, a few
running and failed, the rest done with results; MPPS steps, events and audit rows to match; received
times spread over a year. Every instance row has its file: a real, tiny Part 10 file (8 x 8 pixels)
whose UIDs are the row's, under files/<study>/<series>/ like the DICOM service writes them, so the
service's start-up recovery and the series checks meet what they would on a box.

Rows go in through one connection in bulk (this is a generator, not the appliance: the appliance's
own writes go through store/instances.py and store/jobs.py). The schema is the appliance's, made by
opening a Store, so every index and migration is there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CT = "1.2.840.10008.5.1.4.1.1.2"
MG = "1.2.840.10008.5.1.4.1.1.1.2"
UID_WIDTH = 60  # every generated UID has this length, so a template's bytes can be patched in place
DAY = 86400.0


def uid(kind: int, n: int) -> str:
    """A valid UID of exactly UID_WIDTH characters (2.25 root, no leading zeros in a component)."""
    body = f"{kind}{n:0{UID_WIDTH - 6}d}"
    return f"2.25.{body}"[:UID_WIDTH]


def template(sop_class: str, modality: str) -> tuple[bytes, dict[str, bytes]]:
    """A tiny valid Part 10 file with placeholder UIDs; returns (bytes, placeholder -> its bytes)."""
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import ExplicitVRLittleEndian

    marks = {name: uid(9, i + 1) for i, name in enumerate(("study", "series", "sop"))}
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = marks["sop"]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, marks["sop"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = marks["study"], marks["series"]
    ds.Modality, ds.PatientID, ds.PatientName = modality, "SYN-000000", "SYNTHETIC^PATIENT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    buf = DicomBytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue(), {k: v.encode() for k, v in marks.items()}


class FileWriter:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.templates = {CT: template(CT, "CT"), MG: template(MG, "MG")}
        self.made: set[str] = set()

    def write(self, rel: str, sop_class: str, study: str, series: str, sop: str) -> int:
        blob, marks = self.templates[sop_class]
        data = blob.replace(marks["study"], study.encode()).replace(marks["series"], series.encode()) \
            .replace(marks["sop"], sop.encode())
        directory = rel.rsplit("/", 1)[0]
        if directory not in self.made:
            (self.data_dir / directory).mkdir(parents=True, exist_ok=True)
            self.made.add(directory)
        fd = os.open(self.data_dir / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return len(data)


def generate(data_dir: Path, *, studies: int = 10_000, ct_slices: int = 300, jobs: int | None = None,
             files: bool = True, seed: int = 16, now: float | None = None) -> dict:
    """30 % CT studies (`ct_slices` axial + a 24-slice localizer), 70 % four-view mammography exams; one job
    per analysable series (`jobs` caps them). The defaults make 1,000,000 instances and 10,000 jobs."""
    from edgescreen.appliance.store import Store

    t0 = time.monotonic()
    now = time.time() if now is None else now
    rng = random.Random(seed)
    store = Store(data_dir)
    conn = store.connect()
    conn.execute("PRAGMA synchronous=OFF")
    writer = FileWriter(data_dir) if files else None
    n_ct = round(studies * 0.3)
    n_mg = studies - n_ct
    n_studies = n_ct + n_mg
    jobs = n_studies if jobs is None else jobs
    job_states = ["queued"] * min(1000, jobs // 10) + ["running"] * 3 + ["failed"] * 20
    counts = {"studies": 0, "series": 0, "instances": 0, "jobs": 0, "bytes": 0}
    study_rows, series_rows, inst_rows, job_rows, result_rows, mpps_rows, event_rows, audit_rows = ([] for _ in range(8))

    def flush() -> None:
        conn.executemany("INSERT INTO studies (study_uid, patient_id, patient_name, study_date, accession, "
                         "description, modalities, received_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)", study_rows)
        conn.executemany("INSERT INTO series (series_uid, study_uid, modality, description, body_part, number, state, "
                         "reason, pipeline, first_received_at, last_received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                         series_rows)
        conn.executemany("INSERT INTO instances (sop_uid, series_uid, sop_class_uid, transfer_syntax, instance_number, "
                         "path, size, calling_ae, received_at) VALUES (?,?,?,?,?,?,?,?,?)", inst_rows)
        conn.executemany("INSERT INTO jobs (id, study_uid, series_uid, pipeline, state, stage, priority, lease_owner, "
                         "lease_expires, attempts, waiting_reason, error, created_at, updated_at, started_at, "
                         "finished_at, progress) VALUES (?,?,?,?,?,?,0,?,?,0,?,?,?,?,?,?,?)", job_rows)
        conn.executemany("INSERT INTO results (job_id, study_uid, triage, findings, output_dir, created_at) "
                         "VALUES (?,?,?,?,?,?)", result_rows)
        conn.executemany("INSERT INTO mpps (sop_uid, status, calling_ae, station_ae, modality, study_uid, attributes, "
                         "created_at, updated_at) VALUES (?,?,?,?,?,?,'{}',?,?)", mpps_rows)
        conn.executemany("INSERT INTO events (ts, kind, source, state, detail) VALUES (?,?,?,?,?)", event_rows)
        conn.executemany("INSERT INTO audit (ts, actor, action, target, detail) VALUES (?,?,?,?,?)", audit_rows)
        for rows in (study_rows, series_rows, inst_rows, job_rows, result_rows, mpps_rows, event_rows, audit_rows):
            rows.clear()

    conn.execute("BEGIN")
    job_id = 0
    for s in range(n_studies):
        is_ct = s < n_ct
        received = now - 365 * DAY + (s + rng.random()) * (365 * DAY / n_studies)
        study = uid(1, s + 1)
        pid = f"SYN-{s:06d}"
        study_rows.append((study, pid, f"SYNTHETIC^PATIENT{s}", time.strftime("%Y%m%d", time.localtime(received)),
                           f"ACC{s:07d}", "CT ABDOMEN" if is_ct else "MAMMO SCREENING", "CT" if is_ct else "MG",
                           received, received))
        series_specs = ([(ct_slices, "AXIAL 2.5", "pancreas"), (24, "LOCALIZER", None)] if is_ct
                        else [(4, "MAMMO 4 VIEWS", "mammo")])
        for k, (n, description, pipeline) in enumerate(series_specs):
            series = uid(2, s * 4 + k + 1)
            state = "queued" if pipeline else "not_analysed"
            series_rows.append((series, study, "CT" if is_ct else "MG", description, "ABDOMEN" if is_ct else "BREAST",
                                k + 1, state, None if pipeline else "CT localizer (scout) images only", pipeline,
                                received, received + n * 0.2))
            sop_class = CT if is_ct else MG
            for i in range(n):
                sop = uid(3, counts["instances"] + 1)
                rel = f"files/{study}/{series}/{sop}.dcm"
                size = writer.write(rel, sop_class, study, series, sop) if writer else 1500
                inst_rows.append((sop, series, sop_class, "1.2.840.10008.1.2.1", i + 1, rel, size,
                                  "CT_ROOM_1" if is_ct else "MG_ROOM_1", received + i * 0.2))
                counts["instances"] += 1
                counts["bytes"] += size
            counts["series"] += 1
            if writer is not None:  # the directory was last changed when its last instance arrived
                last = received + n * 0.2
                os.utime(data_dir / "files" / study / series, (last, last))
            if pipeline and job_id < jobs:
                job_id += 1
                # the newest jobs are the ones still queued / running
                left = jobs - job_id
                jstate = job_states[left] if left < len(job_states) else "done"
                started = received + 300 if jstate != "queued" else None
                finished = received + 900 if jstate in ("done", "failed") else None
                job_rows.append((job_id, study, series, pipeline, jstate, "stage2" if jstate == "running" else None,
                                 "w" if jstate == "running" else None, now + 120 if jstate == "running" else None,
                                 "waiting: scanner busy: MPPS exam in progress on CT_ROOM_1" if jstate == "queued"
                                 else None, "RuntimeError: synthetic" if jstate == "failed" else None,
                                 received + n * 0.2 + 30, finished or received + 30, started, finished,
                                 0.4 if jstate == "running" else None))
                if jstate == "done":
                    triage = rng.choice(["not_suspicious"] * 8 + ["suspicious", "indeterminate"])
                    result_rows.append((job_id, study, triage, json.dumps({"triage": triage}),
                                        f"results/job-{job_id}", finished))
                event_rows.append((received + 30, "job", "worker", jstate, json.dumps({"job": job_id})))
                audit_rows.append((received + 30, "dicom", "job.create", str(job_id), None))
        if is_ct:
            mpps_rows.append((uid(4, s + 1), "COMPLETED", "CT_ROOM_1", "CT_ROOM_1", "CT", study, received - 600,
                              received))
        counts["studies"] += 1
        if len(inst_rows) >= 50_000:
            flush()
    flush()
    counts["jobs"] = job_id
    conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'jobs'", (job_id,))
    # the DICOM service stopped cleanly a minute ago: its heartbeat says the index was durable then
    conn.execute("INSERT OR REPLACE INTO heartbeats (service, pid, host, started_at, beat_at, stopped_at, "
                 "durable_before, detail) VALUES ('dicom', 0, 'gen', ?, ?, ?, ?, NULL)",
                 (now - 7200, now - 60, now - 60, now - 60))
    conn.execute("COMMIT")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    counts["seconds"] = round(time.monotonic() - t0, 1)
    counts["files"] = files
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--studies", type=int, default=10_000, help="30 %% CT, 70 %% mammography (default 10,000)")
    parser.add_argument("--ct-slices", type=int, default=300, help="slices of each CT series (default 300: with "
                        "the defaults, 1,000,000 instances)")
    parser.add_argument("--jobs", type=int, help="cap on jobs (default: one per analysable series)")
    parser.add_argument("--no-files", action="store_true", help="rows only (no instance files)")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args(argv)
    if (args.data_dir / "edgescreen.db").exists():
        print(f"{args.data_dir} already holds a store; give an empty directory", file=sys.stderr)
        return 2
    print(json.dumps(generate(args.data_dir, studies=args.studies, ct_slices=args.ct_slices, jobs=args.jobs,
                              files=not args.no_files, seed=args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
