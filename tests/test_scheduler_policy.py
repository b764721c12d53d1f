"""The gate's rules, exercised directly: every decision is explained, the fail-safe holds."""

from __future__ import annotations

import dataclasses
import time

import pytest

from edgescreen.appliance.config import load_profile
from edgescreen.appliance.config.site import Power, Scheduler
from edgescreen.appliance.power.sources import PowerReading
from edgescreen.appliance.scheduler.policy import POWER_GRACE_S, PowerGate
from edgescreen.appliance.scheduler.scanner import (
    ManualSource,
    MppsSource,
    ScannerSignal,
    StoreActivitySource,
    combine,
    set_manual,
)
from edgescreen.appliance.store import Store

T0 = 1_800_000_000.0
MAINS = PowerReading(on_mains=True, low_battery=False, forced_shutdown=False, battery_percent=100.0, runtime_s=3600.0,
                     ups_realpower_w=300.0, ups_load_percent=20.0, status_raw="OL", source="test", taken_at=T0,
                     stale=False, error=None)


def gate(**kw) -> PowerGate:
    sched = Scheduler(idle_grace_s=kw.pop("idle_grace_s", 120))
    return PowerGate(sched, Power(**kw), load_profile("x86-cpu"))


def idle(since: float | None = None):
    return combine([ScannerSignal("mpps", False, since, "MPPS exam ended")])


def busy(since: float):
    return combine([ScannerSignal("mpps", True, since, "MPPS exam in progress since 10:42")])


def test_busy_scanner_waits_and_says_why() -> None:
    d = gate().decide(T0, busy(T0 - 60), MAINS)
    assert not d.run and d.reason.startswith("waiting: scanner busy: MPPS exam in progress since 10:42 (mpps)")


def test_idle_grace_and_hysteresis() -> None:
    g = gate(idle_grace_s=120)
    assert not g.decide(T0, busy(T0 - 10), MAINS).run
    d = g.decide(T0 + 60, idle(T0 + 30), MAINS)
    assert not d.run and "120 s grace period until" in d.reason
    assert g.decide(T0 + 151, idle(T0 + 30), MAINS).run
    # the grace is measured from the last busy the gate saw, even if a source forgets it
    g.decide(T0 + 200, busy(T0 + 200), MAINS)
    assert not g.decide(T0 + 250, idle(None), MAINS).run
    assert g.decide(T0 + 321, idle(None), MAINS).run


def test_run_now_skips_grace_and_battery_threshold_but_never_busy_or_low_battery() -> None:
    g = gate(min_battery_percent=50)
    low_charge = dataclasses.replace(MAINS, on_mains=False, battery_percent=30.0, status_raw="OB")
    assert not g.decide(T0, idle(T0 - 5), low_charge).run
    assert g.decide(T0, idle(T0 - 5), low_charge, run_now=True).run
    assert not g.decide(T0, busy(T0 - 5), MAINS, run_now=True).run
    lb = dataclasses.replace(low_charge, low_battery=True, status_raw="OB LB")
    d = g.decide(T0, idle(T0 - 500), lb, run_now=True)
    assert not d.run and "low battery" in d.reason


@pytest.mark.parametrize(
    ("reading", "expected"),
    [
        (dict(on_mains=False, battery_percent=31.0), "waiting: on battery, 31% < 40%"),
        (dict(on_mains=False, battery_percent=90.0, runtime_s=300.0), "waiting: on battery, 5 min runtime < 15 min"),
        (dict(on_mains=False, low_battery=True, battery_percent=9.0), "waiting: UPS low battery"),
        (dict(forced_shutdown=True), "waiting: UPS forced shutdown"),
    ],
)
def test_power_rules(reading: dict, expected: str) -> None:
    d = gate().decide(T0, idle(T0 - 1000), dataclasses.replace(MAINS, **reading))
    assert not d.run and d.reason.startswith(expected)


def test_battery_above_thresholds_runs_in_low_power_mode() -> None:
    d = gate().decide(T0, idle(T0 - 1000), dataclasses.replace(MAINS, on_mains=False, battery_percent=80.0))
    assert d.run and d.on_battery and d.mode.name == "eco" and "on battery, 80.0%" in d.reason


def test_power_recovery_has_its_own_grace() -> None:
    g = gate()
    g.decide(T0, idle(T0 - 1000), dataclasses.replace(MAINS, on_mains=False, battery_percent=10.0))
    d = g.decide(T0 + 10, idle(T0 - 1000), MAINS)
    assert not d.run and "power recovered" in d.reason
    assert g.decide(T0 + POWER_GRACE_S + 1, idle(T0 - 1000), MAINS).run


def test_unreachable_ups_falls_back_to_failsafe_with_reason() -> None:
    stale = PowerReading.unavailable("nut:ups@127.0.0.1:3493", "connection refused", T0)
    d = gate().decide(T0, idle(T0 - 1000), stale)
    assert not d.run and "power state unknown (connection refused); fail-safe waits" in d.reason
    g = PowerGate(Scheduler(failsafe="idle"), Power(), load_profile("x86-cpu"))
    assert g.decide(T0, idle(T0 - 1000), stale).run


def test_site_budget_minus_scanner_draw_must_cover_the_box() -> None:
    g = gate(site_budget_w=2000)
    d = g.decide(T0, idle(T0 - 1000), dataclasses.replace(MAINS, ups_realpower_w=1980.0))
    assert not d.run and "site budget 2000 W - scanner 1980 W leaves 20 W < 45 W needed" in d.reason
    assert g.decide(T0, idle(T0 - 1000), dataclasses.replace(MAINS, ups_realpower_w=900.0)).run


def test_combine_rules_and_stale_sources() -> None:
    stale = ScannerSignal("power-draw", None, None, "ups.realpower unavailable", stale=True)
    quiet = ScannerSignal("store", False, None, "no images arriving")
    assert combine([quiet, stale], failsafe="busy").busy
    assert "fail-safe busy" in combine([quiet, stale], failsafe="busy").reason
    assert not combine([quiet, stale], failsafe="idle").busy
    receiving = ScannerSignal("store", True, T0, "receiving images")
    mpps_idle = ScannerSignal("mpps", False, T0 - 100, "MPPS exam ended")
    assert combine([receiving, mpps_idle], rule="any_busy").busy
    assert not combine([receiving, mpps_idle], rule="all_busy").busy
    manual = ScannerSignal("manual", False, T0, "set idle by staff")
    assert not combine([receiving, manual]).busy


def test_sources_read_the_store(tmp_path) -> None:
    store = Store(tmp_path)
    assert MppsSource(store).read(T0).busy is False

    def step(uid: str, station: str, status: str, ts: float) -> None:
        with store.transaction() as conn:
            conn.execute("INSERT INTO mpps (sop_uid, status, station_ae, attributes, created_at, updated_at) "
                         "VALUES (?, ?, ?, '{}', ?, ?) ON CONFLICT(sop_uid) DO UPDATE SET status = excluded.status, "
                         "updated_at = excluded.updated_at", (uid, status, station, ts, ts))

    step("1.1", "CT1", "IN PROGRESS", T0)
    sig = MppsSource(store).read(T0 + 10)
    assert sig.busy and "on CT1" in sig.reason and not sig.stale
    assert MppsSource(store, max_busy_s=5).read(T0 + 10).stale
    step("1.2", "MG1", "IN PROGRESS", T0 + 5)
    step("1.1", "CT1", "COMPLETED", T0 + 20)  # the CT's N-SET does not clear the mammography unit's exam
    sig = MppsSource(store).read(T0 + 30)
    assert sig.busy and "on MG1" in sig.reason
    step("1.2", "MG1", "DISCONTINUED", T0 + 40)
    assert MppsSource(store).read(T0 + 50).busy is False
    assert StoreActivitySource(store, quiet_s=60).read(T0).busy is False
    assert ManualSource(store).read(T0).busy is None
    set_manual(store, "busy", actor="test")
    assert ManualSource(store).read(T0).busy is True
    set_manual(store, "idle", actor="test")
    now = time.time()
    assert ManualSource(store).read(now).busy is False
    assert ManualSource(store).read(now + 9 * 3600).busy is None  # a forgotten idle expires
    assert [tuple(r) for r in store.query("SELECT action, target FROM audit ORDER BY id")] == [
        ("scanner.manual", "busy"), ("scanner.manual", "idle")]
    with pytest.raises(ValueError, match="use one of busy, idle, auto"):
        set_manual(store, "maybe", actor="test")


def test_jetson_power_mode_is_switched_once_per_change(tmp_path) -> None:
    """nvpmodel exists only on a Jetson; a stand-in executable records the calls the worker makes."""
    from edgescreen.appliance.scheduler.worker import PowerModeSwitch

    calls = tmp_path / "calls"
    tool = tmp_path / "nvpmodel"
    tool.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    tool.chmod(0o755)
    store = Store(tmp_path / "d")
    profile = load_profile("jetson-orin-nano")
    switch = PowerModeSwitch(store, nvpmodel=str(tool))
    switch.apply(profile.mode_for(on_battery=False))
    switch.apply(profile.mode_for(on_battery=False))
    switch.apply(profile.mode_for(on_battery=True))
    assert calls.read_text().split("\n")[:2] == ["-m 0", "-m 1"]
    assert [r["state"] for r in store.query("SELECT state FROM events WHERE source = 'nvpmodel'")] == ["15W", "7W"]
    PowerModeSwitch(store, nvpmodel=None).apply(load_profile("x86-cpu").mode_for(on_battery=True))  # no knob: no-op
