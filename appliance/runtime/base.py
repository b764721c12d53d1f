"""The backend interface and the registry of backend plugins.

One plugin module per vendor library (as Frigate has one detector plugin per accelerator). The
registry maps a backend name to a module path and imports the module only when the backend is asked
for; each plugin in turn imports its vendor library only inside its functions. A box without OpenVINO,
TensorRT or CUDA therefore imports everything here, and such a backend reports
``(False, "<why>")`` from ``availability()`` and raises :class:`BackendUnavailable` from ``load``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# name -> module holding a `BACKEND` object; imported only when asked for.
_PLUGINS: dict[str, str] = {
    "onnxruntime": "edgescreen.appliance.runtime.onnxruntime_backend",
    "openvino": "edgescreen.appliance.runtime.openvino_backend",
    "tensorrt": "edgescreen.appliance.runtime.tensorrt_backend",
}

# The precisions a bundle or hardware profile may name. "int8" means the artifact itself is
# quantised; the runtime then keeps the remaining float glue at fp32.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")


class BackendUnavailable(RuntimeError):
    """The backend's library or device is missing here; the message says which and why."""


Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Session:
    """A loaded model, ready to run. `run` maps input names to arrays and returns every output by name."""

    backend: str
    device: str
    precision: str
    artifact: Path
    input_names: list[str]
    output_names: list[str]
    _runner: Runner = field(repr=False)
    _closer: Callable[[], None] | None = field(default=None, repr=False)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise ValueError(f"{self.artifact.name}: missing inputs {sorted(missing)}; expects {self.input_names}")
        return self._runner(inputs)

    def close(self) -> None:
        """Free device memory now rather than at garbage collection (TensorRT holds GPU buffers)."""
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(ABC):
    name: str

    @abstractmethod
    def availability(self) -> tuple[bool, str]:
        """(True, devices) or (False, why not), without raising."""

    def device_availability(self, device: str) -> tuple[bool, str]:
        """Whether this backend can run on `device` here; plugins that know their devices override it.

        `load` checks it first, so a refusal says "openvino GPU: no GPU device (present: CPU)" rather
        than a vendor stack trace.
        """
        return self.availability()

    def runs_reference(self, device: str, precision: str) -> tuple[bool, str]:
        """Whether this backend can run the reference FP32 ONNX model at `precision` without an artifact the
        optimiser built (the run-time fallback's question, see appliance.runtime.select). By default only
        at fp32; plugins whose precision is a compile option (OpenVINO, ORT's TensorRT provider) say more."""
        if precision == "fp32":
            return True, f"{self.name} runs ONNX at fp32"
        return False, f"{self.name} {precision} needs an artifact built by the optimiser; only the bundle holds one"

    @abstractmethod
    def load(self, artifact: Path, *, device: str = "CPU", precision: str = "fp32", threads: int | None = None) -> Session:
        """Load an artifact (ONNX, OpenVINO IR, TensorRT engine) for this backend."""


def check_precision(backend: str, precision: str) -> str:
    """Normalise a precision name; an unknown one is refused before any library work starts."""
    value = precision.lower()
    if value not in PRECISIONS:
        raise BackendUnavailable(f"{backend}: unknown precision {precision!r}; use one of {list(PRECISIONS)}")
    return value


def check_artifact(artifact: Path | str) -> Path:
    """A missing model file is a deployment error, not a missing backend: raise FileNotFoundError."""
    path = Path(artifact)
    if not path.is_file():
        raise FileNotFoundError(f"model artifact not found: {path}")
    return path


def register(name: str, module: str) -> None:
    _PLUGINS[name] = module


def backend_names() -> list[str]:
    return sorted(_PLUGINS)


def get_backend(name: str) -> Backend:
    if name not in _PLUGINS:
        raise BackendUnavailable(f"unknown backend {name!r}; known: {sorted(_PLUGINS)}")
    try:
        module = importlib.import_module(_PLUGINS[name])
    except ImportError as exc:  # the plugin itself imports lazily; this guards a broken install
        raise BackendUnavailable(f"{name}: plugin failed to import: {exc}") from exc
    return module.BACKEND


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every known backend with (available, detail): the doctor and the optimiser list these."""
    result: dict[str, tuple[bool, str]] = {}
    for name in _PLUGINS:
        try:
            result[name] = get_backend(name).availability()
        except BackendUnavailable as exc:
            result[name] = (False, str(exc))
        except Exception as exc:  # a vendor library that crashes on probing must not break the doctor
            result[name] = (False, f"{name}: availability probe failed: {type(exc).__name__}: {exc}")
    return result
