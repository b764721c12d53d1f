"""Retention (issue 13): what is deleted, when, never before delivery and review, crash-safe, applied by the worker."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edgescreen.appliance.config import ConfigError, load_site_config
from edgescreen.appliance.config.site import Retention, SiteConfig
from edgescreen.appliance.context import AppContext
from edgescreen.appliance.store import Store, jobs
from edgescreen.appliance.store import retention as ret
from edgescreen.appliance.store.instances import IncomingInstance, store_instance
from edgescreen.appliance.store.outbox import OutboxItem, claim, settle
from tests.conftest import REPO, run_cli

DAY = 86400.0
OLD = time.time() - 40 * DAY  # older than images_days (30), younger than results_days (365)


def add_study(store: Store, name: str, *, job: str | None = "done", reviewed: float | None = OLD,
              export: str | None = "sent", when: float = OLD, n: int = 3) -> dict:
    """A study with n received images, and (job="done") a result with an output file and a PACS export."""
    study = f"1.2.826.0.1.3680043.10.13.{abs(hash(name)) % 10**8}"
    series = f"{study}.1"
    for i in range(n):
        inst = IncomingInstance(f"{series}.{i}", "1.2.840.10008.5.1.4.1.1.2", study, series, instance_number=i,
                                study={"patient_id": name}, series={"modality": "CT"})
        store_instance(store, inst, os.urandom(2000))
    info = {"study": study, "files": [store.data_dir / r["path"] for r in store.query(
        "SELECT path FROM instances WHERE series_uid = ?", (series,))], "out": None}
    if job is None:
        return info
    jobs.enqueue(store, study, series, "pancreas")
    claimed = jobs.claim_next(store, "w", 60)
    out = store.results_dir / f"job-{claimed['id']}"
    out.mkdir(parents=True)
    (out / "seg.dcm").write_bytes(os.urandom(3000))
    info["out"] = out
    if job == "failed":
        jobs.release(store, claimed["id"], "w", to="failed", error="boom")
        return info
    items = [OutboxItem("pacs", f"pacs:{study}", {"study_uid": study, "files": [], "done": []})] if export else []
    assert jobs.finish(store, claimed["id"], "w", triage="not_suspicious", findings_json="{}", output_dir=str(out),
                       outbox_items=items)
    with store.transaction() as conn:
        conn.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (when, claimed["id"]))
        if reviewed is not None:
            conn.execute("UPDATE results SET reviewed_by = 'dr', reviewed_at = ? WHERE job_id = ?", (reviewed, claimed["id"]))
    if export == "sent":
        for row in claim(store, "sender", 60, kinds=["pacs"], due_by=time.time() + 1):
            if json.loads(row["payload"])["study_uid"] == study:
                assert settle(store, row["id"], "sent", "sender", sent_at=when)
            else:
                settle(store, row["id"], "defer", "sender", next_attempt_at=0)
    return info


@pytest.fixture
def store(data_dir: Path) -> Store:
    return Store(data_dir)


def test_only_studies_delivered_and_reviewed_long_enough_ago_lose_their_images(store: Store) -> None:
    due = add_study(store, "due")
    unreviewed = add_study(store, "unreviewed", reviewed=None)
    undelivered = add_study(store, "undelivered", export="pending")
    failed = add_study(store, "failed", job="failed")
    recent = add_study(store, "recent", reviewed=time.time() - DAY, when=time.time() - DAY)
    unanalysed = add_study(store, "unanalysed", job=None)
    policy = Retention()

    plan = ret.purge(store, policy, dry_run=True)
    assert [s.study_uid for s in plan.images] == [due["study"]]
    assert plan.kept == {"results not reviewed": 1, "results not yet delivered": 1, "not analysed": 1,
                         "a job not done (receiving, queued, running, failed or quarantined)": 1,
                         "within 30 days of delivery and review": 1}
    assert all(p.exists() for p in due["files"]), "a dry run deletes nothing"

    done = ret.purge(store, policy, actor="test")
    assert done.images[0].files == 3 and done.images[0].bytes == 6000
    assert not any(p.exists() for p in due["files"])
    for kept in (unreviewed, undelivered, failed, recent, unanalysed):
        assert all(p.exists() for p in kept["files"])
    assert store.query_one("SELECT COUNT(*) FROM instances i JOIN series s USING (series_uid) WHERE s.study_uid = ?",
                           (due["study"],))[0] == 0
    study = store.query_one("SELECT images_purged_at FROM studies WHERE study_uid = ?", (due["study"],))
    assert study["images_purged_at"] is not None
    # the findings, the result files (kept longer) and the audit trail remain
    assert store.query_one("SELECT COUNT(*) FROM results WHERE study_uid = ?", (due["study"],))[0] == 1
    assert (due["out"] / "seg.dcm").exists()
    audit = store.query_one("SELECT actor, detail FROM audit WHERE action = 'retention.delete_images' AND target = ?",
                            (due["study"],))
    assert audit["actor"] == "test" and "3 instance(s)" in audit["detail"]
    assert store.recover(remove_temp=False)["missing_files"] == [], "no row may point at a deleted file"
    assert ret.purge(store, policy).empty(), "a second pass finds nothing more"


def test_result_files_audit_and_events_go_after_their_own_longer_times(store: Store) -> None:
    due = add_study(store, "old", reviewed=time.time() - 400 * DAY, when=time.time() - 400 * DAY)
    with store.transaction() as conn:
        conn.execute("INSERT INTO audit (ts, actor, action) VALUES (?, 'x', 'ancient')", (time.time() - 4000 * DAY,))
        conn.execute("INSERT INTO events (ts, kind, source) VALUES (?, 'scanner', 'x')", (time.time() - 100 * DAY,))
    done = ret.purge(store, Retention(), actor="test")
    assert len(done.images) == 1 and [o.job_id for o in done.outputs] and done.audit_rows == 1 and done.event_rows == 1
    assert not due["out"].exists()
    assert store.query_one("SELECT outputs_purged_at FROM results")[0] is not None
    assert store.query_one("SELECT COUNT(*) FROM audit WHERE action = 'ancient'")[0] == 0
    assert store.query_one("SELECT COUNT(*) FROM audit WHERE action = 'retention.delete_log_rows'")[0] == 1


def test_quarantined_instances_expire(store: Store) -> None:
    from edgescreen.appliance.store.instances import quarantine_record

    _, path = quarantine_record(store, [b"not dicom"], "unreadable")
    with store.transaction() as conn:
        conn.execute("UPDATE quarantine SET received_at = ?", (time.time() - 100 * DAY,))
    done = ret.purge(store, Retention(), actor="test")
    assert len(done.quarantine) == 1 and not path.exists()
    assert store.query_one("SELECT COUNT(*) FROM quarantine")[0] == 0


def test_a_pass_interrupted_before_its_commit_puts_the_files_back(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    due = add_study(store, "crash")
    real_audit = store.audit

    def crash(*args, **kwargs):  # the process dies between moving the files aside and committing
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "audit", crash)
    with pytest.raises(KeyboardInterrupt):
        ret.purge(store, Retention())
    monkeypatch.setattr(store, "audit", real_audit)
    assert not any(p.exists() for p in due["files"]) and (store.data_dir / ret.PURGING).is_dir()
    assert ret.recover(store) == 1
    assert all(p.exists() for p in due["files"]), "rows were never deleted: the files must be back"
    assert store.recover(remove_temp=False)["missing_files"] == []


def test_a_pass_interrupted_after_its_commit_finishes_on_the_next(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    due = add_study(store, "crash-late")
    monkeypatch.setattr(ret.shutil, "rmtree", lambda *a, **k: None)  # dies before removing the moved files
    ret.purge(store, Retention())
    monkeypatch.undo()
    batch = next((store.data_dir / ret.PURGING).iterdir())
    assert any(batch.iterdir())
    assert ret.recover(store) == 1
    assert not (store.data_dir / ret.PURGING).exists() or not any((store.data_dir / ret.PURGING).iterdir())
    assert not any(p.exists() for p in due["files"])
    # and the DICOM service's restart recovery finds nothing to re-ingest
    assert store.recover(remove_temp=False)["unclaimed_files"] == []


def test_the_worker_applies_the_policy_when_idle(data_dir: Path) -> None:
    from edgescreen.appliance.scheduler.worker import Worker

    store = Store(data_dir)
    due = add_study(store, "worker")
    ctx = AppContext(config=SiteConfig(), data_dir=data_dir)
    worker = Worker(ctx, poll_s=0.1)
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while any(p.exists() for p in due["files"]) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop.set()
        thread.join(10)
    assert not any(p.exists() for p in due["files"]), "the idle worker did not apply the retention policy"
    assert Store(data_dir).query_one("SELECT actor FROM audit WHERE action = 'retention.delete_images'")[0] == \
        "worker:retention"


def test_purge_command_dry_run_then_for_real(data_dir: Path) -> None:
    store = Store(data_dir)
    due = add_study(store, "cli")
    add_study(store, "cli-unreviewed", reviewed=None)
    dry = run_cli("purge", "--dry-run", data_dir=data_dir, check=True)
    assert f"would delete images of study {due['study']}: 3 file(s)" in dry.stdout
    assert "kept 1 study(ies): results not reviewed" in dry.stdout
    assert all(p.exists() for p in due["files"])
    plan = json.loads(run_cli("purge", "--dry-run", "--json", data_dir=data_dir, check=True).stdout)
    assert plan["dry_run"] and [s["study_uid"] for s in plan["images"]] == [due["study"]]
    real = run_cli("purge", data_dir=data_dir, check=True)
    assert f"deleted images of study {due['study']}" in real.stdout
    assert not any(p.exists() for p in due["files"])


def test_policy_must_keep_results_and_audit_longer(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text("[retention]\nimages_days = 60\nresults_days = 30\n")
    with pytest.raises(ConfigError, match="results_days .* must be at least images_days"):
        load_site_config(cfg)
    cfg.write_text("[retention]\naudit_days = 100\n")
    with pytest.raises(ConfigError, match="retention.audit_days"):
        load_site_config(cfg)


def test_disk_full_messages_point_to_purge() -> None:
    from edgescreen.appliance.scheduler import retry

    message = retry.describe(OSError(errno.ENOSPC, "No space left on device"), "disk_full")
    assert "edgescreen purge" in message
    stale = subprocess.run(["grep", "-rn", "--include=*.py", "delete old studies", "appliance"], cwd=REPO,
                           capture_output=True, text=True).stdout
    assert stale == "", f"a disk-full message still tells staff to delete by hand:\n{stale}"
