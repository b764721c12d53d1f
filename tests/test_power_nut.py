"""NUT client and UPS power source against a real upsd + dummy-ups on loopback (see nut_server.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgescreen.appliance.power import (
    NutClient,
    NutError,
    NutPowerSource,
    NutUnavailable,
    PowerReading,
    parse_status,
)
from edgescreen.appliance.power.nut import quote, reading_from_vars, split_line
from edgescreen.appliance.power.sources import on_mains_from_flags
from tests.nut_server import NutServer, NutServerError, nut_ups, requires_nut

ON_LINE = """\
ups.status: OL CHRG
battery.charge: 97
battery.runtime: 1800
ups.realpower: 135
ups.load: 27
TIMER 60
"""

# OL -> OB -> OB LB; the final long TIMER holds the last state (dummy-loop restarts the file at EOF).
POWER_CUT = """\
ups.status: OL
battery.charge: 100
TIMER 2
ups.status: OB DISCHRG
battery.charge: 60
TIMER 2
ups.status: OB DISCHRG LB
battery.charge: 8
battery.runtime: 90
TIMER 60
"""


@pytest.fixture(scope="module")
def on_line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NutServer]:
    """One steady on-line UPS shared by the read-only tests (a server takes ~3 s to start)."""
    with nut_ups(tmp_path_factory.mktemp("nut"), ON_LINE) as server:
        yield server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _poll_until(source: NutPowerSource, done: Callable[[PowerReading], bool], timeout_s: float = 20.0) -> list[PowerReading]:
    readings: list[PowerReading] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reading = source.read()
        readings.append(reading)
        if done(reading):
            return readings
        time.sleep(0.2)
    statuses = [(r.status_raw, r.error) for r in readings]
    pytest.fail(f"condition not reached within {timeout_s}s; saw {statuses[-5:]}")


@requires_nut
def test_reads_on_line_ups_with_charge_and_realpower(on_line: NutServer) -> None:
    host, port, ups = on_line
    source = NutPowerSource(host, port, ups, timeout_s=2.0)
    reading = source.read()
    source.close()

    assert reading.ok, reading.error
    assert reading.on_mains is True
    assert reading.low_battery is False and reading.forced_shutdown is False
    assert reading.charging
    assert reading.battery_percent == 97.0
    assert reading.runtime_s == 1800.0
    assert reading.ups_realpower_w == 135.0 and not reading.realpower_derived
    assert reading.ups_load_percent == 27.0
    assert reading.status_raw == "OL CHRG"
    assert reading.source == f"nut:sim@127.0.0.1:{port}"
    assert abs(reading.taken_at - time.time()) < 30


@requires_nut
def test_client_commands_and_quoted_values(on_line: NutServer) -> None:
    host, port, ups = on_line
    with NutClient(host, port, timeout_s=2.0) as client:
        assert client.list_ups() == {"sim": "edgescreen test UPS"}
        assert client.get_var(ups, "battery.charge") == "97"
        variables = client.list_vars(ups)
        assert variables["device.model"] == "Dummy UPS"  # quoted value with a space
        assert variables["driver.name"] == "dummy-ups"
        assert client.version().startswith("Network UPS Tools upsd")


@requires_nut
def test_power_cut_sequence_is_observed_in_order(tmp_path: Path) -> None:
    with nut_ups(tmp_path, POWER_CUT) as (host, port, ups):
        source = NutPowerSource(host, port, ups, timeout_s=2.0)
        readings = _poll_until(source, lambda r: r.low_battery)
        source.close()

    assert all(r.ok for r in readings), [r.error for r in readings if not r.ok]
    seen: list[str] = []
    for r in readings:
        if not seen or seen[-1] != r.status_raw:
            seen.append(r.status_raw)
    assert seen == ["OL", "OB DISCHRG", "OB DISCHRG LB"]
    first_on_battery = next(r for r in readings if r.status_raw == "OB DISCHRG")
    assert first_on_battery.on_mains is False and not first_on_battery.low_battery
    assert first_on_battery.battery_percent == 60.0
    last = readings[-1]
    assert last.on_mains is False and last.low_battery is True
    assert last.battery_percent == 8.0 and last.runtime_s == 90.0


@requires_nut
def test_unknown_ups_and_variable_give_clear_errors(on_line: NutServer) -> None:
    host, port, ups = on_line
    # credentials are sent (upsd only checks them for privileged commands, but must accept them)
    with NutClient(host, port, timeout_s=2.0, username="monitor", password="pass word") as client:
        with pytest.raises(NutError) as caught:
            client.get_var("myups", "ups.status")
        assert caught.value.code == "UNKNOWN-UPS"
        assert not isinstance(caught.value, NutUnavailable)
        message = str(caught.value)
        assert f"upsd at 127.0.0.1:{port}: ERR UNKNOWN-UPS for 'myups'" in message
        assert "site config" in message

        with pytest.raises(NutError) as caught:
            client.get_var(ups, "no.such.var")
        assert caught.value.code == "VAR-NOT-SUPPORTED"
        assert "'sim no.such.var'" in str(caught.value)
        # an ERR reply leaves the session usable
        assert client.get_var(ups, "ups.status") == "OL CHRG"

    source = NutPowerSource(host, port, "myups", timeout_s=2.0)
    reading = source.read()
    assert reading.stale and reading.on_mains is None
    assert reading.error is not None
    assert "ERR UNKNOWN-UPS" in reading.error and "upsd serves: sim" in reading.error
    assert source.read().error == reading.error  # same words on the kept session
    source.close()


def test_unreachable_upsd_gives_stale_reading_not_exception() -> None:
    port = _free_port()  # nothing listens here
    reading = NutPowerSource("127.0.0.1", port, "sim", timeout_s=1.0).read()
    assert reading.stale and not reading.ok
    assert reading.on_mains is None and reading.battery_percent is None
    assert reading.error is not None
    assert f"upsd at 127.0.0.1:{port}: connection refused" in reading.error
    assert "upsd.conf" in reading.error  # says what to check

    with pytest.raises(NutUnavailable, match=f"127.0.0.1:{port}"):
        NutClient("127.0.0.1", port, timeout_s=1.0).connect()


def test_silent_server_times_out_quickly() -> None:
    # A socket that accepts (kernel backlog) but never answers: a hung upsd.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        start = time.monotonic()
        reading = NutPowerSource("127.0.0.1", port, "sim", timeout_s=0.3).read()
        elapsed = time.monotonic() - start
    assert reading.stale
    assert reading.error is not None and "no reply within 0.3s" in reading.error
    assert elapsed < 2.0


@requires_nut
def test_kept_session_survives_upsd_restart(on_line: NutServer) -> None:
    source = NutPowerSource(on_line.host, on_line.port, on_line.ups, timeout_s=2.0)
    assert source.read().ok
    on_line.restart_upsd()  # the kept TCP session is now dead
    again = source.read()
    assert again.ok, again.error  # reconnected within the same read, not a failed poll
    assert again.status_raw == "OL CHRG"
    source.close()


def test_line_breaks_in_names_are_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        NutPowerSource("127.0.0.1", 3493, "sim\nFSD sim")


@requires_nut
def test_driver_loss_and_server_loss_give_stale_readings(tmp_path: Path) -> None:
    with nut_ups(tmp_path, ON_LINE) as server:
        source = NutPowerSource(server.host, server.port, server.ups, timeout_s=1.0)
        assert source.read().ok
        server.stop_driver()  # the UPS cable is pulled: upsd stays, the driver goes
        # dummy-ups says WAIT on its way out, then upsd answers ERR DRIVER-NOT-CONNECTED
        readings = _poll_until(source, lambda r: "DRIVER-NOT-CONNECTED" in (r.error or ""), timeout_s=20.0)
        assert all(r.stale and r.on_mains is None for r in readings[1:])
        lost = readings[-1]
        assert lost.error is not None
        assert "ERR DRIVER-NOT-CONNECTED for 'sim'" in lost.error and "driver" in lost.error
    # the fixture leaves nothing behind
    assert server.upsd.poll() is not None and server.driver.poll() is not None
    assert not server.directory.exists()
    # upsd itself is gone now; the kept session fails and the fresh attempt is refused
    gone = source.read()
    assert gone.stale and gone.error is not None and "connection refused" in gone.error


@requires_nut
def test_fixture_failure_quotes_the_daemon_output(tmp_path: Path) -> None:
    with pytest.raises(NutServerError) as caught, nut_ups(tmp_path, ON_LINE, ups="bad name"):
        pass
    message = str(caught.value)
    assert "dummy-ups exited" in message
    assert "Section bad name not found in ups.conf" in message  # the driver's own words


def test_split_line_and_quote_round_trip() -> None:
    value = 'APC "Smart" \\ UPS 1500'
    line = f"VAR ups ups.model {quote(value)}"
    assert split_line(line) == ["VAR", "ups", "ups.model", value]
    assert split_line('UPS sim ""') == ["UPS", "sim", ""]
    assert quote("ups.status") == "ups.status"
    with pytest.raises(ValueError, match="unterminated"):
        split_line('VAR ups x "open')


def test_status_flags_map_to_reading_fields() -> None:
    assert parse_status("ob lb  FSD") == ("OB", "LB", "FSD")
    assert on_mains_from_flags(("OL", "OB")) is False  # contradictory: assume the worse
    assert on_mains_from_flags(("OFF",)) is None

    reading = reading_from_vars(
        {"ups.status": "OB LB FSD", "ups.load": "50", "ups.realpower.nominal": "600", "battery.charge": "n/a"},
        source="nut:x@h:1",
    )
    assert reading.on_mains is False and reading.low_battery and reading.forced_shutdown
    assert reading.ups_realpower_w == 300.0 and reading.realpower_derived
    assert reading.battery_percent is None  # unparsable, not invented

    bypass = reading_from_vars({"ups.status": "OL BYPASS"}, source="s")
    assert bypass.on_mains is True and bypass.on_bypass

    no_status = reading_from_vars({"battery.charge": "50"}, source="s")
    assert no_status.on_mains is None and no_status.error is not None

    starting = reading_from_vars({"ups.status": "WAIT"}, source="s")
    assert starting.stale and starting.error is not None and "WAIT" in starting.error
