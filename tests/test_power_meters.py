"""Box power meters on fake sysfs trees (plain files, read for real), and the OS battery source."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from edgescreen.appliance.power import (
    BatteryPowerSource,
    EstimatedMeter,
    Ina3221Meter,
    MeterUnavailable,
    RaplMeter,
    detect_meter,
)
from edgescreen.appliance.power.battery import NO_BATTERY
from edgescreen.appliance.power.meters import energy_delta_uj

RAPL_RANGE = 262_143_328_850  # a real max_energy_range_uj (Skylake client)


def _put(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


def make_rapl_zone(root: Path, zone: str, name: str, energy_uj: int, max_range_uj: int | None = RAPL_RANGE) -> Path:
    """A powercap zone as the kernel lays it out (intel-rapl:N[:M]/{name,energy_uj,max_energy_range_uj})."""
    d = root / "sys/class/powercap" / zone
    _put(d / "name", name)
    _put(d / "energy_uj", energy_uj)
    if max_range_uj is not None:
        _put(d / "max_energy_range_uj", max_range_uj)
    return d


def make_ina_hwmon(root: Path, device: str, rails: dict[int, tuple[str, int, int]], hwmon: str = "hwmon3") -> Path:
    """Newer Jetson layout: ina3221/<dev>/hwmon/hwmonN/in<ch>_{label,input} (mV) + curr<ch>_input (mA)."""
    d = root / "sys/bus/i2c/drivers/ina3221" / device / "hwmon" / hwmon
    for ch, (label, mv, ma) in rails.items():
        _put(d / f"in{ch}_label", label)
        _put(d / f"in{ch}_input", mv)
        _put(d / f"curr{ch}_input", ma)
    # the sum/shunt channels the meter must not pair up as rails
    _put(d / "in4_input", 40)
    _put(d / "curr4_input", 880)
    _put(d / "in7_input", 120)
    return d


# ---------------------------------------------------------------- RAPL


def test_rapl_joules_and_watts_between_reads(tmp_path: Path) -> None:
    pkg0 = make_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    make_rapl_zone(tmp_path, "intel-rapl:0:0", "core", 500_000)  # sub-zone: inside package-0, not added
    pkg1 = make_rapl_zone(tmp_path, "intel-rapl:1", "package-1", 2_000_000)
    make_rapl_zone(tmp_path, "intel-rapl-mmio:0", "package-0", 7)  # MMIO duplicate of package-0

    meter = RaplMeter.discover(tmp_path)
    assert meter.source == "rapl:package-0+package-1" and not meter.estimated
    time.sleep(0.05)
    _put(pkg0 / "energy_uj", 1_000_000 + 5_000_000)  # +5 J
    _put(pkg1 / "energy_uj", 2_000_000 + 3_000_000)  # +3 J
    sample = meter.sample()

    assert sample.error is None
    assert sample.joules == pytest.approx(8.0)
    assert sample.interval_s is not None and sample.interval_s >= 0.05
    assert sample.watts == pytest.approx(8.0 / sample.interval_s)
    assert set(sample.rails_w) == {"package-0", "package-1"}
    assert sum(sample.rails_w.values()) == pytest.approx(sample.watts)

    nothing = meter.sample()  # counters unchanged since: zero energy, not an error
    assert nothing.joules == 0.0 and nothing.error is None


def test_rapl_wraps_around_at_max_energy_range(tmp_path: Path) -> None:
    zone = make_rapl_zone(tmp_path, "intel-rapl:0", "package-0", RAPL_RANGE - 1_000_000)
    meter = RaplMeter.discover(tmp_path)
    _put(zone / "energy_uj", 500_000)  # passed max_energy_range_uj and restarted from 0
    sample = meter.sample()
    assert sample.error is None
    assert sample.joules == pytest.approx(1.5)

    assert energy_delta_uj(100, 300, None) == 200
    assert energy_delta_uj(900, 100, 1000) == 200
    assert energy_delta_uj(900, 100, None) is None


def test_rapl_backwards_without_range_loses_one_sample_only(tmp_path: Path) -> None:
    zone = make_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 9_000_000, max_range_uj=None)
    meter = RaplMeter.discover(tmp_path)
    _put(zone / "energy_uj", 1_000_000)
    bad = meter.sample()
    assert bad.watts is None and bad.error is not None and "backwards" in bad.error
    _put(zone / "energy_uj", 3_000_000)
    assert meter.sample().joules == pytest.approx(2.0)


def test_rapl_prefers_psys_over_packages(tmp_path: Path) -> None:
    make_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 1)
    make_rapl_zone(tmp_path, "intel-rapl:1", "psys", 1)
    assert RaplMeter.discover(tmp_path).source == "rapl:psys"


def test_rapl_read_error_mid_run_is_reported_not_raised(tmp_path: Path) -> None:
    zone = make_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    meter = RaplMeter.discover(tmp_path)
    (zone / "energy_uj").unlink()  # e.g. the powercap module was unloaded
    sample = meter.sample()
    assert sample.watts is None and sample.error is not None and "energy_uj" in sample.error
    _put(zone / "energy_uj", 4_000_000)  # back: the interval spans the failed sample
    assert meter.sample().joules == pytest.approx(3.0)


@contextlib.contextmanager
def _unprivileged() -> Iterator[None]:
    """Read files as 'nobody', as the worker service would: root ignores file modes.

    Only the effective uid changes (the real/saved uid stays 0), so it is restored on exit.
    """
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_rapl_permission_denied_falls_back_to_estimate_with_reason() -> None:
    """Since Linux 5.10 energy_uj is 0400 root: a non-root service must get a reason, not a crash."""
    # tmp_path lives under a 0700 directory, so build the tree where an unprivileged user can walk it.
    root = Path(tempfile.mkdtemp(prefix="edgescreen-rapl-"))
    try:
        zone = make_rapl_zone(root, "intel-rapl:0", "package-0", 123)
        for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            d.chmod(0o755)
        (zone / "energy_uj").chmod(0o400 if os.geteuid() == 0 else 0o000)
        with _unprivileged():
            with pytest.raises(MeterUnavailable) as caught:
                RaplMeter.discover(root)
            meter = detect_meter(42.0, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert "permission denied" in str(caught.value) and "root-only since Linux 5.10" in str(caught.value)
    assert isinstance(meter, EstimatedMeter) and meter.estimated
    assert meter.reason is not None and "permission denied" in meter.reason


# ---------------------------------------------------------------- INA3221 (Jetson)


def test_ina3221_hwmon_rails_use_vdd_in_as_total(tmp_path: Path) -> None:
    hw = make_ina_hwmon(tmp_path, "1-0040", {
        1: ("VDD_IN", 19104, 520),
        2: ("VDD_CPU_GPU_CV", 19104, 120),
        3: ("VDD_SOC", 19104, 240),
    })
    second = make_ina_hwmon(tmp_path, "1-0041", {1: ("NC", 0, 0), 2: ("VDDQ", 5000, 100)}, hwmon="hwmon4")
    _put(second / "in2_enable", 0)  # disabled channel: skipped

    meter = Ina3221Meter.discover(tmp_path)
    assert meter.rail_names == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    first = meter.sample()
    assert first.error is None and not first.estimated
    assert first.watts == pytest.approx(19.104 * 0.520)  # module input only; other rails are inside it
    assert first.rails_w["VDD_SOC"] == pytest.approx(19.104 * 0.240)
    assert first.joules is None  # instantaneous meter: energy needs two samples

    time.sleep(0.05)
    _put(hw / "curr1_input", 1040)  # load doubled
    second_sample = meter.sample()
    assert second_sample.watts == pytest.approx(19.104 * 1.040)
    assert second_sample.interval_s is not None
    expected = (first.watts + second_sample.watts) / 2 * second_sample.interval_s
    assert second_sample.joules == pytest.approx(expected)


def test_ina3221_without_input_rail_sums_rails_and_dedups_labels(tmp_path: Path) -> None:
    make_ina_hwmon(tmp_path, "1-0040", {1: ("GPU", 5000, 1000), 2: ("CPU", 5000, 400)})
    make_ina_hwmon(tmp_path, "1-0041", {1: ("GPU", 5000, 200)}, hwmon="hwmon4")
    sample = Ina3221Meter.discover(tmp_path).sample()
    assert set(sample.rails_w) == {"GPU", "CPU", "GPU#2"}
    assert sample.watts == pytest.approx(5.0 + 2.0 + 1.0)


def test_ina3221x_iio_layout_of_older_l4t(tmp_path: Path) -> None:
    d = tmp_path / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for ch, (rail, mw) in enumerate([("POM_5V_IN", 3456), ("POM_5V_GPU", 40), ("POM_5V_CPU", 800)]):
        _put(d / f"rail_name_{ch}", rail)
        _put(d / f"in_power{ch}_input", mw)
        _put(d / f"in_voltage{ch}_input", 5000)
        _put(d / f"in_current{ch}_input", mw // 5)
    meter = Ina3221Meter.discover(tmp_path)
    sample = meter.sample()
    assert meter.source == "ina3221:POM_5V_IN+POM_5V_GPU+POM_5V_CPU"
    assert sample.watts == pytest.approx(3.456)
    assert sample.rails_w["POM_5V_CPU"] == pytest.approx(0.8)


def test_ina3221_garbage_value_is_an_error_not_a_crash(tmp_path: Path) -> None:
    hw = make_ina_hwmon(tmp_path, "1-0040", {1: ("VDD_IN", 5000, 1000)})
    meter = Ina3221Meter.discover(tmp_path)
    _put(hw / "curr1_input", "")  # a torn read
    sample = meter.sample()
    assert sample.watts is None and sample.error is not None

    _put(hw / "in1_input", "garbage")
    with pytest.raises(MeterUnavailable, match="VDD_IN"):
        Ina3221Meter.discover(tmp_path)


# ---------------------------------------------------------------- estimate and detection


def test_ina3221_rail_with_nothing_to_read_is_refused_at_detection(tmp_path: Path) -> None:
    """A rail with no power file and no voltage/current pair says so when the meter is made, not later."""
    from edgescreen.appliance.power.meters import _Rail

    with pytest.raises(MeterUnavailable, match="VDD_IN: no power file and no voltage and current pair"):
        Ina3221Meter([_Rail("VDD_IN", None, None, None)])


def test_estimated_meter_is_marked_and_integrates_energy() -> None:
    meter = EstimatedMeter(35.0)
    first = meter.sample()
    assert first.estimated and meter.estimated
    assert first.watts == 35.0 and first.joules is None
    time.sleep(0.02)
    second = meter.sample()
    assert second.interval_s is not None
    assert second.joules == pytest.approx(35.0 * second.interval_s)
    assert meter.source == "estimate:35W"


def test_detect_meter_order_and_fallback(tmp_path: Path) -> None:
    empty = detect_meter(60.0, tmp_path)
    assert isinstance(empty, EstimatedMeter) and empty.watts == 60.0
    assert empty.reason is not None and "INA3221" in empty.reason and "RAPL" in empty.reason

    make_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 1)
    assert isinstance(detect_meter(60.0, tmp_path), RaplMeter)

    make_ina_hwmon(tmp_path, "1-0040", {1: ("VDD_IN", 5000, 1000)})
    assert isinstance(detect_meter(60.0, tmp_path), Ina3221Meter)  # board-level meter wins


def test_detect_meter_on_this_machine_never_raises() -> None:
    meter = detect_meter(42.0)
    sample = meter.sample()
    assert sample.source == meter.source
    assert sample.estimated == meter.estimated


# ---------------------------------------------------------------- OS battery

Battery = namedtuple("Battery", "percent secsleft power_plugged")  # the shape of psutil's sbattery


def test_battery_source_on_this_machine() -> None:
    reading = BatteryPowerSource().read()
    if psutil.sensors_battery() is None:
        assert reading.stale and reading.error == NO_BATTERY and reading.on_mains is None
    else:
        assert reading.ok and reading.battery_percent is not None
    assert reading.source == "battery:os"


def test_battery_source_maps_plugged_percent_and_runtime() -> None:
    plugged = BatteryPowerSource(probe=lambda: Battery(80.0, psutil.POWER_TIME_UNLIMITED, True)).read()
    assert plugged.ok and plugged.on_mains is True and plugged.status_raw == "OL"
    assert plugged.runtime_s is None and plugged.battery_percent == 80.0

    draining = BatteryPowerSource(probe=lambda: Battery(55.0, 3600, False)).read()
    assert draining.on_mains is False and not draining.low_battery and draining.runtime_s == 3600.0
    assert draining.status_raw == "OB DISCHRG"

    low = BatteryPowerSource(low_percent=10, probe=lambda: Battery(7.0, psutil.POWER_TIME_UNKNOWN, False)).read()
    assert low.low_battery and low.status_raw == "OB DISCHRG LB" and low.runtime_s is None

    unknown = BatteryPowerSource(probe=lambda: Battery(50.0, 100, None)).read()
    assert unknown.on_mains is None and unknown.ok


def test_battery_probe_failure_is_a_stale_reading() -> None:
    def broken() -> None:
        raise OSError("power_supply: no such device")

    reading = BatteryPowerSource(probe=broken).read()
    assert reading.stale and reading.error is not None and "no such device" in reading.error
