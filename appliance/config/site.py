"""The site config schema. Unknown keys are refused so a typo never silently falls back to a default."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16 or not value.isascii() or "\\" in value or value.strip() != value:
        raise ValueError("an AE title is 1-16 ASCII characters, no backslash, no leading or trailing spaces")
    return value


class Site(_Section):
    name: str = "edgescreen demo site"
    timezone: str = "UTC"


class AllowedPeer(_Section):
    """A calling AE title that may send to us, optionally pinned to its IP address."""

    ae_title: str
    host: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("host")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)
        return value


class Pacs(_Section):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    dicomweb_url: str | None = None
    retries: int = Field(default=5, ge=0, le=100)

    _ae = field_validator("ae_title")(_check_ae_title)


class Dicom(_Section):
    ae_title: str = "EDGESCREEN"
    bind: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    allow_any_ae: bool = False
    allowed: list[AllowedPeer] = Field(default_factory=list)
    stable_after_s: float = Field(default=30.0, gt=0, le=3600)
    max_pdu: int = Field(default=0, ge=0)
    pacs: Pacs | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class Web(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    threads: int = Field(default=4, ge=1, le=64)


class Triage(_Section):
    """Operating points; None means the threshold the model card ships with."""

    pancreas_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    mammo_threshold: float | None = Field(default=None, ge=0.0, le=1.0)


class Scheduler(_Section):
    idle_grace_s: float = Field(default=120.0, ge=0, le=86400)
    failsafe: Literal["busy", "idle"] = "busy"
    scanner_rule: Literal["any_busy", "all_busy"] = "any_busy"
    store_quiet_s: float = Field(default=60.0, ge=0, le=86400)
    clinic_hours: str | None = Field(default=None, pattern=r"^\d{2}:\d{2}-\d{2}:\d{2}$")
    starvation_s: float = Field(default=6 * 3600.0, gt=0)
    lease_s: float = Field(default=120.0, gt=1, le=3600)


class Power(_Section):
    nut_host: str | None = None
    nut_port: int = Field(default=3493, ge=1, le=65535)
    nut_ups: str = "ups"
    nut_username: str | None = None
    nut_password: str | None = None
    scanner_power_var: str | None = None
    scanner_busy_above: float | None = None
    min_battery_percent: float = Field(default=40.0, ge=0, le=100)
    min_runtime_min: float = Field(default=15.0, ge=0)
    site_budget_w: float | None = Field(default=None, gt=0)
    stale_after_s: float = Field(default=30.0, gt=0)


class Sync(_Section):
    enabled: bool = False
    url: str | None = None
    send_phi: bool = False
    interval_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _url_when_enabled(self) -> Sync:
        if self.enabled and not self.url:
            raise ValueError("sync.enabled is true but sync.url is not set")
        return self


class Hardware(_Section):
    profile: str = "x86-cpu"
    bundle: str | None = None


class Logging(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class SiteConfig(_Section):
    site: Site = Field(default_factory=Site)
    data_dir: str | None = None
    dicom: Dicom = Field(default_factory=Dicom)
    web: Web = Field(default_factory=Web)
    triage: Triage = Field(default_factory=Triage)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    power: Power = Field(default_factory=Power)
    sync: Sync = Field(default_factory=Sync)
    hardware: Hardware = Field(default_factory=Hardware)
    logging: Logging = Field(default_factory=Logging)
