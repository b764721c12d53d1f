"""Sync benchmark: items per second delivered to the fleet receiver, against a plain HTTP POST loop.

Same run, same machine, same receiver (SQLite, one process, on loopback):
  baseline     a bare loop of JSON POSTs (requests, keep-alive) of the same summaries: no outbox, no
               de-identification, no leases; what the transport alone costs
  sync_clean   `SyncService.run_once` over the outbox (claims, de-identified summaries, settle rows)
  sync_faults  the same through tests/fault_proxy.py (drop, drop_after, delay, 500, 503, reset, truncate);
               then the delivery ratio (stored / queued) and duplicates (rows per key - 1) in the database
  backlog      a clinic day (200 studies: summary + SEG + SR each = 600 items) queued while the link is
               down; seconds from the link coming back (the receiver starts) to the last item stored

Writes section "sync" of bench/results.json (bench/results_io.py). Run: .venv/bin/python bench/bench_sync.py
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results_io import machine, write_section  # noqa: E402


def _service(data_dir: Path, url: str, **sync: object):  # noqa: ANN202
    from appliance.config.site import SiteConfig
    from appliance.context import AppContext
    from appliance.sync.service import SyncService

    config = SiteConfig.model_validate({"sync": {"url": url, "retry_base_s": 0.05, "retry_max_s": 0.5,
                                                 "heartbeat_s": 86400, "timeout_s": 5, **sync}})
    return SyncService(AppContext(config=config, data_dir=data_dir))


def _count(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        rows, keys = conn.execute("SELECT COUNT(*), COUNT(DISTINCT idempotency_key) FROM items WHERE kind <> "
                                  "'cloud.health'").fetchone()
    return rows, keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=400, help="summaries per throughput run (default 400)")
    parser.add_argument("--studies", type=int, default=200, help="studies in the backlog run (default 200)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results.json alone")
    args = parser.parse_args()
    info = machine()

    import requests

    from tests.fault_proxy import FaultProxy
    from tests.test_cloud_receiver import receiver
    from tests.test_sync_drill import FAULTS, patient_file, queue_items

    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        root = Path(tmp)
        src = patient_file(root / "src")
        with receiver(root / "cloud", "--allow-any-device") as rec:
            # baseline: a plain POST loop of the same bodies
            body = {"schema_version": 1, "pipeline": "pancreas", "triage": "suspicious", "abnormal_probability": 0.9,
                    "threshold": 0.5, "lesions": [], "models": []}
            session = requests.Session()
            session.headers["X-Edgescreen-Device"] = "baseline"
            t0 = time.perf_counter()
            for i in range(args.items):
                r = session.post(rec.url + "/api/v1/items", json={"key": f"cloud.finding:b{i}", "kind": "cloud.finding",
                                                                  "body": body}, timeout=30)
                r.raise_for_status()
            baseline_s = time.perf_counter() - t0
            figures["baseline_items_per_s"] = round(args.items / baseline_s, 1)

            # the sync service, clean link
            clean = root / "clean"
            queue_items(clean, args.items, src, file_every=10**9, seed=1)
            service = _service(clean, rec.url)
            t0 = time.perf_counter()
            assert service.run_once() == 0
            clean_s = time.perf_counter() - t0
            service.close()
            figures["sync_clean_items_per_s"] = round(args.items / clean_s, 1)
            figures["sync_clean_vs_baseline"] = round(baseline_s / clean_s, 3)

            # the sync service through the fault proxy
            faulty = root / "faults"
            before = _count(root / "cloud" / "receiver.db")
            keys, _ = queue_items(faulty, args.items, src, file_every=10**9, seed=2)
            with FaultProxy([rec.port], faults=FAULTS, seed=3) as proxy:
                service = _service(faulty, proxy.url)
                t0 = time.perf_counter()
                code = service.run_once(max_attempts=40)
                faults_s = time.perf_counter() - t0
                service.close()
                injected = {k: v for k, v in proxy.counts.items() if k != "pass"}
            after = _count(root / "cloud" / "receiver.db")
            stored_rows, stored_keys = after[0] - before[0], after[1] - before[1]
            figures.update({
                "sync_faults_items_per_s": round(args.items / faults_s, 1),
                "sync_faults_vs_baseline": round(baseline_s / faults_s, 3),
                "faults_injected": injected,
                "fault_run_exit": code,
                "delivery_ratio": round(stored_keys / len(keys), 4),
                "duplicates": stored_rows - stored_keys,
            })

        # backlog: a clinic day queued while the link is down, then the link comes back
        from appliance.store import Store, outbox
        from appliance.store.outbox import OutboxItem

        backlog = root / "backlog"
        store = Store(backlog)
        study_seg = str(src)
        items = []
        for s in range(args.studies):
            group = f"cloud:day-{s}"
            items.append(OutboxItem("cloud.finding", f"cloud.finding:day{s}", {"study_uid": "1.2.3", "phi": False,
                                    "findings": {**body, "study_uid": "1.2.3"}}, group))
            items.append(OutboxItem("cloud.seg", f"cloud.seg:day{s}", {"study_uid": "1.2.3", "file": study_seg,
                                                                       "phi": False}, group))
            items.append(OutboxItem("cloud.sr", f"cloud.sr:day{s}", {"study_uid": "1.2.3", "file": study_seg,
                                                                     "phi": False}, group))
        with store.transaction() as conn:
            outbox.add_items(conn, items)
        from tests.conftest import free_port

        port = free_port()
        service = _service(backlog, f"http://127.0.0.1:{port}")
        assert service.run_once(max_attempts=2, deadline_s=5) == 1, "the link is down: nothing can be sent"
        with receiver(root / "cloud2", "--allow-any-device", port=port) as rec2:
            t0 = time.perf_counter()
            code = service.run_once(max_attempts=10)
            backlog_s = time.perf_counter() - t0
        service.close()
        rows, keys2 = _count(root / "cloud2" / "receiver.db")
        figures.update({"backlog_studies": args.studies, "backlog_items": len(items),
                        "backlog_seconds_after_link_back": round(backlog_s, 2), "backlog_delivered": keys2,
                        "backlog_exit": code, "items": args.items})
        _ = rec2
    command = f"{sys.executable} bench/bench_sync.py --items {args.items} --studies {args.studies}"
    print(json.dumps(figures, indent=2))
    if not args.no_write:
        write_section("sync", figures, command=command, machine_info=info)
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
