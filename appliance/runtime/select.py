"""Which backend, device and precision to run a model with on this box.

Order of preference, and why:
1. The bundle manifest's entry for the model. The optimiser built and validated that artifact on this
   very box against the accuracy gates, so it is the only choice with evidence behind it.
2. The first candidate of the hardware profile that is available here. Used when a bundle names no
   backend (a reference bundle) or when its backend has gone missing (a driver update broke CUDA):
   the box keeps screening on the next best thing instead of stopping.
3. ONNX Runtime on the CPU at fp32: the reference runtime, present everywhere.

Every skipped choice is logged with its reason, so "why is this box slow" has an answer in the log.
The caller must still load an artifact that matches the returned backend (a TensorRT engine cannot
fall back to OpenVINO; the FP32 ONNX reference model can run anywhere).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from appliance.logs import get_logger
from appliance.runtime.base import PRECISIONS, BackendUnavailable, get_backend

log = get_logger(__name__)

FALLBACK: tuple[str, str, str] = ("onnxruntime", "CPU", "fp32")


def _as_dict(entry: Any) -> dict[str, Any]:
    """Accept plain dicts and the profile's pydantic Candidate objects alike."""
    if isinstance(entry, Mapping):
        return dict(entry)
    dump = getattr(entry, "model_dump", None)
    if callable(dump):
        return dump()
    raise TypeError(f"backend choice must be a mapping, got {type(entry).__name__}")


def _usable(entry: dict[str, Any]) -> tuple[tuple[str, str, str] | None, str]:
    """(backend, device, precision) if this entry can run here, else (None, why not)."""
    name = entry.get("backend")
    if not name:
        return None, "names no backend"
    device = str(entry.get("device") or "CPU")
    precision = str(entry.get("precision") or "fp32").lower()
    if precision not in PRECISIONS:
        return None, f"unknown precision {precision!r}"
    try:
        backend = get_backend(str(name))
        ok, why = backend.device_availability(device)
    except BackendUnavailable as exc:
        return None, str(exc)
    except Exception as exc:  # a vendor probe that crashes must not stop the worker
        return None, f"{name}: availability probe failed: {type(exc).__name__}: {exc}"
    if not ok:
        return None, why
    return (str(name), device, precision), why


def choose_backend(
    manifest_entry: Mapping[str, Any] | None, profile_candidates: list[Mapping[str, Any]] | list[Any]
) -> tuple[str, str, str]:
    """Pick (backend, device, precision): manifest first, then profile candidates, then ORT CPU fp32."""
    if manifest_entry:
        entry = _as_dict(manifest_entry)
        choice, why = _usable(entry)
        if choice:
            log.info("backend chosen from bundle manifest", backend=choice[0], device=choice[1], precision=choice[2])
            return choice
        log.warning("bundle manifest backend unavailable here; trying the hardware profile",
                    backend=entry.get("backend"), device=entry.get("device"), reason=why)
    for index, raw in enumerate(profile_candidates):
        entry = _as_dict(raw)
        choice, why = _usable(entry)
        if choice:
            log.info("backend chosen from hardware profile", candidate=index, backend=choice[0], device=choice[1],
                     precision=choice[2])
            return choice
        log.info("profile candidate skipped", candidate=index, backend=entry.get("backend"),
                 device=entry.get("device"), precision=entry.get("precision"), reason=why)
    log.warning("no manifest or profile backend usable; falling back to the reference runtime",
                backend=FALLBACK[0], device=FALLBACK[1], precision=FALLBACK[2])
    return FALLBACK
