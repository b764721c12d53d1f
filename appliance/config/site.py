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
    """Clock times (clinic hours, the UI) follow the box's own time zone, set in the OS at provisioning."""

    name: str = "edgescreen demo site"


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
    """Where results (SEG, SR, summary) are sent: C-STORE to ae_title@host:port and/or STOW-RS to dicomweb_url."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    dicomweb_url: str | None = None
    # "dimse": C-STORE only; "dicomweb": STOW-RS only; "both": each result both ways (one outbox row whose
    # payload records which ways are done, so a retry resends only what failed)
    via: Literal["dimse", "dicomweb", "both"] = "dimse"
    retries: int = Field(default=5, ge=0, le=100)
    # exponential backoff between attempts: retry_base_s * 2**(attempt-1), capped at retry_max_s
    retry_base_s: float = Field(default=30.0, gt=0, le=86400)
    retry_max_s: float = Field(default=3600.0, gt=0, le=7 * 86400)
    timeout_s: float = Field(default=30.0, gt=0, le=600)

    _ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="after")
    def _url_for_dicomweb(self) -> Pacs:
        if self.via != "dimse" and not self.dicomweb_url:
            raise ValueError(f"pacs.via = {self.via!r} needs pacs.dicomweb_url")
        return self


class Dicom(_Section):
    ae_title: str = "EDGESCREEN"
    bind: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    allow_any_ae: bool = False
    allowed: list[AllowedPeer] = Field(default_factory=list)
    stable_after_s: float = Field(default=30.0, gt=0, le=3600)
    # our maximum receive PDU; 0 = unlimited. Large PDUs cut the per-PDU Python cost of receiving.
    max_pdu: int = Field(default=0, ge=0)
    # refuse C-STORE with 0xA700 (out of resources) when the data disk has less than this free
    min_free_mb: float = Field(default=500.0, ge=0)
    # "auto": fsync the directory after a rename only where the file system does not already make the
    # rename durable with the file's fsync (ext4/xfs/btrfs journal it); "always": fsync it everywhere
    fsync_dir: Literal["auto", "always"] = "auto"
    max_associations: int = Field(default=10, ge=1, le=200)
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
    clinic_hours: str | None = Field(default=None, pattern=r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$",
                                     description="HH:MM-HH:MM, local time; may wrap midnight")
    starvation_s: float = Field(default=6 * 3600.0, gt=0)
    lease_s: float = Field(default=120.0, gt=1, le=3600)
    max_crashes: int = Field(default=3, ge=1, le=100, description="worker deaths on one job before it is failed")


class Power(_Section):
    nut_host: str | None = None
    nut_port: int = Field(default=3493, ge=1, le=65535)
    nut_ups: str = "ups"
    nut_username: str | None = None
    nut_password: str | None = None
    scanner_power_var: Literal["ups.realpower", "ups.load"] | None = None
    scanner_busy_above: float | None = None
    min_battery_percent: float = Field(default=40.0, ge=0, le=100)
    min_runtime_min: float = Field(default=15.0, ge=0)
    site_budget_w: float | None = Field(default=None, gt=0)
    stale_after_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _scanner_meter_needs_nut(self) -> Power:
        if self.scanner_power_var is not None and (self.nut_host is None or self.scanner_busy_above is None):
            raise ValueError("scanner_power_var needs nut_host (the UPS that meters the scanner's circuit) "
                             "and scanner_busy_above")
        return self


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
    bundle: str | None = Field(default=None, description="a signed bundle dir; default: the installed one, if any")
    models_dir: str | None = Field(default=None, description="a clinic's own models (ONNX + cards) instead of the "
                                   "reference models; ignored when a bundle is used")


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
