"""The technician's diagnosis: named checks, each OK / WARN / FAIL with what was found and, when not OK, the fix.

Checks are looked up by name (``--json`` gives {name, status, detail, fix}), never by position, so adding
one breaks no reader (the cloud heartbeat, a script). Each check catches its own errors: a broken check
reports FAIL with the reason and the others still run. Network checks use short timeouts, so a dead PACS
or UPS costs seconds, not minutes.

Strictness follows the box: on a provisioned box (keys in /etc/edgescreen, units installed) a stopped
service or a missing bundle is a FAIL; on a developer's machine the same findings are warnings.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgescreen.appliance.context import AppContext

MIN_FREE_GB = 5.0  # below this the store refuses new studies within a day at a busy site
WARN_FREE_FRACTION = 0.10
MIN_FREE_INODES = 50_000  # one file per received instance: a 300-slice CT takes 300
NET_TIMEOUT_S = 5.0
CLOCK_MAX_ERROR_S = 1.0
SYNC_STALE_S = 7 * 86400
REQUIRED_PACKAGES = ("numpy", "scipy", "pydicom", "pynetdicom", "highdicom", "flask", "waitress",
                     "onnxruntime", "psutil", "cryptography", "pydantic", "PIL")
UNIT_DIR = Path("etc/systemd/system")
SERVICES = ("web", "dicom", "worker", "sync")


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def warn(name: str, detail: str, fix: str | None = None) -> Check:
    return Check(name, "warn", detail, fix)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", detail, fix)


@dataclass
class Box:
    """What the checks share: the context, the root the units live under, and how strict to be."""

    ctx: AppContext
    root: Path = Path("/")

    @property
    def provisioned(self) -> bool:
        return Path(self.ctx.key_home) != Path(self.ctx.data_dir)

    def problem(self, name: str, detail: str, fix: str) -> Check:
        """FAIL on a provisioned box, WARN on a developer's machine."""
        return fail(name, detail, fix) if self.provisioned else warn(name, detail, fix)

    def services(self) -> list[str]:
        return [s for s in SERVICES if s != "sync" or self.ctx.config.sync.enabled]


# ------------------------------------------------------------------------------------------- system


def check_python(box: Box) -> Check:
    return ok("python", f"{platform.python_version()} ({sys.executable})")


def check_packages(box: Box) -> Check:
    missing, found = [], []
    for name in REQUIRED_PACKAGES:
        try:
            module = importlib.import_module(name)
            found.append(f"{name} {getattr(module, '__version__', '')}".strip())
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    if missing:
        return fail("packages", f"missing: {', '.join(missing)}", "reinstall edgescreen: make install (or pip install "
                    "-c constraints.txt -e .) in the install directory")
    return ok("packages", f"{len(found)} required packages importable")


def check_profile(box: Box) -> Check:
    from edgescreen.appliance.config import ConfigError

    try:
        profile = box.ctx.profile
    except ConfigError as exc:
        return fail("hardware profile", str(exc), "set [hardware] profile in the site config to one of the known "
                    "profiles (firmware_config/README.md)")
    machine = platform.machine()
    if profile.arch != machine:
        return fail("hardware profile", f"{profile.name} is for {profile.arch} but this box is {machine}",
                    "set [hardware] profile to this hardware's profile and provision again")
    return ok("hardware profile", f"{profile.name}: {profile.description}")


def check_data_dir(box: Box) -> Check:
    data_dir = Path(box.ctx.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".doctor-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        with open(probe, "rb+") as fh:
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        return fail("data dir", f"{data_dir}: not writable ({exc.strerror})",
                    "run as root or the service user (sudo -u edgescreen ...), fix the directory's owner, or pass "
                    "--data-dir")
    return ok("data dir", f"{data_dir} writable")


def check_disk(box: Box) -> list[Check]:
    data_dir = Path(box.ctx.data_dir)
    target = data_dir if data_dir.exists() else data_dir.parent
    try:
        st = os.statvfs(target)
    except OSError as exc:
        return [fail("disk space", f"{target}: {exc.strerror}", "check the data disk is mounted")]
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    detail = f"{free / 1e9:.1f} GB free of {total / 1e9:.1f} GB on the data disk"
    purge = "free space: `edgescreen purge --dry-run` shows what the retention policy deletes, `edgescreen purge` " \
            "deletes it; or move data_dir to a larger disk"
    checks = []
    if free / 1e9 < MIN_FREE_GB:
        checks.append(fail("disk space", f"{detail}; need {MIN_FREE_GB:g} GB", purge))
    elif total and free / total < WARN_FREE_FRACTION:
        checks.append(warn("disk space", f"{detail} (under {WARN_FREE_FRACTION:.0%})", purge))
    else:
        checks.append(ok("disk space", detail))
    if st.f_files == 0:  # file systems without an inode limit (btrfs) report none
        checks.append(ok("disk inodes", "no inode limit on this file system"))
    elif st.f_favail < MIN_FREE_INODES:
        checks.append(fail("disk inodes", f"{st.f_favail} inodes free of {st.f_files}", purge))
    else:
        checks.append(ok("disk inodes", f"{st.f_favail} free of {st.f_files} ({st.f_favail / st.f_files:.0%})"))
    return checks


def check_database(box: Box) -> Check:
    from edgescreen.appliance.store import StoreError

    try:
        store = box.ctx.store
        intact = store.integrity_ok()
        report = store.check_files()
        version = store.schema_version()
    except (StoreError, OSError) as exc:
        return fail("database", str(exc), "check the data dir's permissions and free space; restore from backup if "
                    "the file is damaged")
    except Exception as exc:  # noqa: BLE001 - sqlite3 errors on a damaged file
        return fail("database", f"{type(exc).__name__}: {exc}", "restore the database from backup (see the guide)")
    if not intact:
        return fail("database", f"{store.db_path}: integrity check failed",
                    "stop the services and restore the database from backup (docs/technician-guide.md)")
    missing = len(report["missing_files"])
    detail = f"{store.db_path}, schema v{version}"
    if missing:
        return fail("database", f"{detail}; {missing} instance files are missing on disk",
                    "restore the files from backup or have the scanner resend the studies")
    return ok("database", detail)


def _adjtimex() -> tuple[bool, float] | None:
    """(synchronised, estimated error s) from the kernel's NTP state, whichever daemon keeps it."""
    import ctypes
    import ctypes.util

    class Timex(ctypes.Structure):
        _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                    ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                    ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                    ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
                    ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
                    ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
                    ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                    ("padding", ctypes.c_int * 11)]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        tx = Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    sta_unsync = 0x0040
    return (state != 5 and not tx.status & sta_unsync), tx.esterror / 1e6  # 5 = TIME_ERROR


def check_clock(box: Box) -> Check:
    from edgescreen import appliance
    released = Path(appliance.__file__).stat().st_mtime
    now = time.time()
    if now < released - 86400:
        return fail("clock", f"the clock reads {time.strftime('%Y-%m-%d %H:%M', time.localtime(now))}, before this "
                    "software was installed", "set the date and time (timedatectl set-time 'YYYY-MM-DD HH:MM'), then "
                    "enable NTP; a box without an RTC battery loses the time at every power cut")
    state = _adjtimex()
    if state is None:
        return warn("clock", "cannot read the kernel's NTP state", "check `timedatectl` says the clock is synchronised")
    synced, error_s = state
    if not synced:
        return warn("clock", "not synchronised by NTP: result and audit times may drift",
                    "enable NTP (timedatectl set-ntp true) or point chrony at the clinic's time server")
    if error_s > CLOCK_MAX_ERROR_S:
        return warn("clock", f"NTP-synchronised, estimated error {error_s:.1f} s", "check the NTP server is reachable")
    return ok("clock", f"NTP-synchronised, estimated error {error_s * 1000:.0f} ms")


# ----------------------------------------------------------------------------------------- services


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def check_services(box: Box) -> list[Check]:
    checks = []
    unit_dir = box.root / UNIT_DIR
    live = box.root.resolve() == Path("/") and _systemd_running()
    for service in box.services():
        unit = f"edgescreen-{service}.service"
        name = f"service {service}"
        if not (unit_dir / unit).is_file():
            checks.append(box.problem(name, f"{unit} is not installed in /{UNIT_DIR}",
                                      "sudo edgescreen provision --profile PROFILE --site-id SITE"))
            continue
        if not live:
            checks.append(warn(name, f"{unit} installed; systemd is not running here, so not started",
                               "boot the box under systemd; the units start with edgescreen.target"))
            continue
        import subprocess

        proc = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True, timeout=10)
        state = proc.stdout.strip() or proc.stderr.strip()
        if state == "active":
            checks.append(ok(name, f"{unit} active"))
        else:
            checks.append(fail(name, f"{unit} is {state}", f"sudo systemctl restart {unit}; if it stops again, "
                               f"journalctl -u {unit} -n 50 says why"))
    return checks


def _tcp(host: str, port: int) -> tuple[bool, str]:
    from edgescreen.appliance.sdnotify import tcp_accepts

    return tcp_accepts(host, port, timeout_s=NET_TIMEOUT_S)


def check_ports(box: Box) -> list[Check]:
    cfg = box.ctx.config
    checks = []
    for name, host, port, unit in (("port web", cfg.web.host, cfg.web.port, "edgescreen-web"),
                                   ("port dicom", cfg.dicom.bind, cfg.dicom.port, "edgescreen-dicom")):
        up, detail = _tcp(host, port)
        checks.append(ok(name, detail) if up else box.problem(
            name, detail, f"start the service (sudo systemctl start {unit}); if it runs, another program holds the "
            f"port: `ss -ltnp 'sport = :{port}'` names it"))
    return checks


def _echo(host: str, port: int, called: str, calling: str) -> tuple[str, str]:
    """('ok' | 'rejected' | 'down', detail) of a C-ECHO."""
    import logging

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the result says what happened, once
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = NET_TIMEOUT_S
    ae.connection_timeout = NET_TIMEOUT_S
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called)
    try:
        if assoc.is_established:
            status = assoc.send_c_echo()
            code = getattr(status, "Status", None)
            if code == 0:
                return "ok", f"C-ECHO {called}@{host}:{port} answered 0x{code:04X}"
            if code is None:  # the peer took the association, then dropped the echo: it does not know us
                return "rejected", f"{called}@{host}:{port} refused the C-ECHO from calling AE {calling}"
            return "down", f"C-ECHO {called}@{host}:{port} answered 0x{code:04X}, not success"
        if assoc.is_rejected:
            return "rejected", f"association to {called}@{host}:{port} rejected (calling AE {calling})"
        return "down", f"no DICOM association with {called}@{host}:{port} (no answer within {NET_TIMEOUT_S:g} s)"
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def check_dicom_self(box: Box) -> Check:
    cfg = box.ctx.config.dicom
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(cfg.bind, cfg.bind)
    listening, detail = _tcp(host, cfg.port)
    state, detail = _echo(host, cfg.port, cfg.ae_title, "ESDOCTOR") if listening else ("down", detail)
    if state == "ok":
        return ok("dicom echo self", detail)
    if state == "rejected":  # the listener answers; the allow-list refused the doctor, as it should a stranger
        return ok("dicom echo self", f"{detail}: the listener answers and its allow-list refuses strangers")
    return box.problem("dicom echo self", detail, "start the DICOM service (sudo systemctl start edgescreen-dicom); "
                       "journalctl -u edgescreen-dicom says why it stopped")


def check_dicom_pacs(box: Box) -> Check:
    cfg = box.ctx.config.dicom
    if cfg.pacs is None:
        return ok("dicom echo pacs", "no PACS configured: results stay on the box (and the cloud, if synced)")
    state, detail = _echo(cfg.pacs.host, cfg.pacs.port, cfg.pacs.ae_title, cfg.ae_title)
    if state == "ok":
        return ok("dicom echo pacs", detail)
    fix = (f"on the PACS, add AE {cfg.ae_title} at this box's address as a known modality" if state == "rejected" else
           f"check the PACS is on and reachable (ping {cfg.pacs.host}) and [dicom.pacs] ae_title/host/port match it")
    return fail("dicom echo pacs", detail, fix + "; exports wait in the outbox meanwhile (edgescreen outbox list)")


def check_allow_list(box: Box) -> Check:
    cfg = box.ctx.config.dicom
    fix = "add the scanner: sudo edgescreen provision ... --scanner-ae AE --scanner-host IP, or [[dicom.allowed]] entries"
    if cfg.allow_any_ae:
        return warn("allow-list", "any calling AE title may send (dicom.allow_any_ae = true)",
                    "set allow_any_ae = false and " + fix)
    if not cfg.allowed:
        return box.problem("allow-list", "no calling AE title may send: every association is rejected", fix)
    unpinned = [p.ae_title for p in cfg.allowed if not p.host]
    listed = ", ".join(f"{p.ae_title}@{p.host or '*'}" for p in cfg.allowed)
    if unpinned:
        return warn("allow-list", f"{listed}; {', '.join(unpinned)} may send from any address",
                    "pin each entry to its scanner's IP address (host = \"...\")")
    return ok("allow-list", listed)


def check_ups(box: Box) -> Check:
    cfg = box.ctx.config.power
    if not cfg.nut_host:
        return warn("ups", "no UPS configured: the box cannot tell mains from battery and runs as on mains",
                    "connect the UPS, run NUT's upsd, set [power] nut_host (and nut_ups)")
    from edgescreen.appliance.power.nut import NutPowerSource

    reading = NutPowerSource(cfg.nut_host, cfg.nut_port, cfg.nut_ups, username=cfg.nut_username,
                             password=cfg.nut_password).read()
    where = f"{cfg.nut_ups}@{cfg.nut_host}:{cfg.nut_port}"
    if reading.error or reading.stale:
        return fail("ups", f"{where}: {reading.error or 'stale data'}",
                    f"check upsd runs and knows the UPS (upsc {where.replace(':' + str(cfg.nut_port), '')}); the "
                    f"scheduler meanwhile applies scheduler.failsafe = {box.ctx.config.scheduler.failsafe}")
    parts = [f"status {reading.status_raw}"]
    if reading.battery_percent is not None:
        parts.append(f"charge {reading.battery_percent:.0f}%")
    if reading.runtime_s is not None:
        parts.append(f"runtime {reading.runtime_s / 60:.0f} min")
    detail = f"{where}: " + ", ".join(parts)
    if reading.on_mains is False:
        return warn("ups", detail + " (ON BATTERY)", "check the mains supply; analysis waits for the power gate")
    return ok("ups", detail)


# ---------------------------------------------------------------------------------- models and keys


def check_bundle(box: Box) -> Check:
    from edgescreen.appliance.bundle import BundleError, verify_bundle
    from edgescreen.appliance.bundle_match import mismatches
    from edgescreen.appliance.selftest import active_bundle

    bundle = active_bundle(box.ctx)
    if bundle is None:
        return box.problem("bundle", "no model bundle is active: analyses use the FP32 reference models",
                           "sudo edgescreen provision ... (installs or builds one), or edgescreen bundle install DIR")
    try:
        manifest = verify_bundle(bundle, box.ctx.key_home)
    except BundleError as exc:
        return fail("bundle", str(exc), "edgescreen bundle rollback (to the previous one), or provision again to "
                    "rebuild it")
    try:
        profile = box.ctx.profile.name
    except Exception:  # noqa: BLE001 - the profile check reports that
        profile = manifest.profile
    problems = mismatches(manifest, profile)
    if problems:
        return fail("bundle", f"{manifest.bundle_id}: signature valid, but {'; '.join(problems)}",
                    "rebuild it for this box: sudo edgescreen provision ... (runs the optimiser when no bundle fits)")
    return ok("bundle", f"{manifest.bundle_id}: signature valid, fits {profile} on {platform.machine()}")


def check_keys(box: Box) -> Check:
    from edgescreen.appliance.bundle import key_paths

    private, public, _ = key_paths(box.ctx.key_home)
    legacy, _, _ = key_paths(box.ctx.data_dir)
    if box.provisioned and legacy.exists():
        return fail("signing key", f"a private key lies in the data directory ({legacy}), readable by the services",
                    "sudo edgescreen provision ... moves it to /etc/edgescreen/keys (or delete it if a key is there)")
    if not public.is_file():
        return box.problem("signing key", f"no public key at {public}: no bundle can be verified",
                           "sudo edgescreen provision ... creates the device keys")
    if box.provisioned:
        try:
            st = private.stat()
        except PermissionError:
            return ok("signing key", f"{private} not readable by this user (as intended); services verify with "
                      f"{public.name}")
        except FileNotFoundError:
            return ok("signing key", f"no private key on this box (bundles come prebuilt); verifying with {public}")
        if st.st_mode & 0o077 or st.st_uid != 0:
            return fail("signing key", f"{private} is mode {st.st_mode & 0o777:o}, owner uid {st.st_uid}",
                        f"sudo chown root:root {private} && sudo chmod 600 {private}")
        mine = "" if os.access(private, os.R_OK) else " (not readable by this user, as intended)"
        return ok("signing key", f"{private} root-only (0600), outside the data dir{mine}; services verify with "
                  f"{public.name}")
    return ok("signing key", f"{public} (developer layout: keys in the data dir)")


def check_backends(box: Box) -> list[Check]:
    from edgescreen.appliance.runtime import available_backends

    used = {"onnxruntime"}
    try:
        from edgescreen.appliance.bundle import verify_bundle
        from edgescreen.appliance.selftest import active_bundle

        bundle = active_bundle(box.ctx)
        if bundle is not None:
            used |= {m.backend for m in verify_bundle(bundle, box.ctx.key_home).models.values()}
    except Exception:  # noqa: BLE001 - the bundle check reports bundle problems
        pass
    checks = []
    for name, (available, detail) in available_backends().items():
        check = f"backend {name}"
        if available:
            checks.append(ok(check, detail))
        elif name in used:
            checks.append(fail(check, f"unavailable: {detail}", "reinstall the runtime library the bundle needs, or "
                               "provision again to rebuild the bundle for what this box has"))
        else:
            checks.append(warn(check, f"unavailable: {detail}", None))
    return checks


def check_selftest(box: Box) -> Check:
    from edgescreen.appliance.selftest import last_run

    last = last_run(box.ctx.data_dir)
    if last is None:
        return box.problem("self-test", "never run on this box", "sudo edgescreen selftest")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last.get("finished_at") or 0))
    if last.get("passed"):
        return ok("self-test", f"passed {when} with bundle {last.get('bundle_id')}")
    why = last.get("error") or "; ".join(f"{c['name']}: {', '.join(c['differences'][:2])}"
                                         for c in last.get("cases", []) if not c.get("passed"))
    return fail("self-test", f"FAILED {when}: {why}"[:400], "do not use the box for patients; run sudo edgescreen "
                "selftest, and if it fails again, roll the bundle back (edgescreen bundle rollback) or provision again")


def check_telemetry(box: Box) -> Check:
    home = box.root / Path.home().relative_to("/")  # this user's home, inside the root doctor looks at
    homes = [home, Path(box.ctx.data_dir)] if box.provisioned else [home]
    missing = []
    for home in homes:
        consent = home / "intel" / "openvino_telemetry"
        try:
            if consent.read_text().strip() != "0":
                missing.append(str(consent))
        except OSError:
            missing.append(str(consent))
    if missing:
        return warn("telemetry", f"OpenVINO/NNCF telemetry not opted out ({', '.join(missing)})",
                    "sudo edgescreen provision ... writes the opt-out (or: opt_in_out --opt_out as each user)")
    return ok("telemetry", "OpenVINO/NNCF telemetry opted out")


# ------------------------------------------------------------------------------------- cloud and UI


def check_cloud(box: Box) -> Check:
    sync = box.ctx.config.sync
    if not sync.enabled or not sync.url:
        return ok("cloud", "sync off: nothing leaves the box")
    from urllib.parse import urlsplit

    parts = urlsplit(sync.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    reachable, detail = _tcp(parts.hostname or "", port)
    last = "never"
    pending = failed = 0
    try:
        from edgescreen.appliance.sync.status import summary

        cloud = summary(box.ctx.store)["cloud"]
        pending, failed = cloud["pending"], cloud["failed"]
        if cloud["last_success"]:
            last = time.strftime("%Y-%m-%d %H:%M", time.localtime(cloud["last_success"]))
        stale = cloud["last_success"] is None or time.time() - cloud["last_success"] > SYNC_STALE_S
    except Exception as exc:  # noqa: BLE001 - an older store, or sync not installed
        return warn("cloud", f"cannot read the sync status ({type(exc).__name__}: {exc})", None)
    text = f"{parts.hostname}:{port} {'reachable' if reachable else 'not reachable'}; last sync {last}; " \
           f"{pending} pending, {failed} failed"
    if failed:
        return fail("cloud", text, "edgescreen outbox list shows why; edgescreen outbox retry ID after fixing it")
    if not reachable or (stale and pending):
        return warn("cloud", text, "normal while the link is down (results wait in the outbox); if it lasts, check "
                    "the clinic's internet link and [sync] url")
    return ok("cloud", text)


def check_web_exposure(box: Box) -> Check:
    import ipaddress

    host = box.ctx.config.web.host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return ok("web exposure", f"UI on {host} only (staff reach it on this box)")
    try:
        users = box.ctx.store.query_one("SELECT COUNT(*) FROM users WHERE disabled = 0")[0]
        unchanged = box.ctx.store.query_one("SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled = 0 AND "
                                            "must_change_password = 1")[0]
    except Exception as exc:  # noqa: BLE001 - an older schema without the login columns
        return fail("web exposure", f"UI on {host}:{box.ctx.config.web.port} and the login state is unreadable ({exc})",
                    "upgrade edgescreen, or set [web] host = \"127.0.0.1\"")
    if users == 0:
        return fail("web exposure", f"UI on {host}:{box.ctx.config.web.port} (the LAN) with no user: nobody can log "
                    "in", "edgescreen users add NAME --role admin")
    detail = f"UI on {host}:{box.ctx.config.web.port} (the LAN), staff login required, {users} active user(s)"
    if unchanged:
        return warn("web exposure", detail + f"; {unchanged} admin(s) still on a one-time password",
                    "log in as admin and choose a new password")
    return ok("web exposure", detail)


def check_retention(box: Box) -> Check:
    from edgescreen.appliance.store.retention import plan

    policy = box.ctx.config.retention
    try:
        todo = plan(box.ctx.store, policy)
    except Exception as exc:  # noqa: BLE001 - an older schema
        return warn("retention", f"cannot plan ({type(exc).__name__}: {exc})", None)
    kept = sum(todo.kept.values())
    detail = (f"images {policy.images_days:g} d after delivery and review; {kept} study(ies) kept, "
              f"{todo.bytes / 1e6:.0f} MB due for deletion")
    if not policy.enabled:
        return warn("retention", "off: nothing is deleted automatically; " + detail,
                    "set [retention] enabled = true, or run edgescreen purge regularly")
    return ok("retention", detail)


# -------------------------------------------------------------------------------------------- all


CHECKS: list[Callable[[Box], Check | list[Check]]] = [
    check_python, check_packages, check_profile, check_data_dir, check_disk, check_database, check_clock,
    check_services, check_ports, check_dicom_self, check_dicom_pacs, check_allow_list, check_ups,
    check_bundle, check_keys, check_backends, check_selftest, check_telemetry, check_cloud, check_web_exposure,
    check_retention,
]
NEEDS_STORE = {check_database, check_web_exposure, check_retention, check_cloud}


def run_checks(ctx: AppContext, *, root: Path = Path("/")) -> list[Check]:
    box = Box(ctx, Path(root))
    results: list[Check] = []
    store_ok = True
    for check in CHECKS:
        if check in NEEDS_STORE and not store_ok:
            continue
        try:
            found = check(box)
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            name = check.__name__.removeprefix("check_").replace("_", " ")
            found = fail(name, f"the check itself failed: {type(exc).__name__}: {exc}",
                         "report this with `edgescreen doctor --json`")
        items = found if isinstance(found, list) else [found]
        if check is check_data_dir and items[0].status == "fail":
            store_ok = False
        results += items
    return results
