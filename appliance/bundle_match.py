"""Whether a signed bundle was built for this box: its profile, the CPU architecture, the runtime libraries.

An optimised artifact is tied to what built it: a TensorRT engine runs only on the TensorRT version (and
GPU) that built it; an OpenVINO IR or an ONNX file runs on later patch releases of its runtime. Provisioning
uses this to take a prebuilt bundle only where it fits, and to run the optimiser on the box otherwise;
`edgescreen doctor` uses it to say when a library upgrade left the installed bundle behind.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

# the backend a manifest names -> the distributions whose version must match, and how closely
RUNTIME_DISTS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "openvino": ("openvino",), "tensorrt": ("tensorrt",)}
EXACT = {"tensorrt"}  # engines are refused by any other TensorRT version


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def mismatches(manifest: Any, profile_name: str, *, machine: str | None = None) -> list[str]:
    """Why the bundle does not fit this box (empty when it does). ``manifest`` is appliance.bundle.Manifest."""
    problems = []
    if manifest.profile != profile_name:
        problems.append(f"built for profile {manifest.profile}, this box uses {profile_name}")
    host = (getattr(manifest, "host", None) or (manifest.model_extra or {}).get("host") or {})
    built_on = host.get("machine") if isinstance(host, dict) else None
    here = machine or platform.machine()
    if built_on and built_on != here:
        problems.append(f"built on {built_on}, this box is {here}")
    versions = manifest.versions or {}
    backends = {m.backend for m in manifest.models.values()}
    for backend in sorted(backends):
        for dist in RUNTIME_DISTS.get(backend, ()):
            built = versions.get(dist)
            if built is None:
                continue
            now = installed_version(dist)
            if now is None:
                problems.append(f"{dist} {built} built it, and {dist} is not installed here")
            elif (now != built) if backend in EXACT else (_major_minor(now) != _major_minor(built)):
                problems.append(f"{dist} {built} built it, {now} is installed")
    return problems
