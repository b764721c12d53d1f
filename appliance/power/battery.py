"""The OS-reported battery (laptops, NUCs with a battery pack, some mini-PC UPS HATs) as a power source.

Used where a clinic runs the appliance on a laptop, as CAD4TB often does: there is no NUT daemon,
but the kernel's power_supply class knows whether the charger is plugged in. psutil reads it
portably. The OS gives no low-battery flag, so LB is synthesised from a configurable threshold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psutil

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.power.sources import PowerReading, on_mains_from_flags

log = get_logger(__name__)

NO_BATTERY = "no battery reported by the OS"


class BatteryPowerSource:
    """Reads ``psutil.sensors_battery()``; `read` never raises.

    ``probe`` exists so a caller (or a test) can supply another sensor with the same
    ``(percent, secsleft, power_plugged)`` shape, e.g. a HAT driver.
    """

    source = "battery:os"

    def __init__(self, low_percent: float = 10.0, probe: Callable[[], Any] | None = None) -> None:
        self.low_percent = low_percent
        self._probe = probe or psutil.sensors_battery

    def read(self) -> PowerReading:
        taken_at = time.time()
        try:
            battery = self._probe()
        except Exception as exc:  # psutil raises odd errors on exotic power_supply drivers
            log.warning("battery probe failed", source=self.source, error=repr(exc))
            return PowerReading.unavailable(self.source, f"battery probe failed: {exc!r}", taken_at)
        if battery is None:
            return PowerReading.unavailable(self.source, NO_BATTERY, taken_at)

        percent = float(battery.percent)
        plugged = battery.power_plugged  # None when the OS cannot tell
        secsleft = battery.secsleft
        # POWER_TIME_UNLIMITED (charging) and POWER_TIME_UNKNOWN are negative sentinels, not runtimes.
        runtime = float(secsleft) if isinstance(secsleft, int | float) and secsleft >= 0 else None
        flags: list[str] = []
        if plugged is True:
            flags.append("OL")
        elif plugged is False:
            flags += ["OB", "DISCHRG"]
        if percent <= self.low_percent:
            flags.append("LB")
        status = " ".join(flags)
        return PowerReading(
            on_mains=on_mains_from_flags(tuple(flags)),
            low_battery="LB" in flags,
            forced_shutdown=False,
            battery_percent=percent,
            runtime_s=runtime,
            ups_realpower_w=None,
            ups_load_percent=None,
            status_raw=status,
            source=self.source,
            taken_at=taken_at,
            stale=False,
            error=None,
            status_flags=tuple(flags),
        )
