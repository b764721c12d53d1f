"""What every command and service needs: the validated config, the data directory, the store, the keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from edgescreen.appliance.config import HardwareProfile, SiteConfig, load_profile
from edgescreen.appliance.store import Store


@dataclass
class AppContext:
    config: SiteConfig
    data_dir: Path
    config_path: Path | None = None
    _profile_override: str | None = field(default=None, repr=False)
    # where keys/ lives when the rule below must not decide (the self-test's scratch appliance)
    key_dir: Path | None = field(default=None, repr=False)

    @cached_property
    def profile(self) -> HardwareProfile:
        return load_profile(self._profile_override or self.config.hardware.profile)

    @cached_property
    def store(self) -> Store:
        return Store(self.data_dir)

    @cached_property
    def key_home(self) -> Path:
        """The directory whose keys/ holds the bundle keys (appliance.bundle.key_paths).

        On a provisioned box it is the site config's directory (/etc/edgescreen): root-owned, outside the
        data directory that the network-facing services can write, so a compromised service can neither read
        the signing key nor plant a key of its own. On a developer's machine it is the data directory.
        """
        if self.key_dir is not None:
            return self.key_dir
        from edgescreen.appliance.bundle import key_home

        return key_home(self.config_path, self.data_dir)
