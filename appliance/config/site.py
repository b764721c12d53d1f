"""The site config schema. Unknown keys are refused so a typo never silently falls back to a default."""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16 or not value.isascii() or "\\" in value or value.strip() != value:
        raise ValueError("an AE title is 1-16 ASCII characters, no backslash, no leading or trailing spaces")
    return value


def check_transport_url(value: str, name: str) -> str:
    """Results leave the box over TLS only; plain http is accepted for loopback (tests, the demo)."""
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{name} must be an https:// URL, not {value!r}")
    if parts.scheme == "http":
        host = parts.hostname
        loopback = host == "localhost"
        with contextlib.suppress(ValueError):  # a name, not an address
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        if not loopback:
            raise ValueError(f"{name} {value!r} is plain http: use https (certificates are always verified); "
                             "http is only for loopback tests")
    return value


class Site(_Section):
    """Clock times (clinic hours, the UI) follow the box's own time zone, set in the OS at provisioning."""

    name: str = "edgescreen demo site"
    # the site identifier given to `edgescreen provision --site-id` (issue 13): letters, digits, '.', '_', '-'
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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
    # STOW-RS authentication (HTTP basic with a password file, or a bearer token file) and TLS: certificates
    # are always verified, against the system store or the pinned CA bundle in dicomweb_ca_file
    dicomweb_username: str | None = None
    dicomweb_password_file: str | None = None
    dicomweb_token_file: str | None = None
    dicomweb_ca_file: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("dicomweb_url")
    @classmethod
    def _dicomweb_tls(cls, value: str | None) -> str | None:
        return None if value is None else check_transport_url(value, "dicom.pacs.dicomweb_url")

    @model_validator(mode="after")
    def _url_for_dicomweb(self) -> Pacs:
        if self.via != "dimse" and not self.dicomweb_url:
            raise ValueError(f"pacs.via = {self.via!r} needs pacs.dicomweb_url")
        if (self.dicomweb_username is None) != (self.dicomweb_password_file is None):
            raise ValueError("dicomweb_username and dicomweb_password_file go together")
        if self.dicomweb_password_file and self.dicomweb_token_file:
            raise ValueError("choose one of dicomweb_password_file (basic) and dicomweb_token_file (bearer)")
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
    # "fast": appliance.dicom.fastpath where this pynetdicom release is one it was validated against (the
    # stock path otherwise, said in the log); "stock": always pynetdicom's own acceptor
    receive_path: Literal["fast", "stock"] = "fast"
    pacs: Pacs | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class Web(_Section):
    """The staff UI. It listens on loopback until a technician sets `host` (e.g. "0.0.0.0") to open it on the
    LAN; every page but the login needs a user (`edgescreen users add`)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    threads: int = Field(default=8, ge=1, le=64)
    # show patient names and IDs as initials / last digits on the worklist (a screen the waiting room sees)
    mask_patient: bool = False
    session_idle_min: float = Field(default=30.0, gt=0, le=24 * 60, description="log out after this idle time")
    upload_max_mb: int = Field(default=2048, ge=1, le=65536, description="largest browser upload (zip or folder)")


class Triage(_Section):
    """Operating points by name, as each model card lists them (e.g. "spec99", "spec95", "spec90", "sens95");
    None means the card's default. The pipeline refuses a name the card does not have (issue 14.5)."""

    pancreas_operating_point: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]*$")
    mammo_operating_point: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]*$")


class RetryPolicy(_Section):
    """Bounded retries of a job after a system error of one class (issue 16): exponential backoff with jitter."""

    retries: int = Field(ge=0, le=100)
    base_s: float = Field(gt=0, le=86400)
    max_s: float = Field(gt=0, le=7 * 86400)


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
    dicom_stale_s: float = Field(default=30.0, gt=0, le=3600,
                                 description="the DICOM service's heartbeat older than this makes its MPPS and "
                                             "C-STORE signals stale (the fail-safe decides)")
    retry: dict[Literal["disk_full", "database", "io", "memory"], RetryPolicy] = Field(
        default_factory=dict, description="per error class: retries, base_s, max_s (defaults in "
                                          "appliance/scheduler/retry.py)")


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


class Deid(_Section):
    """De-identification of what goes to the cloud: DICOM PS3.15 Annex E basic profile plus these options."""

    # Retain Longitudinal Temporal Information, Modified Dates: dates shifted by a per-patient offset
    # derived from the site secret (intervals within a patient survive); otherwise dates are removed
    retain_dates_shifted: bool = False
    retain_device_identity: bool = False  # station name, device serial number, detector ID, ...
    retain_patient_characteristics: bool = False  # sex, age, size, weight, ethnic group, smoking, pregnancy
    # the per-site secret behind UID replacement and pseudonyms (created 0600 on first use when absent);
    # default: <data_dir>/sync/deid-secret. Keep it: a new secret maps the same study to new UIDs.
    secret_file: str | None = None


class Sync(_Section):
    enabled: bool = False  # the worker queues each finished study's cloud items (summary, SEG, SR)
    url: str | None = None  # the fleet receiver; the environment variable EDGESCREEN_CLOUD_URL overrides it
    device_id: str | None = None  # how the receiver names this box; default: the host name
    token_file: str | None = None  # this device's token (from `edgescreen cloud-receiver --add-device`)
    ca_file: str | None = None  # pinned CA bundle: only servers it signed are trusted (verification stays on)
    send_phi: bool = False  # True sends results WITH patient identity; only where the site has agreed to it
    deid: Deid = Field(default_factory=Deid)
    interval_s: float = Field(default=15.0, gt=0, le=3600)  # how often the service looks for due items
    heartbeat_s: float = Field(default=900.0, ge=10)
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    retry_base_s: float = Field(default=5.0, gt=0, le=86400)
    retry_max_s: float = Field(default=1800.0, gt=0, le=7 * 86400)
    chunk_kib: int = Field(default=256, ge=4, le=65536)  # resumable upload chunk
    max_kib_s: float | None = Field(default=None, gt=0, description="bandwidth cap in KiB/s; none: uncapped")
    windows: list[str] = Field(default_factory=list, description='local time windows, e.g. ["22:00-06:00"]; '
                               "empty: any time")
    only_on_mains: bool = False  # send only while the power gate's source reports mains power
    # the cloud waits while a job is being analysed (the sync service sleeps; PACS exports still go): even
    # niced, a sync that de-identifies and uploads slowed a CPU analysis by ~1.4x (bench/bench_sync.py)
    yield_to_inference: bool = True

    @field_validator("url")
    @classmethod
    def _tls(cls, value: str | None) -> str | None:
        return None if value is None else check_transport_url(value, "sync.url")

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        import re

        for w in value:
            if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d", w):
                raise ValueError(f"sync window {w!r} is not HH:MM-HH:MM (local time; may wrap midnight)")
        return value

    @model_validator(mode="after")
    def _url_when_enabled(self) -> Sync:
        if self.enabled and not self.url:
            raise ValueError("sync.enabled is true but sync.url is not set")
        return self


class Retention(_Section):
    """What the box deletes and when (issue 13; appliance.store.retention). Nothing of a study is deleted before
    every result of it was delivered (each PACS and cloud export sent) and reviewed by staff; the clock starts
    at the later of the two. Applied by the worker when idle and by `edgescreen purge`."""

    enabled: bool = True  # false: only `edgescreen purge` deletes, when a technician runs it
    images_days: float = Field(default=30.0, ge=1, le=36500)  # received images, after delivered + reviewed
    results_days: float = Field(default=365.0, ge=1, le=36500)  # SEG/SR/PDF/key images (findings rows stay)
    audit_days: float = Field(default=3650.0, ge=365, le=36500)  # the audit trail
    events_days: float = Field(default=90.0, ge=1, le=36500)  # scanner/power/job event log
    quarantine_days: float = Field(default=90.0, ge=1, le=36500)  # refused instances kept for inspection
    # images of studies no pipeline analysed (nothing to deliver or review): None keeps them until a
    # technician deletes them
    unanalysed_days: float | None = Field(default=None, ge=1, le=36500)
    every_s: float = Field(default=3600.0, ge=60, le=7 * 86400)  # the worker's pass, at most this often

    @model_validator(mode="after")
    def _longer(self) -> Retention:
        if self.results_days < self.images_days:
            raise ValueError(f"results_days ({self.results_days:g}) must be at least images_days "
                             f"({self.images_days:g}): results outlive the images they came from")
        if self.audit_days < self.results_days:
            raise ValueError(f"audit_days ({self.audit_days:g}) must be at least results_days ({self.results_days:g})")
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
    retention: Retention = Field(default_factory=Retention)
    logging: Logging = Field(default_factory=Logging)
