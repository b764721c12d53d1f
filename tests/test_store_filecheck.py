"""`Store.check_files`, the doctor's bounded look at whether the index and files/ agree (issue 17): the
series directories changed since the DICOM service's durable heartbeat (its own start-up recovery's
scope), or all of them within a time budget, plus a random sample of instance rows; never a walk of
every file (`Store.recover`, 158 s at 1 M instances)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from edgescreen.appliance.config import SiteConfig
from edgescreen.appliance.context import AppContext
from edgescreen.appliance.doctor import Box, check_database
from edgescreen.appliance.store import Store, heartbeat
from edgescreen.appliance.store.db import RECOVERY_MARGIN_S
from edgescreen.appliance.store.instances import IncomingInstance, store_instance

CT = "1.2.840.10008.5.1.4.1.1.2"


def _fill(store: Store, studies: int = 4, per_series: int = 5) -> dict[str, list[Path]]:
    """series directory -> its instance files (one series per study)."""
    out: dict[str, list[Path]] = {}
    for s in range(studies):
        study, series = f"1.2.3.{s}", f"1.2.3.{s}.1"
        for n in range(per_series):
            path, _ = store_instance(store, IncomingInstance(f"{series}.{n}", CT, study, series, instance_number=n),
                                     b"DICM" * 8, durable_index=False)
            out.setdefault(str(path.parent), []).append(path)
    return out


def _age(store: Store, seconds: float) -> None:
    """Make every study and series directory look untouched for `seconds` (as on a box running for days)."""
    old = time.time() - seconds
    for study in store.files_dir.iterdir():
        for series in study.iterdir():
            os.utime(series, (old, old))
        os.utime(study, (old, old))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "data")


def test_without_a_heartbeat_every_directory_is_checked(store: Store) -> None:
    series = _fill(store)
    gone = next(iter(series.values()))[2]
    gone.unlink()
    stray = Path(next(iter(series))) / "unindexed.dcm"
    stray.write_bytes(b"x")
    report = store.check_files()
    rel = str(gone.relative_to(store.data_dir))
    assert report["missing_files"] == [rel] and report["complete"] and report["directories"] == 4
    assert report["unclaimed_files"] == [str(stray.relative_to(store.data_dir))]
    assert report["since"] is None and "every series directory" in report["scope"]
    assert report["missing_files"] == store.recover(remove_temp=False)["missing_files"]  # the full walk agrees


def test_with_a_durable_heartbeat_only_changed_directories_and_a_sample(store: Store) -> None:
    series = _fill(store, studies=6)
    _age(store, 3600)
    heartbeat.beat(store, "dicom", started_at=time.time() - 7200, durable_before=time.time() - 60)
    quiet = store.check_files(sample=0)
    assert quiet["directories"] == 0 and quiet["missing_files"] == [] and quiet["complete"]
    assert quiet["since"] == pytest.approx(time.time() - 60 - RECOVERY_MARGIN_S, abs=5)

    dirs = list(series)
    changed = series[dirs[0]][0]
    changed.unlink()  # a file removed since the durable point: its directory's time says so
    shutil.rmtree(dirs[1])  # a whole series gone (its study directory is old): only the sample can see it
    os.utime(Path(dirs[1]).parent, (time.time() - 3600, time.time() - 3600))
    report = store.check_files(sample=0)
    assert report["directories"] == 1 and report["missing_files"] == [str(changed.relative_to(store.data_dir))]
    sampled = store.check_files(sample=1000)  # more than the rows: every row is looked at
    assert sampled["sampled"] == 6 * 5
    lost = sorted(str(p.relative_to(store.data_dir)) for p in series[dirs[1]])
    assert sampled["missing_files"] == sorted([str(changed.relative_to(store.data_dir)), *lost])
    assert "changed since" in sampled["scope"] and "sampled at random" in sampled["scope"]


def test_the_walk_stops_at_its_budget(store: Store) -> None:
    _fill(store)
    report = store.check_files(budget_s=0.0, sample=3)
    assert not report["complete"] and report["directories"] == 0 and report["sampled"] == 3
    assert "stopped after 0 s" in report["scope"]


def test_a_row_removed_meanwhile_is_not_reported(store: Store) -> None:
    """Retention deletes files, then rows: a row gone by the time the check reads it again is no loss."""
    series = _fill(store, studies=1)
    path = next(iter(series.values()))[0]
    path.unlink()
    with store.transaction() as conn:
        conn.execute("DELETE FROM instances WHERE path = ?", (str(path.relative_to(store.data_dir)),))
    assert store.check_files()["missing_files"] == []


def test_the_doctor_reports_missing_files_from_the_bounded_check(tmp_path: Path) -> None:
    ctx = AppContext(config=SiteConfig(), data_dir=tmp_path / "data")
    series = _fill(ctx.store)
    assert check_database(Box(ctx)).status == "ok"
    next(iter(series.values()))[0].unlink()
    check = check_database(Box(ctx))
    assert check.status == "fail" and "1 instance files are missing" in check.detail and check.fix
