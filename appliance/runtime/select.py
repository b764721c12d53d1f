"""Which backend runs a model on this box, decided by loading it: the bundle's artifact, the profile's order, ORT.

Order of preference, and why:
1. The bundle's artifact for the model, on the backend, device and precision the manifest names. The
   optimiser built and gated that artifact on this very box, so it is the only choice with evidence.
2. The hardware profile's candidates, in order, each running the *reference* FP32 ONNX model where the
   backend can (OpenVINO compiles ONNX at fp32, or at fp16/bf16 through its precision hint; ONNX
   Runtime runs it at fp32, or fp16 through its TensorRT provider). An INT8 candidate or a TensorRT
   engine needs an artifact the optimiser built, which only the bundle holds, so those are refused
   with that reason. This is what keeps a box screening when its bundle's backend broke on the day
   (a driver update broke CUDA, a corrupt IR, a missing plugin).
3. ONNX Runtime on the CPU at fp32 with the reference model: present everywhere, the reference the
   accuracy gates were measured against.

"Can it run" is answered by loading, not only by an availability probe: a TensorRT engine built for
another GPU, an IR whose weights are truncated or a CUDA provider that silently fell back all pass a
probe and fail a load. Every refusal is logged with its reason and returned in `LoadedModel.refusals`,
so the caller can put it in the findings and the worker can record it where the system page shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.runtime.base import PRECISIONS, BackendUnavailable, Session, get_backend

log = get_logger(__name__)

FALLBACK: tuple[str, str, str] = ("onnxruntime", "CPU", "fp32")


class NoBackend(BackendUnavailable):
    """Nothing could run the model: the bundle's artifact, every profile candidate and the reference failed."""

    def __init__(self, role: str, refusals: Sequence[Refusal]) -> None:
        self.refusals = tuple(refusals)
        super().__init__(f"{role}: no backend could load the model; " + "; ".join(r.describe() for r in refusals))


@dataclass(frozen=True)
class Choice:
    """One way to run a model: where the choice came from, and what to load with what."""

    source: str  # "bundle" | "profile" | "reference" | "requested"
    backend: str
    device: str
    precision: str
    artifact: Path

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.device}/{self.precision}"


@dataclass(frozen=True)
class Refusal:
    """A choice that was tried (or could not be) and why it was refused."""

    source: str
    backend: str
    device: str
    precision: str
    artifact: str
    reason: str

    def describe(self) -> str:
        return f"{self.source} {self.backend}/{self.device}/{self.precision} ({self.artifact}): {self.reason}"

    def to_json(self) -> dict[str, str]:
        return {"source": self.source, "backend": self.backend, "device": self.device, "precision": self.precision,
                "artifact": self.artifact, "reason": self.reason}


@dataclass
class LoadedModel:
    """A loaded session with the choice that produced it and every choice refused before it."""

    session: Session
    choice: Choice
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def fell_back(self) -> bool:
        """True when the model does not run as the bundle (or the caller) asked."""
        return self.choice.source in ("profile", "reference") and bool(self.refusals)


def _as_dict(entry: Any) -> dict[str, Any]:
    """Accept plain dicts and pydantic objects (the profile's Candidate, the manifest's BundleModel)."""
    if isinstance(entry, Mapping):
        return dict(entry)
    dump = getattr(entry, "model_dump", None)
    if callable(dump):
        return dump()
    raise TypeError(f"backend choice must be a mapping, got {type(entry).__name__}")


def _refuse(choice: Choice, reason: str, role: str) -> Refusal:
    refusal = Refusal(choice.source, choice.backend, choice.device, choice.precision, choice.artifact.name, reason)
    log.warning("backend refused", role=role, source=choice.source, backend=choice.backend, device=choice.device,
                precision=choice.precision, artifact=choice.artifact.name, reason=reason)
    return refusal


def _reference_refusal(choice: Choice) -> str | None:
    """Why a profile candidate cannot run the reference ONNX model, or None when it can."""
    if choice.precision not in PRECISIONS:
        return f"unknown precision {choice.precision!r}"
    try:
        ok, why = get_backend(choice.backend).runs_reference(choice.device, choice.precision)
    except Exception as exc:  # an unknown backend name, a plugin that fails to import
        return str(exc)
    return None if ok else why


def candidate_choices(profile_candidates: Sequence[Any], reference: Path) -> list[Choice]:
    """The profile's candidates as choices that run the reference model, in the profile's order."""
    out = []
    for raw in profile_candidates:
        entry = _as_dict(raw)
        out.append(Choice("profile", str(entry.get("backend") or ""), str(entry.get("device") or "CPU"),
                          str(entry.get("precision") or "fp32").lower(), reference))
    return out


def load_model(role: str, *, reference: Path, first: Choice | None = None, profile_candidates: Sequence[Any] = (),
               threads: int | None = None,
               loader: Callable[[Choice, int | None], Session] | None = None) -> LoadedModel:
    """Load `role`'s model: `first` (the bundle's artifact, or the backend the caller asked for), then the
    profile's candidates on the reference model, then ONNX Runtime CPU fp32 on the reference model.

    Raises `NoBackend` (listing every refusal) when nothing loads, FileNotFoundError when the reference
    model itself is missing (a broken install, not a backend problem).
    """
    load = loader or _load
    refusals: list[Refusal] = []
    tried: set[tuple[str, str, str, Path]] = set()
    plan: list[Choice] = [first] if first is not None else []
    plan += candidate_choices(profile_candidates, reference) if first is not None and first.source == "bundle" else []
    plan.append(Choice("reference", *FALLBACK, reference))
    for choice in plan:
        key = (choice.backend, choice.device, choice.precision, choice.artifact)
        if key in tried:
            continue
        tried.add(key)
        if choice.source == "profile":
            why = _reference_refusal(choice)
            if why is not None:
                refusals.append(_refuse(choice, why, role))
                continue
        try:
            session = load(choice, threads)
        except FileNotFoundError as exc:
            if choice.artifact == reference:
                raise
            refusals.append(_refuse(choice, f"artifact missing: {exc}", role))
            continue
        except Exception as exc:  # noqa: BLE001 - any load failure is a refusal; the next choice is tried
            refusals.append(_refuse(choice, f"{type(exc).__name__}: {exc}"[:400], role))
            continue
        if refusals:
            log.warning("model runs on a fallback backend", role=role, source=choice.source, backend=choice.backend,
                        device=choice.device, precision=choice.precision, refused=len(refusals))
        else:
            log.info("backend chosen", role=role, source=choice.source, backend=choice.backend, device=choice.device,
                     precision=choice.precision)
        return LoadedModel(session, choice, refusals)
    raise NoBackend(role, refusals)


def _load(choice: Choice, threads: int | None) -> Session:
    return get_backend(choice.backend).load(choice.artifact, device=choice.device, precision=choice.precision,
                                            threads=threads)


def profile_candidates(name: str | None) -> list[dict[str, str]]:
    """The named hardware profile's candidates (the bundle's `profile`), or [] when it cannot be read here:
    a missing profile must not stop a study, it only shortens the fallback list to the reference runtime."""
    if not name:
        return []
    try:
        from edgescreen.appliance.config import load_profile

        return [c.model_dump() for c in load_profile(name).candidates]
    except Exception as exc:  # noqa: BLE001 - a profile problem is logged, never fatal here
        log.warning("hardware profile unreadable; fallback goes straight to the reference runtime", profile=name,
                    error=str(exc)[:200])
        return []
