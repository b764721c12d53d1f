"""Finding, reading and validating the site config and hardware profile.

A bad value must stop the service before it touches data, with one line that names the file, the
key, the value and what is allowed: a technician on site reads that line, nothing else.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from edgescreen import firmware_config
from edgescreen.appliance.config.profile import HardwareProfile
from edgescreen.appliance.config.site import SiteConfig

SYSTEM_CONFIG = Path("/etc/edgescreen/site.toml")
SYSTEM_DATA_DIR = Path("/var/lib/edgescreen")


class ConfigError(ValueError):
    """A configuration that cannot be used. The CLI prints it on one line and exits 2."""


def describe_error(err: ValidationError, path: Path, prefix: str = "") -> str:
    """One line: the file, the dotted key, the value and the rule it broke."""
    first = err.errors()[0]
    key = prefix + ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key '{key}': remove it or check its spelling"
    if first["type"] == "missing":
        return f"{path}: missing key '{key}': it is required"
    value = first.get("input")
    shown = "{...}" if isinstance(value, dict) else json.dumps(value, default=str)[:80]
    return f"{path}: {key or '(top level)'} = {shown}: {msg}"


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied; the service user must be able to read it") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _validate(model: type[BaseModel], raw: dict, path: Path) -> BaseModel:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, path)) from None


def find_config(explicit: str | Path | None) -> Path | None:
    """--config, then $EDGESCREEN_CONFIG, then /etc/edgescreen/site.toml; None means built-in defaults."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("EDGESCREEN_CONFIG")
    if env:
        return Path(env)
    return SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None


def load_site_config(path: str | Path | None) -> SiteConfig:
    found = find_config(path)
    if found is None:
        return SiteConfig()
    return _validate(SiteConfig, _read_toml(found), found)  # type: ignore[return-value]


def profile_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or os.sep in name_or_path:
        return candidate
    return firmware_config.PROFILES_DIR / f"{name_or_path}.toml"


def load_profile(name_or_path: str) -> HardwareProfile:
    path = profile_path(name_or_path)
    if not path.is_file():
        known = ", ".join(firmware_config.profile_names())
        raise ConfigError(f"hardware profile '{name_or_path}': {path} not found; known profiles: {known}")
    return _validate(HardwareProfile, _read_toml(path), path)  # type: ignore[return-value]


SERVICE_USER = "edgescreen"
STORE_FILE = "edgescreen.db"  # a directory holding it is a data directory in use


@dataclass(frozen=True)
class DataDirChoice:
    """The data directory a command uses, where that choice came from, and what it was chosen over."""

    path: Path
    source: str
    note: str | None = None


def _current_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def provisioned(config_path: Path | None) -> bool:
    """A box set up by `edgescreen provision`: the system site config exists (or is the one in use)."""
    if config_path is not None and Path(config_path).resolve() == SYSTEM_CONFIG.resolve():
        return True
    return SYSTEM_CONFIG.is_file()


def _home_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return (base / "edgescreen").resolve()


def choose_data_dir(data_dir_arg: str | Path | None, config: SiteConfig, config_path: Path | None = None, *,
                    user: str | None = None) -> DataDirChoice:
    """The one data-directory rule. Explicit first: --data-dir, then $EDGESCREEN_DATA_DIR, then the site
    config's data_dir. Without any of them, the service's directory (/var/lib/edgescreen) on a provisioned
    box or for the service user, whoever runs the command (a root shell must never open an empty store in
    /root while the services write elsewhere); a developer's ~/.local/share/edgescreen everywhere else.

    When another candidate also holds a store, `note` names both, so a technician who meant the other
    one sees it on the first line instead of wondering where the studies went.
    """
    user = user if user is not None else _current_user()
    where = f"the site config {config_path}" if config_path else "the site config"
    service = (Path(config.data_dir).expanduser().resolve(), where) if config.data_dir else None
    if service is None and (provisioned(config_path) or user == SERVICE_USER):
        service = (SYSTEM_DATA_DIR, "the service's default")
    candidates: list[tuple[Path, str]] = []
    if data_dir_arg:
        candidates.append((Path(data_dir_arg).expanduser().resolve(), "--data-dir"))
    env = os.environ.get("EDGESCREEN_DATA_DIR")
    if env:
        candidates.append((Path(env).expanduser().resolve(), "$EDGESCREEN_DATA_DIR"))
    if service is not None:
        candidates.append(service)
    else:
        candidates.append((_home_data_dir(), "your home directory (no site config names a data_dir)"))
    if service is not None:
        candidates.append((_home_data_dir(), "your home directory"))
    path, source = candidates[0]
    others = [(p, s) for p, s in candidates[1:] if p != path and (p / STORE_FILE).is_file()]
    note = None
    if others:
        listed = "; ".join(f"{p} ({s})" for p, s in others)
        note = f"using data dir {path} (from {source}); not {listed}"
    return DataDirChoice(path, source, note)


def resolve_paths(data_dir_arg: str | Path | None, config: SiteConfig, config_path: Path | None = None) -> Path:
    """The data directory by `choose_data_dir`; says which one on stderr when two candidates exist."""
    choice = choose_data_dir(data_dir_arg, config, config_path)
    if choice.note:
        print(f"edgescreen: {choice.note}", file=sys.stderr)
    return choice.path
