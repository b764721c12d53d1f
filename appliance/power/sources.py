"""What every power source reports: one `PowerReading`, whatever sensed it.

The power gate must decide "may heavy work start now?" from a UPS on NUT, a laptop-style battery
or nothing at all, so every source is reduced to the same record. Unknown is spelled ``None``, not a
guess: a gate that cannot tell whether the box is on mains must be able to see that, and choose its
own conservative policy, rather than inherit an optimistic default from the sensing layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# NUT ups.status tokens (RFC 9271 / NUT docs, "ups.status" values). Kept here so every source that
# synthesises a status (the OS battery, a future GPIO mains sensor) speaks the same words.
STATUS_TOKENS: dict[str, str] = {
    "OL": "on line (mains present)",
    "OB": "on battery",
    "LB": "low battery",
    "HB": "high battery",
    "RB": "battery needs replacement",
    "CHRG": "battery charging",
    "DISCHRG": "battery discharging",
    "BYPASS": "UPS bypass circuit active (no battery protection)",
    "CAL": "runtime calibration",
    "OFF": "UPS output off",
    "OVER": "UPS overloaded",
    "TRIM": "UPS trimming high input voltage",
    "BOOST": "UPS boosting low input voltage",
    "FSD": "forced shutdown in progress",
    "ALARM": "UPS alarm raised",
    "WAIT": "driver connected but no data yet (NUT 2.8+)",
}


def parse_status(status: str | None) -> tuple[str, ...]:
    """Split a ``ups.status`` value into upper-case tokens, keeping their order.

    Unknown tokens are kept (drivers add vendor flags); callers test membership.
    """
    if not status:
        return ()
    return tuple(token.upper() for token in status.split())


def on_mains_from_flags(flags: tuple[str, ...]) -> bool | None:
    """OB wins over OL: if a confused driver reports both, assume the worse case (on battery)."""
    if "OB" in flags:
        return False
    if "OL" in flags:
        return True
    return None


@dataclass(frozen=True)
class PowerReading:
    """One observation of the box's power supply, as the power gate consumes it.

    ``stale`` is true whenever the values below cannot be trusted as current (source unreachable,
    driver disconnected, data stale at upsd); ``error`` then says why, in words a technician can act
    on. A stale reading carries no remembered values: the gate keeps its own history if it wants one.
    """

    on_mains: bool | None
    low_battery: bool
    forced_shutdown: bool
    battery_percent: float | None
    runtime_s: float | None
    ups_realpower_w: float | None
    ups_load_percent: float | None
    status_raw: str
    source: str
    taken_at: float
    stale: bool
    error: str | None
    status_flags: tuple[str, ...] = ()
    # True when ups_realpower_w was computed as ups.load x ups.realpower.nominal because the UPS
    # does not report ups.realpower itself (common on small line-interactive units).
    realpower_derived: bool = False

    @property
    def ok(self) -> bool:
        """A usable reading: fresh and without error."""
        return not self.stale and self.error is None

    @property
    def charging(self) -> bool:
        return "CHRG" in self.status_flags

    @property
    def on_bypass(self) -> bool:
        return "BYPASS" in self.status_flags

    @property
    def output_off(self) -> bool:
        return "OFF" in self.status_flags

    @classmethod
    def unavailable(cls, source: str, error: str, taken_at: float | None = None) -> PowerReading:
        """A reading that says only "I could not find out", with the reason."""
        return cls(
            on_mains=None,
            low_battery=False,
            forced_shutdown=False,
            battery_percent=None,
            runtime_s=None,
            ups_realpower_w=None,
            ups_load_percent=None,
            status_raw="",
            source=source,
            taken_at=time.time() if taken_at is None else taken_at,
            stale=True,
            error=error,
        )


@runtime_checkable
class PowerSource(Protocol):
    """Anything the gate can poll. ``read`` must never raise: failures become stale readings."""

    source: str

    def read(self) -> PowerReading: ...


def to_float(value: str | float | int | None) -> float | None:
    """Lenient number parsing: NUT values are strings and some drivers pad or suffix them."""
    if value is None:
        return None
    if isinstance(value, int | float):
        number = float(value)
    else:
        words = value.split()
        if not words:
            return None
        try:
            number = float(words[0])
        except ValueError:
            return None
    return number if math.isfinite(number) else None
