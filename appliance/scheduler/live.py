"""The live gate on a box: scanner and power sources built from the site config, read at each safe point."""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgescreen.appliance.context import AppContext
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.power.sources import PowerReading
from edgescreen.appliance.scheduler import control
from edgescreen.appliance.scheduler.policy import Decision, PowerGate, plan
from edgescreen.appliance.scheduler.scanner import (
    ClinicHoursSource,
    ManualSource,
    MppsSource,
    PowerDrawSource,
    ScannerSource,
    ScannerState,
    StoreActivitySource,
    combine,
)

log = get_logger(__name__)


@dataclass
class Observation:
    now: float
    scanner: ScannerState
    power: PowerReading | None
    decision: Decision


class LiveGate:
    """Reads every source and applies the policy; records scanner and power changes as events."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        cfg = ctx.config
        store = ctx.store
        self.power_source = None
        if cfg.power.nut_host:
            from edgescreen.appliance.power.nut import NutPowerSource

            self.power_source = NutPowerSource(cfg.power.nut_host, cfg.power.nut_port, cfg.power.nut_ups,
                                               username=cfg.power.nut_username, password=cfg.power.nut_password)
        else:
            from edgescreen.appliance.power.battery import BatteryPowerSource

            battery = BatteryPowerSource()
            if battery.read().error is None:  # a box with its own battery (a laptop-class device)
                self.power_source = battery
        self._last_power: PowerReading | None = None
        scanner_aes = [p.ae_title for p in cfg.dicom.allowed] or None
        stale_s = cfg.scheduler.dicom_stale_s
        self.sources: list[ScannerSource] = [ManualSource(store), MppsSource(store, stale_after_s=stale_s),
                                             StoreActivitySource(store, cfg.scheduler.store_quiet_s, scanner_aes,
                                                                 stale_after_s=stale_s)]
        if cfg.power.scanner_power_var and cfg.power.scanner_busy_above is not None and cfg.power.nut_host:
            self.sources.append(PowerDrawSource(self._scanner_draw, cfg.power.scanner_power_var,
                                                cfg.power.scanner_busy_above, cfg.power.stale_after_s))
        if cfg.scheduler.clinic_hours:
            self.sources.append(ClinicHoursSource(cfg.scheduler.clinic_hours))
        self.gate = PowerGate(cfg.scheduler, cfg.power, ctx.profile)
        self._last_scanner: bool | None = None
        self._last_power_state: str | None = None

    def _scanner_draw(self) -> tuple[float | None, float, str | None]:
        reading = self._last_power
        if reading is None:
            return None, 0.0, "no reading yet"
        var = self.ctx.config.power.scanner_power_var
        value = reading.ups_load_percent if var == "ups.load" else reading.ups_realpower_w
        return value, reading.taken_at, reading.error

    def read(self, *, record: bool = True) -> tuple[float, ScannerState, PowerReading | None]:
        """Read every source once; changes of scanner or power state are recorded as events when `record`.

        Only the worker records (record=True): an onlooker such as the web's system page reads with
        record=False, so the timeline shows each change once, not once per process that looked.
        """
        now = time.time()
        power = self.power_source.read() if self.power_source is not None else None
        self._last_power = power
        scanner = combine([s.read(now) for s in self.sources], rule=self.ctx.config.scheduler.scanner_rule,
                          failsafe=self.ctx.config.scheduler.failsafe)
        if record:
            self._record_changes(now, scanner, power)
        return now, scanner, power

    def paused(self, mode_for_power: PowerReading | None = None) -> Decision | None:
        """The closed gate while staff paused the scheduler (appliance.scheduler.control), else None."""
        state = control.status(self.ctx.store)
        if not state["paused"]:
            return None
        on_battery = mode_for_power is not None and mode_for_power.on_mains is False
        return Decision(False, f"waiting: {state['text']}", self.ctx.profile.mode_for(on_battery=on_battery),
                        on_battery)

    def observe(self, *, run_now: bool = False, starving: bool = False, record: bool = True) -> Observation:
        """The gate's decision now, from the same sources and policy the worker uses (see `read` for `record`)."""
        now, scanner, power = self.read(record=record)
        decision = self.paused(power) or self.gate.decide(now, scanner, power, run_now=run_now, starving=starving)
        return Observation(now, scanner, power, decision)

    def plan(self, *, oldest_queued_age_s: float, run_now_waiting: bool) -> tuple[Decision, bool, bool]:
        """The worker's choice between jobs (policy.plan), closed while the scheduler is paused."""
        now, scanner, power = self.read()
        paused = self.paused(power)
        if paused is not None:
            return paused, False, False
        return plan(self.gate, now, scanner, power, oldest_queued_age_s=oldest_queued_age_s,
                    starvation_s=self.ctx.config.scheduler.starvation_s, run_now_waiting=run_now_waiting)

    def _record_changes(self, now: float, scanner: ScannerState, power: PowerReading | None) -> None:
        store = self.ctx.store
        if scanner.busy != self._last_scanner:
            store.add_event("scanner", "scheduler", "busy" if scanner.busy else "idle", scanner.reason, ts=now)
            self._last_scanner = scanner.busy
        if power is not None:
            state = ("stale" if power.stale else "battery-low" if power.low_battery else
                     "battery" if power.on_mains is False else "mains")
            if state != self._last_power_state:
                detail = power.error or f"{power.status_raw} charge={power.battery_percent} runtime_s={power.runtime_s}"
                store.add_event("power", power.source, state, detail, ts=now)
                self._last_power_state = state
