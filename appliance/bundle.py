"""Signed model bundles on the appliance side: verify, install, roll back, list.

A bundle is what `edgescreen optimize` builds on the target box: a directory with the chosen artifacts,
their model cards, a report, ``manifest.json`` (what each artifact is, its sha256, and the accuracy and
speed figures that got it chosen) and ``manifest.sig`` (an Ed25519 signature over the exact bytes of
manifest.json). The appliance never imports the optimiser, so everything needed to *trust* and *use* a
bundle lives here and needs only ``cryptography`` and ``pydantic``.

Why a signature and not just checksums: the checksums live in the manifest, so anyone who can change an
artifact can change the manifest too. The signature ties the manifest to a key made at provisioning;
the appliance trusts the public key beside its own private key and any ``.pub`` a technician placed in
``<key home>/keys/trusted/`` (for example a fleet key, so bundles built on one box install on its twins).

Where the keys live (`key_home`): on a provisioned box ``/etc/edgescreen/keys/``, root-owned, outside the
data directory; the private key is 0600 root, read only by provisioning and the optimiser (run as root),
and the services verify with the public keys only. The data directory is writable by the network-facing
services, so a key kept there could be read, or a key of an attacker's planted beside it. On a
developer's machine (no provisioning) the key home is the data directory itself.

Install switches bundles atomically: ``<data_dir>/bundles/<id>/`` holds each bundle, ``current`` and
``previous`` are symlinks replaced with ``os.replace`` of a temporary symlink, so a reader (the worker)
sees either the old or the new bundle, never half of each, and ``rollback`` swaps them back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.modelcard import sha256_file
from edgescreen.appliance.store.files import atomic_write, fsync_dir

log = get_logger(__name__)

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SCHEMA_VERSION = 1
KEYS_DIR = "keys"
PRIVATE_KEY = "bundle_ed25519"
PUBLIC_KEY = "bundle_ed25519.pub"
TRUSTED_DIR = "trusted"
BUNDLES_DIR = "bundles"
CURRENT = "current"
PREVIOUS = "previous"
_BUNDLE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REBUILD_HINT = "rebuild it with edgescreen optimize or restore it"


class BundleError(RuntimeError):
    """A bundle that must not be used; the message names the bundle, the file and what to do."""


# --------------------------------------------------------------------------------------------- schema


class _Open(BaseModel):
    # Newer optimisers may add figures; an older appliance must still verify and use their bundles.
    model_config = ConfigDict(extra="allow")


class GateFigures(_Open):
    """The accuracy gate as measured on held-out cases; None where a figure does not apply to the model."""

    passed: bool
    dice_vs_fp32: float | None = None
    dice_vs_truth_drop: float | None = None
    auc_drop: float | None = None
    decision_agreement: float | None = None
    heldout_cases: int = 0
    reasons: list[str] = Field(default_factory=list)


class BundleModel(_Open):
    """One role's chosen artifact and the evidence for choosing it."""

    artifact: str = Field(description="path relative to the bundle; OpenVINO IR names the .xml")
    files: list[str] = Field(default_factory=list, description="the artifact and its companions (.bin)")
    backend: str
    device: str
    precision: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    card: str = Field(description="path of the model card copy, relative to the bundle")
    source: str | None = Field(default=None, description="the FP32 ONNX the card names (the gates' reference)")
    threads: int | None = None
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    baseline_latency_ms_p50: float | None = None
    speedup: float | None = None
    peak_rss_mb: float | None = None
    energy_j_per_inference: float | None = None
    energy_estimated: bool | None = None
    gate: GateFigures


class Signer(_Open):
    algorithm: Literal["ed25519"] = "ed25519"
    fingerprint: str


class Manifest(_Open):
    schema_version: Literal[1] = SCHEMA_VERSION
    bundle_id: str = Field(pattern=_BUNDLE_ID.pattern)
    profile: str
    created_at: str
    signer: Signer
    versions: dict[str, str] = Field(default_factory=dict)
    models: dict[str, BundleModel] = Field(min_length=1)
    files: dict[str, str] = Field(description="every file of the bundle but the manifest and its signature -> sha256")
    report: str | None = None

    def artifact_path(self, bundle_dir: Path | str, role: str) -> Path:
        return Path(bundle_dir) / self.model(role).artifact

    def card_path(self, bundle_dir: Path | str, role: str) -> Path:
        """The card copy. Load it with ``load_card(path, verify_file=False)``: the card names the FP32
        ONNX it was trained as, while the bundle holds the optimised artifact (checked here instead)."""
        return Path(bundle_dir) / self.model(role).card

    def model(self, role: str) -> BundleModel:
        if role not in self.models:
            raise BundleError(f"bundle {self.bundle_id} has no model for {role}; it has {sorted(self.models)}")
        return self.models[role]


# ----------------------------------------------------------------------------------------------- keys


def key_home(config_path: Path | str | None, data_dir: Path | str) -> Path:
    """The directory whose ``keys/`` holds this box's bundle keys: the site config's directory on a
    provisioned box (the system config, or any config with ``keys/`` beside it, as provisioning writes
    into a staging root), else the data directory (a developer's machine)."""
    if config_path is not None:
        config_dir = Path(config_path).resolve().parent
        from edgescreen.appliance.config.load import SYSTEM_CONFIG

        if (config_dir / KEYS_DIR).is_dir() or config_dir == SYSTEM_CONFIG.parent:
            return config_dir
    return Path(data_dir)


def key_paths(home: Path | str) -> tuple[Path, Path, Path]:
    """(private key, public key beside it, trusted-keys directory) under a key home (see `key_home`)."""
    keys = Path(home) / KEYS_DIR
    return keys / PRIVATE_KEY, keys / PUBLIC_KEY, keys / TRUSTED_DIR


def fingerprint(public_key: Any) -> str:
    """``sha256:<hex>`` of the raw 32-byte Ed25519 public key: short enough to read out on the phone."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def load_public_key(path: Path) -> Any:
    """A PEM (``BEGIN PUBLIC KEY``) or OpenSSH (``ssh-ed25519 AAAA...``) Ed25519 public key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key, load_ssh_public_key

    data = Path(path).read_bytes()
    try:
        key = load_ssh_public_key(data) if data.lstrip().startswith(b"ssh-") else load_pem_public_key(data)
    except ValueError as exc:
        raise BundleError(f"{path}: not a PEM or OpenSSH public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: {type(key).__name__} is not an Ed25519 key; bundles are signed with Ed25519")
    return key


def load_private_key(path: Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise BundleError(f"{path}: signing key not found; create it with ensure_signing_key (provisioning)") from None
    except PermissionError:
        raise BundleError(f"{path}: permission denied; the signing key is root's: run the optimiser as root "
                          "(sudo edgescreen optimize ...)") from None
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: {type(key).__name__} is not an Ed25519 key")
    return key


def ensure_signing_key(home: Path | str) -> Path:
    """Create this box's bundle signing key under ``home`` (see `key_home`) if it has none; return its path.

    The private key is written 0600 (created with O_EXCL so two provisioning runs cannot both write one)
    in a directory the services may list but not write; the public key beside it, 0644, is what the
    appliance trusts by default and all the services need.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    private, public, trusted = key_paths(home)
    private.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    trusted.mkdir(exist_ok=True, mode=0o755)
    if not private.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        try:
            fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it between our check and open; use theirs
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            log.info("bundle signing key created", path=str(private))
    if not public.exists():
        pub = load_private_key(private).public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        atomic_write(public, pub, mode=0o644)
    return private


def load_trusted_keys(home: Path | str) -> list[Any]:
    """The keys this appliance accepts: its own (beside its private key) and ``keys/trusted/*.pub``.

    An unreadable or malformed trusted key is logged and skipped rather than fatal: one bad file
    dropped by a technician must not stop the box from verifying bundles signed by the others.
    """
    _, public, trusted = key_paths(home)
    paths = ([public] if public.is_file() else []) + sorted(trusted.glob("*.pub"))
    keys: list[Any] = []
    seen: set[str] = set()
    for path in paths:
        try:
            key = load_public_key(path)
        except (BundleError, OSError) as exc:
            log.warning("trusted key skipped", path=str(path), error=str(exc))
            continue
        if fingerprint(key) not in seen:
            seen.add(fingerprint(key))
            keys.append(key)
    return keys


def sign_bytes(private_key_path: Path, data: bytes) -> dict[str, str]:
    """The content of manifest.sig for ``data``: algorithm, signer fingerprint, base64 signature."""
    key = load_private_key(private_key_path)
    return {
        "algorithm": "ed25519",
        "key_fingerprint": fingerprint(key.public_key()),
        "signature": base64.b64encode(key.sign(data)).decode("ascii"),
    }


# -------------------------------------------------------------------------------------------- verify


def _safe_relpath(bundle: Path, rel: str) -> Path:
    """Resolve a manifest path inside the bundle; absolute paths and ``..`` are refused (a signed
    manifest is trusted, but a verifier that follows ``../../etc/shadow`` is a bug waiting)."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise BundleError(f"bundle {bundle}: {rel}: path escapes the bundle; {REBUILD_HINT}")
    path = bundle / pure
    if path.is_symlink():
        raise BundleError(f"bundle {bundle}: {rel}: is a symlink; bundles hold plain files only; {REBUILD_HINT}")
    return path


def _read_signature(bundle: Path) -> tuple[str, bytes]:
    sig_path = bundle / SIGNATURE
    try:
        raw = json.loads(sig_path.read_text())
        fp, signature = str(raw["key_fingerprint"]), base64.b64decode(raw["signature"], validate=True)
        if raw.get("algorithm", "ed25519") != "ed25519":
            raise ValueError(f"algorithm {raw.get('algorithm')!r} is not ed25519")
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle}: {SIGNATURE}: missing; the bundle is unsigned; {REBUILD_HINT}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"bundle {bundle}: {SIGNATURE}: unreadable ({exc}); {REBUILD_HINT}") from None
    return fp, signature


def verify_bundle(bundle_dir: Path | str, trusted_keys: Iterable[Any] | Path | str) -> Manifest:
    """Check a bundle completely and return its manifest, or raise BundleError naming the bad file.

    Order matters: the signature is checked over the raw manifest bytes *before* the manifest is
    parsed, so nothing an attacker wrote is interpreted until it is known to be signed by a trusted key.
    ``trusted_keys`` is a list of Ed25519 public keys, or a key home (see `key_home`) to load them from.
    """
    from cryptography.exceptions import InvalidSignature

    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle}: not a directory")
    keys = load_trusted_keys(trusted_keys) if isinstance(trusted_keys, (str, Path)) else list(trusted_keys)
    manifest_path = bundle / MANIFEST
    try:
        data = manifest_path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle}: {MANIFEST}: missing; {REBUILD_HINT}") from None
    fp, signature = _read_signature(bundle)
    by_fp = {fingerprint(k): k for k in keys}
    if fp not in by_fp:
        known = ", ".join(sorted(f[:23] for f in by_fp)) or "none"
        raise BundleError(
            f"bundle {bundle}: {SIGNATURE}: signed by key {fp[:23]}... which this appliance does not trust "
            f"(trusted: {known}); if you trust the box that built it, copy its public key to "
            f"<data_dir>/{KEYS_DIR}/{TRUSTED_DIR}/"
        )
    try:
        by_fp[fp].verify(signature, data)
    except InvalidSignature:
        raise BundleError(
            f"bundle {bundle}: {MANIFEST}: signature does not match; the manifest was modified after signing — "
            f"{REBUILD_HINT}"
        ) from None
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"bundle {bundle}: {MANIFEST}: {where}: {first['msg']} (schema {SCHEMA_VERSION})") from None
    if manifest.signer.fingerprint != fp:
        raise BundleError(f"bundle {bundle}: {MANIFEST}: names signer {manifest.signer.fingerprint[:23]}... but "
                          f"{SIGNATURE} is by {fp[:23]}...; {REBUILD_HINT}")
    for rel, digest in manifest.files.items():
        path = _safe_relpath(bundle, rel)
        if not path.is_file():
            raise BundleError(f"bundle {bundle}: {rel}: missing; the bundle is incomplete — {REBUILD_HINT}")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle {bundle}: {rel}: sha256 mismatch; the bundle was modified after signing — "
                              f"{REBUILD_HINT}")
    for role, entry in manifest.models.items():
        for rel in {entry.artifact, entry.card, *entry.files, *([entry.source] if entry.source else [])}:
            if rel not in manifest.files:
                raise BundleError(f"bundle {bundle}: {MANIFEST}: models.{role} names {rel}, which the manifest's "
                                  f"file list does not cover; {REBUILD_HINT}")
        if manifest.files[entry.artifact] != entry.sha256:
            raise BundleError(f"bundle {bundle}: {MANIFEST}: models.{role}.sha256 differs from the file list's "
                              f"{entry.artifact}; {REBUILD_HINT}")
    return manifest


# ------------------------------------------------------------------------------------ install, rollback


def _point(root: Path, name: str, target: str) -> None:
    """Make ``root/name`` a symlink to ``target`` (relative) atomically: a temp symlink, then os.replace."""
    tmp = root / f".{name}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, root / name)
    fsync_dir(root)


def _link_target(root: Path, name: str) -> str | None:
    link = root / name
    return os.readlink(link) if link.is_symlink() else None


def current_bundle(data_dir: Path | str) -> Path | None:
    """The installed bundle the worker should use, or None if none is installed."""
    root = Path(data_dir) / BUNDLES_DIR
    target = _link_target(root, CURRENT)
    return root / target if target else None


# Signed files written after the manifest (their own signature beside them), copied with the bundle.
EXPECTED_FINDINGS = "selftest/expected.json"
EXPECTED_SIGNATURE = "selftest/expected.sig"


def _copy_bundle(src: Path, manifest: Manifest, dest: Path) -> None:
    """Copy exactly the signed files (nothing a stray editor left behind), each fsynced."""
    extra = [rel for rel in (EXPECTED_FINDINGS, EXPECTED_SIGNATURE) if (src / rel).is_file()]
    for rel in [*manifest.files, MANIFEST, SIGNATURE, *extra]:
        target = dest / PurePosixPath(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / PurePosixPath(rel), target)
        with open(target, "rb+") as fh:
            os.fsync(fh.fileno())
    for directory in sorted({p.parent for p in dest.rglob("*")}, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(directory)


def install_bundle(src: Path | str, data_dir: Path | str, *, trusted_keys: Iterable[Any] | None = None,
                   keep: int = 3, key_home: Path | str | None = None) -> Path:
    """Verify ``src``, copy it to ``<data_dir>/bundles/<id>/`` and make it current; return its path.

    The copy is verified again after copying (a full disk or a bad block shows here, not at the
    first study), then renamed into place, then ``current`` is switched; the bundle it replaces
    becomes ``previous`` for `rollback`. Older bundles beyond ``keep`` are removed.
    """
    data_dir = Path(data_dir)
    keys = list(trusted_keys) if trusted_keys is not None else load_trusted_keys(key_home or data_dir)
    manifest = verify_bundle(src, keys)
    root = data_dir / BUNDLES_DIR
    root.mkdir(parents=True, exist_ok=True)
    dest = root / manifest.bundle_id
    if dest.exists():
        verify_bundle(dest, keys)  # the same id installed before: reuse it only if it is intact
        log.info("bundle already installed; switching to it", bundle=manifest.bundle_id)
    else:
        incoming = root / f".incoming-{manifest.bundle_id}-{os.getpid()}"
        if incoming.exists():
            shutil.rmtree(incoming)
        try:
            _copy_bundle(Path(src), manifest, incoming)
            verify_bundle(incoming, keys)
            os.rename(incoming, dest)
            fsync_dir(root)
        finally:
            if incoming.exists():
                shutil.rmtree(incoming, ignore_errors=True)
    old = _link_target(root, CURRENT)
    if old and old != manifest.bundle_id:
        _point(root, PREVIOUS, old)
    _point(root, CURRENT, manifest.bundle_id)
    log.info("bundle installed", bundle=manifest.bundle_id, profile=manifest.profile, previous=old)
    _prune(root, keep)
    return dest


def rollback(data_dir: Path | str, *, trusted_keys: Iterable[Any] | None = None,
             key_home: Path | str | None = None) -> Manifest:
    """Make the previous bundle current again (and the current one previous); return its manifest.

    The previous bundle is verified first: rolling back onto a damaged bundle would trade a
    suspected problem for a certain one.
    """
    root = Path(data_dir) / BUNDLES_DIR
    cur, prev = _link_target(root, CURRENT), _link_target(root, PREVIOUS)
    if prev is None or not (root / prev).is_dir():
        raise BundleError(f"{root}: no previous bundle to roll back to (current: {cur or 'none'})")
    keys = list(trusted_keys) if trusted_keys is not None else load_trusted_keys(key_home or data_dir)
    manifest = verify_bundle(root / prev, keys)
    if cur:
        _point(root, PREVIOUS, cur)
    _point(root, CURRENT, prev)
    log.info("bundle rolled back", bundle=prev, replaced=cur)
    return manifest


@dataclass(frozen=True)
class InstalledBundle:
    bundle_id: str
    path: Path
    profile: str | None
    created_at: str | None
    current: bool
    previous: bool
    roles: tuple[str, ...]
    problem: str | None = None


def list_bundles(data_dir: Path | str, *, verify: bool = True,
                 key_home: Path | str | None = None) -> list[InstalledBundle]:
    """Installed bundles, newest first; with ``verify`` each carries the reason it would be refused."""
    root = Path(data_dir) / BUNDLES_DIR
    if not root.is_dir():
        return []
    cur, prev = _link_target(root, CURRENT), _link_target(root, PREVIOUS)
    keys = load_trusted_keys(key_home or data_dir) if verify else []
    found: list[InstalledBundle] = []
    for path in root.iterdir():
        if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
            continue
        problem = None
        try:
            if verify:
                manifest = verify_bundle(path, keys)
            else:
                manifest = Manifest.model_validate_json((path / MANIFEST).read_bytes())
            profile, created, roles = manifest.profile, manifest.created_at, tuple(sorted(manifest.models))
        except (BundleError, OSError, ValidationError) as exc:
            problem, profile, created, roles = str(exc), None, None, ()
        found.append(InstalledBundle(path.name, path, profile, created, path.name == cur, path.name == prev, roles, problem))
    return sorted(found, key=lambda b: (b.created_at or "", b.bundle_id), reverse=True)


def _prune(root: Path, keep: int) -> None:
    """Remove the oldest bundles beyond ``keep``; never the current or the previous one."""
    protected = {_link_target(root, CURRENT), _link_target(root, PREVIOUS)}
    bundles = sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for path in bundles[max(keep, 2):]:
        if path.name not in protected:
            shutil.rmtree(path, ignore_errors=True)
            log.info("old bundle removed", bundle=path.name)
