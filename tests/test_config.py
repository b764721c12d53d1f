"""Site config and hardware profile validation: a bad value is one clear line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgescreen import firmware_config
from edgescreen.appliance.config import ConfigError, load_profile, load_site_config, resolve_paths
from edgescreen.appliance.config.site import SiteConfig
from tests.conftest import run_cli


def write(tmp_path: Path, text: str, name: str = "site.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_work_without_a_file() -> None:
    cfg = load_site_config(None) if not Path("/etc/edgescreen/site.toml").exists() else SiteConfig()
    assert cfg.dicom.port == 11112 and cfg.scheduler.failsafe == "busy" and cfg.sync.send_phi is False


def test_valid_file_is_loaded(tmp_path: Path) -> None:
    path = write(tmp_path, '[dicom]\nport = 4242\nae_title = "EDGE"\n[[dicom.allowed]]\nae_title = "CT1"\n'
                           'host = "10.0.0.5"\n[scheduler]\nidle_grace_s = 30\n')
    cfg = load_site_config(path)
    assert cfg.dicom.port == 4242 and cfg.dicom.allowed[0].host == "10.0.0.5" and cfg.scheduler.idle_grace_s == 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[dicom]\nport = 99999\n", "dicom.port = 99999: Input should be less than or equal to 65535"),
        ("[dicom]\nprot = 104\n", "unknown key 'dicom.prot'"),
        ("[dicom]\nae_title = \"A_TITLE_THAT_IS_TOO_LONG\"\n", "dicom.ae_title = \"A_TITLE_THAT_IS_TOO_LONG\": an AE title is 1-16"),
        ("[scheduler]\nfailsafe = \"maybe\"\n", "scheduler.failsafe = \"maybe\": Input should be 'busy' or 'idle'"),
        ("[sync]\nenabled = true\n", "sync.enabled is true but sync.url is not set"),
        ("[[dicom.allowed]]\nae_title = \"CT\"\nhost = \"not-an-ip\"\n", "dicom.allowed.0.host = \"not-an-ip\""),
        ("[web]\nport = \"eighty\"\n", "web.port = \"eighty\": Input should be a valid integer"),
        ("[dicom\nport = 1\n", "not valid TOML"),
    ],
)
def test_bad_values_name_file_key_value_and_rule(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_exits_2_with_one_line(tmp_path: Path, data_dir: Path) -> None:
    path = write(tmp_path, "[dicom]\nport = 0\n")
    proc = run_cli("--config", str(path), "config", data_dir=data_dir)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and "dicom.port = 0" in lines[0] and "greater than or equal to 1" in lines[0]


def test_missing_config_file_is_exit_2(tmp_path: Path, data_dir: Path) -> None:
    proc = run_cli("--config", str(tmp_path / "nope.toml"), "config", data_dir=data_dir)
    assert proc.returncode == 2 and "file not found" in proc.stderr


def test_every_shipped_profile_validates() -> None:
    names = firmware_config.profile_names()
    assert {"x86-cpu", "x86-nvidia", "jetson-orin-nano", "jetson-agx-orin", "intel-igpu"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.mode_for(on_battery=False).name
        assert profile.mode_for(on_battery=True).watts <= profile.mode_for(on_battery=False).watts


def test_bad_profile_is_refused(tmp_path: Path) -> None:
    text = (firmware_config.PROFILES_DIR / "x86-cpu.toml").read_text().replace('precision = "int8"', 'precision = "int4"', 1)
    path = write(tmp_path, text, "custom.toml")
    with pytest.raises(ConfigError, match=r"candidates\.0\.precision = \"int4\": Input should be 'fp32', 'fp16' or 'int8'"):
        load_profile(str(path))
    with pytest.raises(ConfigError, match="known profiles: .*x86-cpu"):
        load_profile("no-such-box")


def test_unknown_profile_from_cli_is_exit_2(data_dir: Path) -> None:
    proc = run_cli("--profile", "no-such-box", "config", data_dir=data_dir)
    assert proc.returncode == 2 and "known profiles" in proc.stderr


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGESCREEN_DATA_DIR", raising=False)
    cfg = SiteConfig(data_dir=str(tmp_path / "from-config"))
    assert resolve_paths(tmp_path / "arg", cfg) == (tmp_path / "arg").resolve()
    assert resolve_paths(None, cfg) == (tmp_path / "from-config").resolve()
    monkeypatch.setenv("EDGESCREEN_DATA_DIR", str(tmp_path / "env"))
    assert resolve_paths(None, cfg) == (tmp_path / "env").resolve()
    monkeypatch.delenv("EDGESCREEN_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert resolve_paths(None, SiteConfig()) == (tmp_path / "home/.local/share/edgescreen").resolve()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[scheduler]\nclinic_hours = "25:99-07:00"\n', "scheduler.clinic_hours = \"25:99-07:00\": String should match"),
        ('[power]\nscanner_power_var = "ups.banana"\n', "power.scanner_power_var = \"ups.banana\""),
        ('[power]\nscanner_power_var = "ups.load"\nscanner_busy_above = 60\n', "scanner_power_var needs nut_host"),
    ],
)
def test_power_and_schedule_rules(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_site_config(write(tmp_path, text))
    assert expected in str(err.value)


def test_config_from_environment_is_reported_as_in_force(tmp_path: Path, data_dir: Path) -> None:
    path = write(tmp_path, '[site]\nname = "Clinic 7"\n')
    proc = run_cli("config", data_dir=data_dir, env={"EDGESCREEN_CONFIG": str(path)})
    assert proc.returncode == 0 and f"config: {path}" in proc.stdout
