"""Box power meters: how many watts the appliance itself draws, and joules per job.

The scheduler needs this twice: to keep heavy work inside a site's watt budget while on battery, and
to report energy per study. Sources, in the order `detect_meter` tries them:

* Jetson INA3221 rail monitors (sysfs hwmon, or the older ``ina3221x`` iio driver of L4T r32):
  instantaneous module power; ``VDD_IN`` / ``POM_5V_IN`` is the module input when present.
* Linux powercap RAPL (``/sys/class/powercap/intel-rapl:N/energy_uj``, Intel and AMD): cumulative
  CPU *package* energy. It does not see a discrete GPU, disks or the PSU loss, so it is a floor.
* `EstimatedMeter`: the hardware profile's figure, flagged ``estimated=True`` so nobody mistakes it
  for a measurement.

Every path is relative to an injectable ``root`` so tests build a fake sysfs tree out of plain files.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from edgescreen.appliance.logs import get_logger

log = get_logger(__name__)

ROOT = Path("/")
_RAPL_TOP = re.compile(r"^intel-rapl:\d+$")  # package/psys zones; intel-rapl:N:M are sub-zones
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")  # Jetson rails that measure the whole module's input


class MeterUnavailable(Exception):
    """This kind of meter does not exist or cannot be read here; the message says why."""


@dataclass(frozen=True)
class MeterSample:
    """Power over the interval since the previous sample of the same meter.

    ``watts`` is the average over ``interval_s`` for energy counters (RAPL), the instantaneous value
    for rail monitors (INA3221) and the profile figure for estimates. ``joules`` is the energy over
    the interval (None on the first sample of an instantaneous meter, or on error).
    """

    source: str
    watts: float | None
    joules: float | None
    interval_s: float | None
    estimated: bool
    taken_at: float
    rails_w: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@runtime_checkable
class PowerMeter(Protocol):
    source: str
    estimated: bool

    def sample(self) -> MeterSample: ...


def _read_text(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace").strip()


def _read_int(path: Path) -> int:
    return int(_read_text(path))


def _explain_oserror(path: Path, exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        if path.name == "energy_uj":
            return (f"{path}: permission denied (RAPL energy_uj is root-only since Linux 5.10; grant the "
                    f"service user read access with a udev rule or tmpfiles.d chmod at boot)")
        return f"{path}: permission denied (grant the service user read access)"
    return f"{path}: {exc.strerror or exc}"


def energy_delta_uj(previous: int, current: int, max_range_uj: int | None) -> int | None:
    """Energy between two counter reads, allowing for one wrap at ``max_energy_range_uj``.

    More than one wrap between reads is undetectable (typically ~262 kJ, i.e. 40+ min at 100 W), so
    sample well inside that. Returns None when the counter went backwards with no known range.
    """
    if current >= previous:
        return current - previous
    if max_range_uj and max_range_uj >= previous:
        return (max_range_uj - previous) + current
    return None


@dataclass
class _RaplZone:
    path: Path
    name: str
    max_range_uj: int | None
    last_uj: int


class RaplMeter:
    """Cumulative CPU package energy from powercap RAPL. Not thread-safe; one owner samples."""

    estimated = False

    def __init__(self, zone_dirs: list[Path]) -> None:
        if not zone_dirs:
            raise MeterUnavailable("no RAPL zones given")
        self._zones: list[_RaplZone] = []
        for zone in zone_dirs:
            energy = zone / "energy_uj"
            try:
                start = _read_int(energy)
            except OSError as exc:
                raise MeterUnavailable(_explain_oserror(energy, exc)) from None
            except ValueError:
                raise MeterUnavailable(f"{energy}: not an integer") from None
            try:
                max_range: int | None = _read_int(zone / "max_energy_range_uj")
            except (OSError, ValueError):
                max_range = None  # wrap then shows as "counter went backwards" and that sample is lost
            name = _read_text(zone / "name") if (zone / "name").exists() else zone.name
            self._zones.append(_RaplZone(zone, name, max_range, start))
        self._last_t = time.monotonic()
        self.source = "rapl:" + "+".join(z.name for z in self._zones)

    @classmethod
    def discover(cls, root: Path = ROOT) -> RaplMeter:
        """Top-level zones only; ``psys`` (whole SoC platform) alone if present, as it contains the packages."""
        base = root / "sys/class/powercap"
        zones = sorted(p for p in base.glob("intel-rapl:*") if _RAPL_TOP.match(p.name) and (p / "energy_uj").exists())
        if not zones:
            raise MeterUnavailable(f"no RAPL zones under {base}")
        psys = [z for z in zones if (z / "name").exists() and _read_text(z / "name") == "psys"]
        return cls(psys or zones)

    def sample(self) -> MeterSample:
        now, taken_at = time.monotonic(), time.time()
        interval = now - self._last_t
        readings: list[int] = []
        for zone in self._zones:
            energy = zone.path / "energy_uj"
            try:
                readings.append(_read_int(energy))
            except OSError as exc:  # keep the old baseline: the next good sample spans both intervals
                return MeterSample(self.source, None, None, interval, False, taken_at, error=_explain_oserror(energy, exc))
            except ValueError:
                return MeterSample(self.source, None, None, interval, False, taken_at, error=f"{energy}: not an integer")
        deltas = [energy_delta_uj(z.last_uj, value, z.max_range_uj) for z, value in zip(self._zones, readings, strict=True)]
        for zone, value in zip(self._zones, readings, strict=True):
            zone.last_uj = value
        self._last_t = now
        if any(d is None for d in deltas):
            return MeterSample(self.source, None, None, interval, False, taken_at,
                               error="RAPL counter went backwards without a known max_energy_range_uj")
        joules = sum(d for d in deltas if d is not None) / 1e6
        rails = {z.name: d / 1e6 / interval for z, d in zip(self._zones, deltas, strict=True)
                 if d is not None and interval > 0}
        watts = joules / interval if interval > 0 else None
        return MeterSample(self.source, watts, joules, interval, False, taken_at, rails_w=rails)


@dataclass(frozen=True)
class _Rail:
    name: str
    power_mw: Path | None  # iio layout reports power directly
    voltage_mv: Path | None
    current_ma: Path | None

    def watts(self) -> float:
        if self.power_mw is not None:
            return _read_int(self.power_mw) / 1000.0
        if self.voltage_mv is None or self.current_ma is None:
            raise MeterUnavailable(f"INA3221 rail {self.name}: no power file and no voltage and current pair to "
                                   "compute it from")
        return _read_int(self.voltage_mv) * _read_int(self.current_ma) / 1e6


class Ina3221Meter:
    """Jetson INA3221 rail monitors. Instantaneous, so joules are integrated (trapezoid) between samples."""

    estimated = False

    def __init__(self, rails: list[_Rail]) -> None:
        if not rails:
            raise MeterUnavailable("no INA3221 rails given")
        self._rails = rails
        for rail in rails:  # fail at detection, not at the first job
            try:
                rail.watts()
            except OSError as exc:
                raise MeterUnavailable(_explain_oserror(rail.voltage_mv or rail.power_mw or Path("?"), exc)) from None
            except ValueError as exc:
                raise MeterUnavailable(f"INA3221 rail {rail.name}: {exc}") from None
        self.source = "ina3221:" + "+".join(r.name for r in rails)
        self._last: tuple[float, float] | None = None  # (monotonic, watts)

    @property
    def rail_names(self) -> list[str]:
        return [r.name for r in self._rails]

    @classmethod
    def discover(cls, root: Path = ROOT) -> Ina3221Meter:
        rails: list[_Rail] = []
        for hwmon in sorted(root.glob("sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*")):
            for ch in (1, 2, 3):  # in4..in7/curr4 are shunt voltages and sums, not rails
                volt, curr = hwmon / f"in{ch}_input", hwmon / f"curr{ch}_input"
                if not (volt.exists() and curr.exists()):
                    continue
                enable = hwmon / f"in{ch}_enable"
                if enable.exists() and _read_text(enable) == "0":
                    continue
                label_file = hwmon / f"in{ch}_label"
                label = _read_text(label_file) if label_file.exists() else f"{hwmon.parent.parent.name}:ch{ch}"
                if label.upper() == "NC":
                    continue
                rails.append(_Rail(label, None, volt, curr))
        for iio in sorted(root.glob("sys/bus/i2c/drivers/ina3221x/*/iio:device*")):
            for power in sorted(iio.glob("in_power*_input")):
                ch = power.name.removeprefix("in_power").removesuffix("_input")
                label_file = iio / f"rail_name_{ch}"
                label = _read_text(label_file) if label_file.exists() else f"{iio.parent.name}:ch{ch}"
                rails.append(_Rail(label, power, None, None))
        if not rails:
            raise MeterUnavailable(f"no INA3221 rails under {root / 'sys/bus/i2c/drivers'}")
        seen: dict[str, int] = {}
        unique: list[_Rail] = []
        for rail in rails:  # AGX boards carry two chips; keep both rails if labels repeat
            seen[rail.name] = seen.get(rail.name, 0) + 1
            unique.append(rail if seen[rail.name] == 1 else _Rail(f"{rail.name}#{seen[rail.name]}", rail.power_mw,
                                                                  rail.voltage_mv, rail.current_ma))
        return cls(unique)

    def sample(self) -> MeterSample:
        now, taken_at = time.monotonic(), time.time()
        try:
            rails = {rail.name: rail.watts() for rail in self._rails}
        except (OSError, ValueError) as exc:
            return MeterSample(self.source, None, None, None, False, taken_at, error=f"INA3221 read failed: {exc}")
        inputs = [w for name, w in rails.items() if name.split("#")[0] in INPUT_RAILS]
        watts = sum(inputs) if inputs else sum(rails.values())
        joules = interval = None
        if self._last is not None:
            interval = now - self._last[0]
            joules = (self._last[1] + watts) / 2.0 * interval
        self._last = (now, watts)
        return MeterSample(self.source, watts, joules, interval, False, taken_at, rails_w=rails)


class EstimatedMeter:
    """The hardware profile's watt figure, for boxes with no readable meter. Always ``estimated=True``."""

    estimated = True

    def __init__(self, watts: float, reason: str | None = None) -> None:
        self.watts = float(watts)
        self.reason = reason  # why no hardware meter was used; shown in diagnostics
        self.source = f"estimate:{self.watts:g}W"
        self._last_t: float | None = None

    def sample(self) -> MeterSample:
        now = time.monotonic()
        interval = None if self._last_t is None else now - self._last_t
        self._last_t = now
        joules = None if interval is None else self.watts * interval
        return MeterSample(self.source, self.watts, joules, interval, True, time.time(), error=None)


def detect_meter(estimate_w: float, root: Path = ROOT) -> PowerMeter:
    """Pick the first readable meter (INA3221, then RAPL), else the profile estimate with the reasons."""
    reasons: list[str] = []
    for kind in (Ina3221Meter, RaplMeter):
        try:
            meter: PowerMeter = kind.discover(root)
        except MeterUnavailable as exc:
            reasons.append(str(exc))
            continue
        log.info("power meter selected", source=meter.source)
        return meter
    reason = "; ".join(reasons)
    log.info("no power meter readable, using profile estimate", watts=estimate_w, reason=reason)
    return EstimatedMeter(estimate_w, reason=reason)
