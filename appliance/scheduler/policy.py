"""The power gate: may inference run now? Every answer carries the reason staff will read.

The rules, from the site config: the scanner idle for `idle_grace_s`; power fine (on mains, or on
battery above the configured charge and runtime, never on low battery or forced shutdown); the site
budget minus the scanner's draw covers the box. Hysteresis keeps the gate from flapping: it opens only
after the scanner and the power have stayed good for their grace periods, and closes at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgescreen.appliance.config.profile import HardwareProfile, PowerMode
from edgescreen.appliance.config.site import Power, Scheduler
from edgescreen.appliance.power.sources import PowerReading
from edgescreen.appliance.scheduler.scanner import ScannerState

POWER_GRACE_S = 60.0
STARVING_GRACE_S = 30.0


@dataclass(frozen=True)
class Decision:
    run: bool
    reason: str
    mode: PowerMode
    on_battery: bool = False


def _clock(ts: float) -> str:
    return time.strftime("%H:%M", time.localtime(ts))


class PowerGate:
    """Stateful only for hysteresis: when the scanner was last busy and power was last bad."""

    def __init__(self, scheduler: Scheduler, power: Power, profile: HardwareProfile) -> None:
        self.cfg = scheduler
        self.power_cfg = power
        self.profile = profile
        self.last_busy_at: float | None = None
        self.power_bad_at: float | None = None

    def decide(self, now: float, scanner: ScannerState, power: PowerReading | None, *,
               run_now: bool = False, starving: bool = False) -> Decision:
        """`run_now` (a staff override) skips the grace periods and battery thresholds, never a busy
        scanner or a low battery; `starving` shortens the idle grace so old jobs are not deferred forever."""
        mains_mode = self.profile.mode_for(on_battery=False)
        if scanner.busy:
            self.last_busy_at = now
            return Decision(False, f"waiting: {scanner.reason}", mains_mode)
        idle_since = max((t for t in (scanner.since, self.last_busy_at) if t is not None), default=None)
        grace = 0.0 if run_now else (min(self.cfg.idle_grace_s, STARVING_GRACE_S) if starving else self.cfg.idle_grace_s)
        if idle_since is not None and now - idle_since < grace:
            # no running count in the text: a reason that changes every poll would rewrite every queued row
            return Decision(False, f"waiting: scanner idle since {_clock(idle_since)}, {grace:.0f} s grace period "
                            f"until {_clock(idle_since + grace)}", mains_mode)
        ok, reason, on_battery = self._power_ok(now, power, run_now)
        mode = self.profile.mode_for(on_battery=on_battery)
        if not ok:
            return Decision(False, f"waiting: {reason}", mode, on_battery)
        budget = self._budget_problem(power, mode)
        if budget:
            return Decision(False, f"waiting: {budget}", mode, on_battery)
        why = "run now (staff override)" if run_now else f"scanner idle{' since ' + _clock(idle_since) if idle_since else ''}"
        return Decision(True, f"running: {why}; {reason}; {mode.name} mode", mode, on_battery)

    def _power_ok(self, now: float, power: PowerReading | None, run_now: bool) -> tuple[bool, str, bool]:
        if power is None:
            return True, "no UPS configured", False
        if power.stale:
            self.power_bad_at = now
            if self.cfg.failsafe == "busy":
                return False, f"power state unknown ({power.error}); fail-safe waits", False
            return True, f"power state unknown ({power.error}); fail-safe runs", False
        if power.forced_shutdown:
            self.power_bad_at = now
            return False, "UPS forced shutdown", True
        if power.low_battery:
            self.power_bad_at = now
            return False, f"UPS low battery ({power.battery_percent or '?'}%)", True
        on_battery = power.on_mains is False
        if on_battery and not run_now:
            cfg = self.power_cfg
            if power.battery_percent is not None and power.battery_percent < cfg.min_battery_percent:
                self.power_bad_at = now
                return False, f"on battery, {power.battery_percent:.0f}% < {cfg.min_battery_percent:.0f}%", True
            if power.runtime_s is not None and power.runtime_s < cfg.min_runtime_min * 60:
                self.power_bad_at = now
                return False, (f"on battery, {power.runtime_s / 60:.0f} min runtime < "
                               f"{cfg.min_runtime_min:.0f} min"), True
        if not run_now and self.power_bad_at is not None and now - self.power_bad_at < POWER_GRACE_S:
            return False, (f"power recovered at {_clock(self.power_bad_at)}, waiting {POWER_GRACE_S:.0f} s "
                           "to be sure it holds"), on_battery
        if on_battery:
            return True, f"on battery, {power.battery_percent if power.battery_percent is not None else '?'}%", True
        return True, "on mains", False

    def _budget_problem(self, power: PowerReading | None, mode: PowerMode) -> str | None:
        budget = self.power_cfg.site_budget_w
        if budget is None:
            return None
        scanner_w = power.ups_realpower_w if power is not None and not power.stale else None
        if scanner_w is None:
            return None if self.cfg.failsafe == "idle" else "scanner draw unknown with a site power budget set"
        left = budget - scanner_w
        if left < mode.watts:
            return f"site budget {budget:.0f} W - scanner {scanner_w:.0f} W leaves {left:.0f} W < {mode.watts:.0f} W needed"
        return None


def plan(gate: PowerGate, now: float, scanner: ScannerState, power: PowerReading | None, *,
         oldest_queued_age_s: float, starvation_s: float, run_now_waiting: bool) -> tuple[Decision, bool, bool]:
    """The worker's choice between safe points, shared with the simulator: (decision, only_run_now, starving).

    A starving queue shortens the idle grace; if the gate is still closed and staff marked a job
    "run now", the gate is asked again for that job alone.
    """
    starving = oldest_queued_age_s > starvation_s
    decision = gate.decide(now, scanner, power, starving=starving)
    if not decision.run and run_now_waiting:
        forced = gate.decide(now, scanner, power, run_now=True)
        if forced.run:
            return forced, True, starving
    return decision, False, starving
