"""What every command and service needs: the validated config, the data directory, the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from appliance.config import HardwareProfile, SiteConfig, load_profile
from appliance.store import Store


@dataclass
class AppContext:
    config: SiteConfig
    data_dir: Path
    config_path: Path | None = None
    _profile_override: str | None = field(default=None, repr=False)

    @cached_property
    def profile(self) -> HardwareProfile:
        return load_profile(self._profile_override or self.config.hardware.profile)

    @cached_property
    def store(self) -> Store:
        return Store(self.data_dir)
