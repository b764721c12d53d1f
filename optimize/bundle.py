"""Assemble and sign a bundle: chosen artifacts + card copies + report + manifest.json + manifest.sig.

The appliance side (verify, install, rollback) is appliance.bundle; this module only *writes*. The
bundle is built in a temporary sibling directory and renamed into place, so a crash half way leaves
no directory that looks like a bundle. Artifacts are renamed to ``models/<role>.<ext>`` (an OpenVINO
IR keeps its .xml/.bin pair, which OpenVINO pairs by stem), cards are copied byte for byte (they
carry the FP32 model's identity; the manifest carries the optimised artifact's).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgescreen.appliance import __version__
from edgescreen.appliance.bundle import (
    MANIFEST,
    SIGNATURE,
    Manifest,
    fingerprint,
    load_private_key,
    sign_bytes,
)
from edgescreen.appliance.modelcard import sha256_file


def library_versions() -> dict[str, str]:
    """The versions that produced (and must run) the artifacts: an engine or IR is tied to them."""
    versions = {"edgescreen": __version__, "python": platform.python_version()}
    for dist in ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "tensorrt", "cryptography"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _bundle_id(profile: str, digests: list[str], created: float) -> str:
    content = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:10]
    return f"{profile}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(created))}-{content}"


def _prepare_out(out: Path) -> Path:
    """Refuse to overwrite a directory that is not a bundle; return the temporary build directory."""
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise FileExistsError(f"{out} exists and is not a bundle; refusing to overwrite it (choose another --out)")
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _copy(src: Path, tmp: Path, rel: str) -> str:
    dest = tmp / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return rel


def _add_model(tmp: Path, role: str, item: dict[str, Any]) -> dict[str, Any]:
    """Copy one role's card, its FP32 source and the chosen artifact; return its manifest entry.

    The FP32 ONNX travels too: the card copy then still verifies against its own sha256 (so
    ``load_card`` works on the bundle as on models/), and the box keeps the reference the gates were
    measured against, as a fallback should the optimised runtime break after an update.
    """
    card_rel = _copy(item["card_path"], tmp, f"models/{role}.json")
    source: Path = item["source"]
    card_file = Path(item["card_file"])
    if card_file.is_absolute() or ".." in card_file.parts:
        raise ValueError(f"{role}: the card's file {item['card_file']!r} must be a path relative to the card")
    source_rel = _copy(source, tmp, f"models/{card_file.as_posix()}")
    main: Path = item["artifact"]
    if main.resolve() == source.resolve():  # ONNX Runtime FP32 was chosen: the source is the artifact
        artifact_rel, files = source_rel, [source_rel]
    else:
        stem = f"models/{role}.{item['entry']['backend']}-{item['entry']['precision']}"
        files = [_copy(f, tmp, stem + f.suffix) for f in item["files"]]
        artifact_rel = stem + main.suffix
    return {"artifact": artifact_rel, "files": files, "card": card_rel, "source": source_rel,
            "sha256": sha256_file(tmp / artifact_rel), **item["entry"]}


def write_bundle(out: Path, *, profile: str, chosen: dict[str, dict[str, Any]], report: dict[str, Any],
                 render_md: Callable[[dict[str, Any]], str], key_path: Path) -> Manifest:
    """Write the bundle at ``out`` and return its (signed) manifest.

    ``chosen`` maps role -> {"artifact": Path, "files": [Path...], "card_path": Path, "card_file": the card's
    ``file``, "source": the FP32 ONNX, "entry": {...figures, backend, precision}}.
    """
    created = time.time()
    tmp = _prepare_out(out)
    try:
        models: dict[str, Any] = {}
        for role, item in chosen.items():
            models[role] = _add_model(tmp, role, item)
        files = {str(p.relative_to(tmp).as_posix()): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        bundle_id = _bundle_id(profile, list(files.values()), created)
        report = {**report, "bundle_id": bundle_id}
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_md(report))
        for name in ("report.json", "report.md"):
            files[name] = sha256_file(tmp / name)
        signer = fingerprint(load_private_key(key_path).public_key())
        manifest = {
            "schema_version": 1, "bundle_id": bundle_id, "profile": profile,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
            "signer": {"algorithm": "ed25519", "fingerprint": signer},
            "versions": library_versions(), "host": {"machine": platform.machine(), "python": sys.version.split()[0]},
            "models": models, "files": files, "report": "report.md",
        }
        validated = Manifest.model_validate(manifest)  # the appliance's own schema: fail here, not on the box
        data = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
        (tmp / MANIFEST).write_bytes(data)
        (tmp / SIGNATURE).write_text(json.dumps(sign_bytes(key_path, data), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return validated
