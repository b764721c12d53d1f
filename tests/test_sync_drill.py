"""The fault drill: items delivered exactly once through a proxy that drops, delays, answers 500/503, resets
mid-body and truncates, to two receiver processes on one real PostgreSQL (the client alternating between
them), with the sync process SIGKILLed at random points and a receiver killed and restarted.

`make test` runs a bounded sample (60 items, 4 kills, a receiver killed and restarted once); `make drills` runs
the full drill with SYNC_DRILL_ITEMS=1000 SYNC_DRILL_KILLS=20 SYNC_DRILL_RESTARTS=2. Each SIGKILL lands at a random point of real work: once the
process has moved the outbox a random number of steps (a row sent or deferred), plus a random fraction of a
second, never during its start-up. Nothing that reaches the receiver may carry the patient's name, ID or the
original study UID.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom

from edgescreen.appliance.store import Store, outbox
from edgescreen.appliance.store.outbox import OutboxItem
from tests.conftest import EDGESCREEN, REPO
from tests.fault_proxy import FaultProxy
from tests.postgres_server import postgres, requires_postgres
from tests.test_cloud_receiver import ENV, start_receiver
from tests.test_dicom_support import write_ct_series

PATIENT = {"PatientName": "DRILL^PATIENT^X", "PatientID": "DRILL-MRN-777", "PatientBirthDate": "19440229",
           "AccessionNumber": "DRILLACC0099"}
FAULTS = {"drop": 0.05, "drop_after": 0.05, "delay": 0.04, "http500": 0.04, "http503": 0.04, "reset": 0.04,
          "truncate": 0.05}


def patient_file(folder: Path) -> Path:
    """One CT slice carrying a patient's identity: the 'SEG' every file item de-identifies and uploads."""
    path = write_ct_series(folder, 1)[0]
    ds = pydicom.dcmread(path)
    for k, v in PATIENT.items():
        setattr(ds, k, v)
    ds.save_as(path)
    return path


def queue_items(data_dir: Path, n: int, dicom_file: Path, *, file_every: int = 8, seed: int = 0) -> tuple[set, str]:
    """n cloud items in studies of a summary and (every file_every-th) a file, each with its own key."""
    store = Store(data_dir)
    study = str(pydicom.dcmread(dicom_file).StudyInstanceUID)
    rng = random.Random(seed)
    items = []
    for i in range(n):
        group = f"cloud:drill-{i // 4}"
        key_hash = hashlib.sha256(f"{seed}:{i}:{rng.random()}".encode()).hexdigest()[:32]
        if i % file_every == file_every - 1:
            items.append(OutboxItem("cloud.seg", f"cloud.seg:{key_hash}",
                                    {"study_uid": study, "file": str(dicom_file), "phi": False}, group))
        else:
            findings = {"schema_version": 1, "pipeline": "pancreas", "triage": "suspicious" if i % 3 else
                        "not_suspicious", "abnormal_probability": round(rng.random(), 4), "threshold": 0.5,
                        "lesions": [], "models": [], "study_uid": study, "series_uid": None,
                        "disclaimer": "RESEARCH USE ONLY - NOT FOR CLINICAL USE."}
            items.append(OutboxItem("cloud.finding", f"cloud.finding:{key_hash}",
                                    {"study_uid": study, "findings": findings, "phi": False}, group))
    with store.transaction() as conn:
        outbox.add_items(conn, items)
    store.close()
    return {it.idempotency_key for it in items}, study


def sync_config(path: Path, url: str, **extra: object) -> Path:
    lines = ["[sync]", f'url = "{url}"', "retry_base_s = 0.05", "retry_max_s = 0.4", "timeout_s = 5",
             "heartbeat_s = 3600", "interval_s = 0.2", "chunk_kib = 4"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def sync_process(data_dir: Path, config: Path, *args: str, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen([*EDGESCREEN, "--config", str(config), "--data-dir", str(data_dir), "sync", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)


def _moved(store: Store) -> int:
    """How far the senders have moved the outbox: rows sent plus attempts made (each failure counts one)."""
    return int(store.query_one("SELECT COALESCE(SUM(attempts), 0) + SUM(state = 'sent') FROM outbox")[0] or 0)


def _kill_at_a_random_point(proc: subprocess.Popen, store: Store, rng: random.Random, steps: int) -> int:
    """SIGKILL once the process has moved the outbox `steps` further (it is past start-up, in the middle of a
    batch), after a further random 0-0.5 s; at the latest after 60 s. Returns how many rows it held leased
    when it died (rows in flight: what the next process must take over without loss or duplicate)."""
    start, deadline = _moved(store), time.monotonic() + 60
    while proc.poll() is None and _moved(store) < start + steps and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.5))
    held = store.query_one("SELECT COUNT(*) FROM outbox WHERE state = 'sending' AND lease_owner LIKE ?",
                           (f"%:{proc.pid}:%",))[0]
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return int(held)


def run_drill(tmp_path: Path, n_items: int, kills: int, *, restarts: int = 1, seed: int = 7) -> dict:
    rng = random.Random(seed)
    data_dir = tmp_path / "box"
    keys, study = queue_items(data_dir, n_items, patient_file(tmp_path / "src"), seed=seed)
    started = time.monotonic()
    with postgres() as pg:
        with ThreadPoolExecutor(2) as pool:  # the two processes start together, as behind a load balancer
            futures = [pool.submit(start_receiver, tmp_path / f"r{name}", "--allow-any-device", database_url=pg.url,
                                   name=name) for name in ("a", "b")]
        if any(f.exception() for f in futures):
            for f in futures:
                if f.exception() is None:
                    f.result().kill()
            raise next(f.exception() for f in futures if f.exception())
        a, b = (f.result() for f in futures)
        try:
            with FaultProxy([a.port, b.port], faults=FAULTS, seed=seed) as proxy:
                config = sync_config(tmp_path / "site.toml", proxy.url)
                log = tmp_path / "sync.log"
                done_kills = receiver_restarts = in_flight = 0
                restart_after = {(r + 1) * kills // (restarts + 1) for r in range(restarts)}  # kills spread evenly
                box = Store(data_dir)
                while done_kills < kills:
                    proc = sync_process(data_dir, config, "--poll", "0.1", log=log)
                    held = _kill_at_a_random_point(proc, box, rng, rng.randint(1, max(1, n_items // (2 * kills))))
                    in_flight += held > 0
                    done_kills += 1
                    if done_kills in restart_after:  # a receiver dies and comes back
                        a.kill()
                        time.sleep(0.5)
                        a = start_receiver(tmp_path / "ra", "--allow-any-device", port=a.port, database_url=pg.url,
                                           name="a")
                        receiver_restarts += 1
                faults_seen = dict(proxy.counts)
                # the faults stay on: the last run must still get everything through
                final = sync_process(data_dir, config, "--once", "--max-attempts", "40", "--deadline", "900",
                                     log=log)
                assert final.wait(timeout=960) == 0, log.read_text()[-3000:]
                faults_seen = dict(proxy.counts)
        finally:
            for r in (a, b):
                r.stop()
        stored = pg.psql("SELECT idempotency_key FROM items WHERE kind <> 'cloud.health'").split()
        dump = pg.dump()
    store = Store(data_dir)
    states = {r["state"]: r["n"] for r in store.query("SELECT state, COUNT(*) AS n FROM outbox WHERE kind <> "
                                                      "'cloud.health' GROUP BY state")}
    receiver_files = b"".join(p.read_bytes() for d in (tmp_path / "ra", tmp_path / "rb") for p in d.rglob("*")
                              if p.is_file())
    return {"keys": keys, "stored": stored, "states": states, "faults": faults_seen, "kills": done_kills,
            "kills_with_rows_in_flight": in_flight,
            "receiver_restarts": receiver_restarts, "dump": dump, "receiver_files": receiver_files, "study": study,
            "seconds": time.monotonic() - started,
            "duplicates_absorbed": sum((tmp_path / d).joinpath(f).read_text().count("already stored")
                                       for d in ("ra", "rb") for f in os.listdir(tmp_path / d) if f.endswith(".log"))}


def check_drill(result: dict, n_items: int) -> None:
    assert len(result["stored"]) == n_items, f"{len(result['stored'])} stored of {n_items}"
    assert len(set(result["stored"])) == n_items, "an item is in the database twice"
    assert set(result["stored"]) == result["keys"], "the database holds exactly the items queued"
    assert result["states"] == {"sent": n_items}, result["states"]
    for mode in ("drop", "drop_after", "http500", "http503", "reset", "truncate", "delay"):
        assert result["faults"].get(mode, 0) > 0, f"the proxy never injected {mode}: {result['faults']}"
    for needle in (PATIENT["PatientName"], PATIENT["PatientID"], PATIENT["AccessionNumber"], result["study"]):
        assert needle.encode() not in result["dump"], f"{needle} reached the receiver's database"
        assert needle.encode() not in result["receiver_files"], f"{needle} reached the receiver's files"


@requires_postgres
def test_fault_drill_sample(tmp_path: Path) -> None:
    n = int(os.environ.get("SYNC_DRILL_ITEMS", "60"))
    kills = int(os.environ.get("SYNC_DRILL_KILLS", "4"))
    restarts = int(os.environ.get("SYNC_DRILL_RESTARTS", "1"))
    result = run_drill(tmp_path, n, kills, restarts=restarts)
    check_drill(result, n)
    assert result["kills"] == kills and result["receiver_restarts"] == restarts
    assert result["kills_with_rows_in_flight"] >= 1, "no SIGKILL hit a sender holding rows"
    summary = {k: result[k] for k in ("faults", "kills", "kills_with_rows_in_flight", "receiver_restarts", "seconds",
                                      "duplicates_absorbed")}
    print(f"\nsync drill: {n} items exactly once; {json.dumps(summary, default=str)}")
    out = os.environ.get("SYNC_DRILL_REPORT")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"items": n, **summary}, default=str, indent=2))
