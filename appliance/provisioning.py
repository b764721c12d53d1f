"""Provisioning: one command turns a fresh box into a running, self-tested appliance (`edgescreen provision`).

Every step is idempotent and reports whether it changed anything, so a second identical run changes no
file and says so; a run with a new option changes only what that option touches. Each step writes a
file only when its content, mode or owner differ, and writes it atomically.

``--root DIR`` installs into a staging root, as `systemctl --root` and `systemd-sysusers --root` do: files
land under DIR, while the paths written *inside* them (units, site config) are the paths the box will
see (/etc/edgescreen, /var/lib/edgescreen). Nothing is started and no system user is created there; the
sysusers.d entry creates the user when the root boots. Without --root the same steps run on this box,
the user is created and the services are started.

Layout (as the box sees it):
  /etc/edgescreen/site.toml               0640 root:edgescreen  the validated site config
  /etc/edgescreen/keys/bundle_ed25519     0600 root             bundle signing key (provisioning, optimiser)
  /etc/edgescreen/keys/bundle_ed25519.pub 0644 root             what the services verify bundles with
  /etc/edgescreen/keys/trusted/*.pub      0644 root             builders' keys trusted for prebuilt bundles
  /etc/edgescreen/cloud-token             0640 root:edgescreen  this device's cloud token (--token-file)
  /var/lib/edgescreen/                    0750 edgescreen       the data directory (store, files, bundles)
  /etc/systemd/system/edgescreen*.{service,target}, with the .wants links `systemctl enable` makes
  /etc/sysusers.d/edgescreen.conf                               the service user, for systemd-sysusers
  ~/intel/openvino_telemetry = 0 for root and the service user  OpenVINO/NNCF telemetry opted out
"""

from __future__ import annotations

import contextlib
import os
import platform
import pwd
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgescreen.appliance.config.load import SERVICE_USER, SYSTEM_CONFIG, SYSTEM_DATA_DIR
from edgescreen.appliance.logs import get_logger

log = get_logger(__name__)

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "systemd"
DOCS = REPO / "docs"
UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS = Path("/etc/sysusers.d/edgescreen.conf")
CACHE_DIR = Path("/var/cache/edgescreen")
TOKEN_NAME = "cloud-token"
TELEMETRY_FILE = Path("intel") / "openvino_telemetry"  # openvino_telemetry's consent file under $HOME
SERVICES = ("web", "dicom", "worker", "sync")
TARGET = "edgescreen.target"
GPU_ACCELERATORS = {"nvidia", "jetson", "intel-igpu"}


class ProvisionError(RuntimeError):
    """Provisioning cannot go on; the message says what is wrong and what to do."""


class NoCalibrationImages(ProvisionError):
    """The optimiser found no mammography calibration images (mini-MIAS is never shipped to a box)."""


@dataclass
class Options:
    profile: str
    site_id: str
    root: Path = Path("/")
    cloud: str | None = None
    token_file: Path | None = None
    scanner_ae: str | None = None
    scanner_host: str | None = None
    pacs: str | None = None
    web_host: str | None = None
    dicom_port: int | None = None
    no_start: bool = False
    service_user: str = SERVICE_USER
    bundle: list[Path] = field(default_factory=list)  # prebuilt signed bundles (or directories of them)
    trust_keys: list[Path] = field(default_factory=list)  # public keys of the boxes that built them
    optimize_args: list[str] = field(default_factory=list)
    skip_selftest: bool = False
    force_selftest: bool = False


@dataclass
class Step:
    name: str
    changed: bool
    detail: str


@dataclass
class Outcome:
    steps: list[Step] = field(default_factory=list)
    admin_password: str | None = None
    selftest: Any = None  # appliance.selftest.SelftestResult when it ran

    @property
    def changed(self) -> bool:
        return any(s.changed for s in self.steps)


# ------------------------------------------------------------------------------------------ helpers


class Installer:
    """Idempotent writes into a root: a file is rewritten only when its bytes differ; mode and owner fixed."""

    def __init__(self, root: Path, user: str) -> None:
        self.root = Path(root)
        self.user = user
        try:
            pw = pwd.getpwnam(user)
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
        except KeyError:
            self.uid = self.gid = None

    @property
    def live(self) -> bool:
        return self.root.resolve() == Path("/")

    def path(self, target: Path | str) -> Path:
        """Where a path of the box lies in this root."""
        return self.root / Path(target).relative_to("/")

    def owner(self, service: bool) -> tuple[int, int]:
        """(uid, gid): root:root, or the service user's where it exists (root:root in a staging root without it)."""
        if service and self.uid is not None:
            return self.uid, self.gid  # type: ignore[return-value]
        return 0, 0

    def _fix(self, path: Path, mode: int, uid: int, gid: int) -> bool:
        st = path.lstat()
        changed = False
        if (st.st_mode & 0o7777) != mode:
            os.chmod(path, mode)
            changed = True
        if (st.st_uid, st.st_gid) != (uid, gid) and os.geteuid() == 0:
            os.chown(path, uid, gid)
            changed = True
        return changed

    def directory(self, target: Path | str, mode: int, *, service: bool = False, group_service: bool = False) -> bool:
        path = self.path(target)
        created = not path.is_dir()
        path.mkdir(parents=True, exist_ok=True)
        uid, gid = self.owner(service)
        if group_service and self.gid is not None:
            gid = self.gid
        return self._fix(path, mode, uid, gid) or created

    def file(self, target: Path | str, data: bytes, mode: int, *, service: bool = False,
             group_service: bool = False) -> bool:
        from edgescreen.appliance.store.files import atomic_write

        path = self.path(target)
        uid, gid = self.owner(service)
        if group_service and self.gid is not None:
            gid = self.gid
        if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
            return self._fix(path, mode, uid, gid)
        atomic_write(path, data, mode=mode)
        self._fix(path, mode, uid, gid)
        return True

    def symlink(self, target: Path | str, points_to: str) -> bool:
        path = self.path(target)
        if path.is_symlink() and os.readlink(path) == points_to:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(points_to, tmp)
        os.replace(tmp, path)
        return True

    def remove(self, target: Path | str) -> bool:
        path = self.path(target)
        if path.is_symlink() or path.exists():
            path.unlink()
            return True
        return False

    def chown_tree(self, target: Path | str, skip: tuple[str, ...] = ()) -> int:
        """Give the service user what lies under a directory it owns; returns how many entries changed."""
        if self.uid is None or os.geteuid() != 0:
            return 0
        changed = 0
        top = self.path(target)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not (Path(dirpath) == top and d in skip)]
            for name in [*dirnames, *filenames]:
                p = Path(dirpath) / name
                st = p.lstat()
                if (st.st_uid, st.st_gid) != (self.uid, self.gid):
                    os.lchown(p, self.uid, self.gid)
                    changed += 1
        return changed


def _parse_pacs(text: str) -> dict[str, Any]:
    """AE@HOST:PORT -> the [dicom.pacs] keys."""
    try:
        ae, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        return {"ae_title": ae, "host": host.strip("[]"), "port": int(port)}
    except ValueError:
        raise ProvisionError(f"--pacs {text!r}: use AE@HOST:PORT, for example PACS@192.168.1.20:104") from None


def _executable() -> list[str]:
    """How the units start edgescreen: the console script of the environment running this command."""
    script = Path(sys.executable).parent / "edgescreen"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "edgescreen.appliance.cli"]


# -------------------------------------------------------------------------------------------- steps


def step_service_user(inst: Installer, opts: Options, data_dir: Path) -> Step:
    """The dedicated user the services run as: a sysusers.d entry always; useradd on the live box."""
    nologin = "/usr/sbin/nologin"
    entry = f"# edgescreen services (written by edgescreen provision)\nu {opts.service_user} - \"edgescreen appliance\" {data_dir} {nologin}\n"
    changed = inst.file(SYSUSERS, entry.encode(), 0o644)
    if inst.live and inst.uid is None:
        cmd = ["useradd", "--system", "--user-group", "--home-dir", str(data_dir), "--no-create-home",
               "--shell", nologin, "--comment", "edgescreen appliance", opts.service_user]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ProvisionError(f"cannot create the service user {opts.service_user}: {proc.stderr.strip()}; "
                                 "run provision as root")
        inst.__init__(inst.root, opts.service_user)  # pick up the new uid/gid
        return Step("service user", True, f"created system user {opts.service_user}")
    if inst.uid is None:
        return Step("service user", changed, f"{opts.service_user} is created by systemd-sysusers when this root "
                    "boots (it does not exist here: the staged files stay root-owned)")
    return Step("service user", changed, f"{opts.service_user} (uid {inst.uid})")


def step_directories(inst: Installer, config_dir: Path, data_dir: Path) -> Step:
    changed = inst.directory(config_dir, 0o755)
    changed |= inst.directory(config_dir / "keys", 0o755)
    changed |= inst.directory(config_dir / "keys" / "trusted", 0o755)
    changed |= inst.directory(data_dir, 0o750, service=True)
    return Step("directories", changed, f"{config_dir} (root), {data_dir} (the service user's)")


def _merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def site_config_document(existing: dict[str, Any], opts: Options, profile_name: str, data_dir: Path,
                         config_dir: Path) -> dict[str, Any]:
    """The site config after provisioning: the existing one with the keys this run manages set."""
    updates: dict[str, Any] = {
        "data_dir": str(data_dir),
        "site": {"id": opts.site_id},
        "hardware": {"profile": profile_name},
    }
    if "name" not in existing.get("site", {}):
        updates["site"]["name"] = f"edgescreen {opts.site_id}"
    dicom: dict[str, Any] = {}
    if opts.dicom_port is not None:
        dicom["port"] = opts.dicom_port
    if opts.scanner_ae:
        allowed = [dict(p) for p in existing.get("dicom", {}).get("allowed", [])]
        peer = {"ae_title": opts.scanner_ae, **({"host": opts.scanner_host} if opts.scanner_host else {})}
        allowed = [p for p in allowed if p.get("ae_title") != opts.scanner_ae] + [peer]
        dicom["allowed"] = sorted(allowed, key=lambda p: (p["ae_title"], p.get("host") or ""))
    elif opts.scanner_host:
        raise ProvisionError("--scanner-host needs --scanner-ae (the scanner's calling AE title)")
    if opts.pacs:
        dicom["pacs"] = _merge(existing.get("dicom", {}).get("pacs", {}), _parse_pacs(opts.pacs))
    if dicom:
        updates["dicom"] = dicom
    if opts.web_host:
        updates["web"] = {"host": opts.web_host}
    if opts.cloud:
        updates["sync"] = {"enabled": True, "url": opts.cloud}
    if opts.token_file:
        if not opts.cloud and not existing.get("sync", {}).get("url"):
            raise ProvisionError("--token-file needs --cloud URL (the fleet receiver it is a token for)")
        updates.setdefault("sync", {})["token_file"] = str(config_dir / TOKEN_NAME)
    return _merge(existing, updates)


def step_site_config(inst: Installer, opts: Options, profile_name: str, config_dir: Path, data_dir: Path
                     ) -> tuple[Step, Any]:
    import tomli_w
    from pydantic import ValidationError

    from edgescreen.appliance.config.load import describe_error
    from edgescreen.appliance.config.site import SiteConfig

    target = config_dir / "site.toml"
    path = inst.path(target)
    existing: dict[str, Any] = {}
    if path.is_file():
        try:
            existing = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ProvisionError(f"{path}: not valid TOML ({exc}); fix or remove it, then provision again") from None
    document = site_config_document(existing, opts, profile_name, data_dir, config_dir)
    try:
        config = SiteConfig.model_validate(document)
    except ValidationError as exc:
        raise ProvisionError(describe_error(exc, path)) from None
    if document == existing:  # same settings: leave the file (and any comments in it) alone
        changed = inst._fix(path, 0o640, 0, inst.gid if inst.gid is not None else 0)
        return Step("site config", changed, f"{target} unchanged"), config
    header = ("# edgescreen site config, written by `edgescreen provision`. Edit it freely: provisioning again\n"
              "# sets only the keys its options name and keeps the rest. Validate with `edgescreen config`.\n")
    inst.file(target, (header + tomli_w.dumps(document)).encode(), 0o640, group_service=True)
    return Step("site config", True, f"{target} written (site {opts.site_id}, profile {profile_name})"), config


def _move_legacy_keys(inst: Installer, config_dir: Path, data_dir: Path) -> str | None:
    """Before this layout the signing key lived in <data_dir>/keys, readable by every service: move it out
    (bundles it signed still verify), or, if this box already has a key here, trust the old one's public half
    and delete its private half."""
    from edgescreen.appliance.bundle import fingerprint, key_paths, load_private_key
    from edgescreen.appliance.store.files import atomic_write

    old_private, old_public, old_trusted = key_paths(inst.path(data_dir))
    private, _, trusted = key_paths(inst.path(config_dir))
    if not old_private.is_file():
        return None
    for pub in sorted(old_trusted.glob("*.pub")) if old_trusted.is_dir() else []:
        atomic_write(trusted / pub.name, pub.read_bytes(), mode=0o644)
    if not private.exists():
        atomic_write(private, old_private.read_bytes(), mode=0o600)
        what = f"moved the signing key out of the data directory to {config_dir / 'keys'}"
    else:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        key = load_private_key(old_private).public_key()
        name = "legacy-" + fingerprint(key).split(":")[1][:16] + ".pub"
        atomic_write(trusted / name, key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo), mode=0o644)
        what = f"deleted a second signing key from the data directory (its bundles stay trusted: trusted/{name})"
    old_private.unlink()
    with contextlib.suppress(FileNotFoundError):
        old_public.unlink()
    return what


def step_keys(inst: Installer, opts: Options, config_dir: Path, data_dir: Path) -> Step:
    from edgescreen.appliance.bundle import (
        PRIVATE_KEY,
        PUBLIC_KEY,
        ensure_signing_key,
        fingerprint,
        load_public_key,
    )

    home = inst.path(config_dir)
    keys = home / "keys"
    moved = _move_legacy_keys(inst, config_dir, data_dir)
    existed = (keys / PRIVATE_KEY).is_file()
    ensure_signing_key(home)
    changed = not existed or moved is not None
    changed |= inst._fix(keys / PRIVATE_KEY, 0o600, 0, 0)
    changed |= inst._fix(keys / PUBLIC_KEY, 0o644, 0, 0)
    trusted = []
    for pub in opts.trust_keys:
        try:
            key = load_public_key(Path(pub))
        except Exception as exc:  # noqa: BLE001 - one line for the technician
            raise ProvisionError(f"--trust-key {pub}: {exc}") from None
        name = fingerprint(key).split(":")[1][:16] + ".pub"
        changed |= inst.file(config_dir / "keys" / "trusted" / name, Path(pub).read_bytes(), 0o644)
        trusted.append(name)
    fp = fingerprint(load_public_key(keys / PUBLIC_KEY))
    detail = f"signing key {fp[:23]}... (private key root-only, 0600)" + (f"; {moved}" if moved else "")
    if trusted:
        detail += f"; trusting {', '.join(trusted)}"
    return Step("keys", changed, detail)


def step_cloud_token(inst: Installer, opts: Options, config_dir: Path) -> Step | None:
    if opts.token_file is None:
        return None
    try:
        token = Path(opts.token_file).read_bytes()
    except OSError as exc:
        raise ProvisionError(f"--token-file {opts.token_file}: {exc.strerror}") from None
    if not token.strip():
        raise ProvisionError(f"--token-file {opts.token_file} is empty")
    changed = inst.file(config_dir / TOKEN_NAME, token, 0o640, group_service=True)
    return Step("cloud token", changed, f"{config_dir / TOKEN_NAME} (root, readable by the service group)")


def step_telemetry(inst: Installer, data_dir: Path) -> Step:
    """OpenVINO and NNCF send usage telemetry unless the user's consent file says 0 (openvino_telemetry reads
    ~/intel/openvino_telemetry); write it for root (provisioning, the optimiser) and the service user, whose
    home is the data directory. Without the file NNCF would try to send on every optimiser run."""
    changed = inst.directory(Path("/root") / "intel", 0o700)
    changed |= inst.file(Path("/root") / TELEMETRY_FILE, b"0\n", 0o644)
    changed |= inst.directory(data_dir / "intel", 0o750, service=True)
    changed |= inst.file(data_dir / TELEMETRY_FILE, b"0\n", 0o644, service=True)
    return Step("telemetry", changed, "openvino-telemetry opted out for root and the service user")


def render_unit(name: str, values: dict[str, str]) -> str:
    template = TEMPLATES / f"{name}.in"
    if not template.is_file():
        raise ProvisionError(f"unit template {template} missing: this edgescreen install is incomplete")
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    if leftover:
        raise ProvisionError(f"unit template {template}: nothing fills {', '.join(leftover)}")
    return text


def unit_values(config: Any, profile: Any, user: str, config_path: Path, data_dir: Path) -> dict[str, str]:
    exe = " ".join(_executable())
    in_home = any(exe.startswith(p) for p in ("/home/", "/root/", "/run/user/"))
    gpu = profile.accelerator in GPU_ACCELERATORS
    return {
        "EXEC": exe, "USER": user, "CONFIG": str(config_path), "DATA_DIR": str(data_dir), "DOCS": str(DOCS),
        # an install under a home directory must stay readable to the service
        "PROTECT_HOME": "read-only" if in_home else "yes",
        "NET_BIND": "CAP_NET_BIND_SERVICE" if config.dicom.port < 1024 else "",
        "PRIVATE_DEVICES": "no" if gpu else "yes",
        "GPU_GROUPS": "SupplementaryGroups=video render" if gpu else "# no GPU device groups on this profile",
    }


def step_units(inst: Installer, config: Any, profile: Any, opts: Options, config_path: Path, data_dir: Path
               ) -> tuple[Step, list[str]]:
    values = unit_values(config, profile, opts.service_user, config_path, data_dir)
    services = [s for s in SERVICES if s != "sync" or config.sync.enabled]
    units = [f"edgescreen-{s}.service" for s in services]
    changed = False
    for s in SERVICES:
        name = f"edgescreen-{s}.service"
        if name in units:
            changed |= inst.file(UNIT_DIR / name, render_unit(name, values).encode(), 0o644)
            changed |= inst.symlink(UNIT_DIR / f"{TARGET}.wants" / name, str(UNIT_DIR / name))
        else:  # a service this site does not run (sync without a cloud) is not installed
            changed |= inst.remove(UNIT_DIR / name)
            changed |= inst.remove(UNIT_DIR / f"{TARGET}.wants" / name)
    changed |= inst.file(UNIT_DIR / TARGET, render_unit(TARGET, {**values, "SERVICES": " ".join(units)}).encode(), 0o644)
    changed |= inst.symlink(UNIT_DIR / "multi-user.target.wants" / TARGET, str(UNIT_DIR / TARGET))
    return Step("systemd units", changed, f"{', '.join(units)} and {TARGET} in {UNIT_DIR}, ExecStart "
                f"{values['EXEC']}"), [*units, TARGET]


# ------------------------------------------------------------------------------------------ bundles


def _bundle_candidates(paths: list[Path]) -> list[Path]:
    found = []
    for p in paths:
        p = Path(p)
        if (p / "manifest.json").is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(d for d in p.iterdir() if (d / "manifest.json").is_file())
    return found


def step_bundle(inst: Installer, opts: Options, profile: Any, profile_ref: str, config_path: Path, data_dir: Path,
                say: Callable[[str], None]) -> Step:
    """The active bundle: kept when it verifies and fits; else a matching prebuilt one; else built here."""
    from edgescreen.appliance.bundle import (
        BundleError,
        current_bundle,
        install_bundle,
        load_trusted_keys,
        verify_bundle,
    )
    from edgescreen.appliance.bundle_match import mismatches

    home = inst.path(config_path.parent)
    staged_data = inst.path(data_dir)
    keys = load_trusted_keys(home)
    current = current_bundle(staged_data)
    if current is not None:
        try:
            manifest = verify_bundle(current, keys)
            problems = mismatches(manifest, profile.name)
            if not problems:
                return Step("model bundle", False, f"{manifest.bundle_id} active, verified, fits this box")
            say(f"the active bundle {manifest.bundle_id} does not fit: {'; '.join(problems)}")
        except BundleError as exc:
            say(f"the active bundle does not verify: {exc}")
    rejected = []
    for candidate in _bundle_candidates(opts.bundle):
        try:
            manifest = verify_bundle(candidate, keys)
        except BundleError as exc:
            rejected.append(f"{candidate}: {exc}")
            continue
        problems = mismatches(manifest, profile.name)
        if problems:
            rejected.append(f"{candidate}: {'; '.join(problems)}")
            continue
        dest = install_bundle(candidate, staged_data, trusted_keys=keys)
        return Step("model bundle", True, f"installed prebuilt bundle {manifest.bundle_id} ({dest})")
    for reason in rejected:
        say(f"prebuilt bundle not used: {reason}")
    say(f"no prebuilt bundle fits this box: optimising the models for {profile.name} here (this takes minutes)")
    try:
        built = build_bundle(inst, profile_ref, config_path, data_dir, opts.optimize_args, say)
    except NoCalibrationImages:
        # a field box has no mammography images to calibrate with: optimise the CT models, and the mammography
        # model runs as the FP32 reference (the worker falls back to it per role)
        from edgescreen.appliance.selftest import PIPELINE_ROLES

        say("no mammography calibration images on this box (mini-MIAS): optimising the CT models only; "
            "mammography runs on the FP32 reference model (--optimize-arg=--calibration=DIR gives it images)")
        built = build_bundle(inst, profile_ref, config_path, data_dir,
                             [*opts.optimize_args, f"--roles={','.join(PIPELINE_ROLES['pancreas'])}"], say)
    dest = install_bundle(built, staged_data, trusted_keys=keys)
    shutil.rmtree(built.parent, ignore_errors=True)
    return Step("model bundle", True, f"optimised on this box and installed {dest.name}")


class Progress:
    """A progress bar for the optimiser: one model at a time, from its log lines (selected / no candidate)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.total = 0
        self.done = 0
        self.started = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last = ""

    def feed(self, line: str) -> None:
        before = (self.total, self.done, self.last)
        if line.startswith("optimising ") and " model(s)" in line:
            with contextlib.suppress(ValueError):
                self.total = int(line.split()[1])
        elif "msg=selected" in line or "no candidate" in line or "msg=\"no candidate" in line:
            self.done += 1
        elif "golden case" in line:
            self.last = "recording the self-test's expected findings"
        elif "msg=gate" in line and "candidate=" in line:
            self.last = "gate " + line.split("role=")[-1].split()[0] + " " + line.split("candidate=")[-1].split()[0]
        if (self.total, self.done, self.last) != before or self.tty:
            self.show()

    def show(self) -> None:
        elapsed = int(time.monotonic() - self.started)
        width = 24
        filled = int(width * self.done / self.total) if self.total else 0
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total or '?'} models " \
              f"{elapsed // 60}:{elapsed % 60:02d} {self.last}"[:110]
        if self.tty:
            self.stream.write("\r" + bar.ljust(110))
        else:
            self.stream.write(bar + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _die_with_parent() -> None:
    """In the optimiser's process: get SIGTERM when provisioning dies (Ctrl-C, a killed shell), never run on alone."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def build_bundle(inst: Installer, profile_ref: str, config_path: Path, data_dir: Path, extra: list[str],
                 say: Callable[[str], None]) -> Path:
    """Run `edgescreen optimize` for the profile (as a child process: the appliance never imports the
    optimiser), signed with this box's key, with a progress bar; return the bundle directory."""
    cache = inst.path(CACHE_DIR)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(cache) / f"build-{time.strftime('%Y%m%dT%H%M%S')}"
    work.mkdir()
    out = work / "bundle"
    cmd = [sys.executable, "-m", "edgescreen.appliance.cli", "--config", str(inst.path(config_path)), "--data-dir",
           str(inst.path(data_dir)), "optimize", "--profile", profile_ref, "--out", str(out), "--cache", str(cache / "optimize"), *extra]
    # the optimiser runs as root: its telemetry consent file is root's, in the root being provisioned
    env = {**os.environ, "HOME": str(inst.path(Path("/root"))), "PYTHONUNBUFFERED": "1"}
    progress = Progress()
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          preexec_fn=_die_with_parent) as proc:
        for line in proc.stdout or ():  # PIPE: always a stream
            lines.append(line.rstrip())
            progress.feed(line.strip())
        code = proc.wait()
    progress.close()
    if code != 0 and any("mini-MIAS not found" in line for line in lines) and \
            not any(a.startswith(("--roles", "--calibration")) for a in extra):
        shutil.rmtree(work, ignore_errors=True)
        raise NoCalibrationImages("no mammography calibration images")
    if code != 0 or not (out / "manifest.json").is_file():
        tail = "\n".join(lines[-15:])
        raise ProvisionError(f"the optimiser failed (exit {code}); its last lines:\n{tail}\nfix what it says, or "
                             "provision with --bundle DIR (a prebuilt bundle for this profile)")
    say(f"optimised in {time.monotonic() - progress.started:.0f} s")
    return out


# -------------------------------------------------------------------------------------- first admin


def step_first_admin(inst: Installer, data_dir: Path) -> tuple[Step, str | None]:
    """The web UI's first admin with a one-time password, printed once (never stored in clear)."""
    import sqlite3

    db = inst.path(data_dir) / "edgescreen.db"
    if db.is_file():  # look without opening a writer, so a second run leaves the database file untouched
        # no -wal file: nothing is uncommitted to the main file, which can be read as immutable (no -shm made)
        wal_path = db.with_name(db.name + "-wal")
        wal = wal_path.exists() and wal_path.stat().st_size > 0
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro{'' if wal else '&immutable=1'}", uri=True)) as conn:
            try:
                from edgescreen.appliance.store.migrations import MIGRATIONS

                version = conn.execute("PRAGMA user_version").fetchone()[0]
                users = conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]
            except sqlite3.Error:
                version, users = -1, 0
        if users and version == len(MIGRATIONS):
            return Step("first admin", False, "users exist already; manage them with `edgescreen users`"), None
    from edgescreen.appliance.accounts import ensure_first_admin
    from edgescreen.appliance.store import Store

    store = Store(inst.path(data_dir))
    try:
        password = ensure_first_admin(store)
    finally:
        store.close()
    if password is None:
        return Step("first admin", True, "database migrated; users exist already"), None
    return Step("first admin", True, "created user admin with a one-time password (below; change at first login)"), \
        password


# ---------------------------------------------------------------------------------------------- run


def staged_context(inst: Installer, config_path: Path, data_dir: Path, profile_override: str | None = None) -> Any:
    """An AppContext for the installed appliance, whether live or in a staging root."""
    from edgescreen.appliance.config.load import load_site_config
    from edgescreen.appliance.context import AppContext

    path = inst.path(config_path)
    return AppContext(config=load_site_config(path), data_dir=inst.path(data_dir), config_path=path,
                      _profile_override=profile_override)


def provision(opts: Options, *, say: Callable[[str], None] = print) -> Outcome:
    from edgescreen.appliance.config.load import ConfigError, load_profile

    if os.geteuid() != 0:
        raise ProvisionError("provisioning creates a system user, root-owned keys and systemd units: run it as root "
                             "(sudo edgescreen provision ...)")
    try:
        profile = load_profile(opts.profile)
    except ConfigError as exc:
        raise ProvisionError(str(exc)) from None
    machine = platform.machine()
    inst = Installer(opts.root, opts.service_user)
    if profile.arch != machine and inst.live:
        raise ProvisionError(f"profile {profile.name} is for {profile.arch}, this box is {machine}; choose the "
                             "profile of this hardware (edgescreen config lists them)")
    config_path, data_dir = SYSTEM_CONFIG, SYSTEM_DATA_DIR
    config_dir = config_path.parent
    profile_ref = opts.profile if Path(opts.profile).suffix == ".toml" else profile.name
    out = Outcome()

    def record(step: Step | None) -> None:
        if step is not None:
            out.steps.append(step)
            say(f"{'changed' if step.changed else 'ok':>8}  {step.name}: {step.detail}")

    record(step_service_user(inst, opts, data_dir))
    record(step_directories(inst, config_dir, data_dir))
    step, config = step_site_config(inst, opts, profile_ref, config_dir, data_dir)
    record(step)
    record(step_cloud_token(inst, opts, config_dir))
    record(step_keys(inst, opts, config_dir, data_dir))
    record(step_telemetry(inst, data_dir))
    record(step_bundle(inst, opts, profile, profile_ref, config_path, data_dir, say))
    step, out.admin_password = step_first_admin(inst, data_dir)
    record(step)
    owned = inst.chown_tree(data_dir)
    if owned:
        record(Step("ownership", True, f"{owned} entries under {data_dir} given to {opts.service_user}"))
    step, units = step_units(inst, config, profile, opts, config_path, data_dir)
    record(step)
    if inst.live:
        check_service_can_run(opts.service_user)
    from edgescreen.appliance.selftest import last_run

    last = None if opts.skip_selftest else last_run(inst.path(data_dir))
    # run when anything changed, when asked, and whenever the last run did not pass (a box is not done until it does)
    due = out.changed or opts.force_selftest or last is None or not last.get("passed")
    if not opts.skip_selftest and due:
        from edgescreen.appliance.selftest import record as record_selftest
        from edgescreen.appliance.selftest import run_selftest

        say("self-test: golden phantom cases through DICOM, the worker and the outputs (about a minute or two)")
        ctx = staged_context(inst, config_path, data_dir)
        out.selftest = run_selftest(ctx, progress=lambda m: say(f"          {m}"))
        record_selftest(ctx.data_dir, out.selftest)
        inst.chown_tree(data_dir)
    elif last is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last["finished_at"]))
        say(f"      ok  self-test: nothing changed, not repeated (passed {when} with bundle {last.get('bundle_id')}; "
            "`edgescreen selftest` runs it again)")
    if inst.live and not opts.no_start:
        start_services(units, restart=out.changed, say=say)
    return out


def check_service_can_run(user: str) -> None:
    """The units start this install as the service user: an install it cannot read (a Python under /root, a
    checkout in a private home) would fail at every start with status 203/EXEC; say so now instead."""
    exe = _executable()
    proc = subprocess.run(["runuser", "-u", user, "--", *exe, "--version"], capture_output=True, text=True,
                          timeout=120, cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    if proc.returncode != 0:
        raise ProvisionError(f"the service user {user} cannot run {' '.join(exe)} ({(proc.stderr or proc.stdout).strip()[:200]}): "
                             "install edgescreen where it can (e.g. /opt/edgescreen with a system Python), then "
                             "provision again")


def start_services(units: list[str], *, restart: bool, say: Callable[[str], None]) -> None:
    systemctl = shutil.which("systemctl")
    if systemctl is None or not Path("/run/systemd/system").is_dir():
        say("systemd is not running on this machine: start the services with `systemctl start edgescreen.target` "
            "once it boots under systemd")
        return
    for cmd in ([systemctl, "daemon-reload"], [systemctl, "enable", TARGET],
                [systemctl, "restart" if restart else "start", TARGET]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ProvisionError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}; see `journalctl -u 'edgescreen*'`")
    say(f"services started: {', '.join(units)}")
