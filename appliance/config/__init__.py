"""Validated configuration: the site config (TOML) and the hardware profile (firmware_config/)."""

from edgescreen.appliance.config.load import ConfigError, load_profile, load_site_config, resolve_paths
from edgescreen.appliance.config.profile import HardwareProfile
from edgescreen.appliance.config.site import SiteConfig

__all__ = ["ConfigError", "HardwareProfile", "SiteConfig", "load_profile", "load_site_config", "resolve_paths"]
