"""OpenVINO: Intel CPUs, iGPUs and NPUs; loads ONNX directly or an IR (.xml + .bin) built by the optimiser.

Why these compile settings:
- PERFORMANCE_HINT=LATENCY: one study at a time, so one stream and all threads on one request.
- INFERENCE_NUM_THREADS (CPU only) from the hardware profile: the box shares its cores with the DICOM
  listener and the web UI, so the worker must not take them all.
- INFERENCE_PRECISION_HINT is always set when the device supports it. On CPUs with AVX512-BF16 or
  AMX the CPU plugin's *default* is bf16, which silently changes results by ~1e-2 against the FP32
  reference the accuracy gates were measured on; "fp32" must mean f32. "int8" artifacts are quantised
  already; their remaining float glue runs at f32.

Dynamic spatial shapes (a CT volume's slice count varies per study): CPU and GPU compile a model with
dynamic dimensions once and accept any shape. Devices that cannot (NPU, or a GPU driver that refuses)
get a static model per input shape, compiled on first use and kept in a small LRU cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.runtime.base import (
    Backend,
    BackendUnavailable,
    Session,
    check_artifact,
    check_precision,
)

log = get_logger(__name__)

_DEVICE_FAMILIES = ("CPU", "GPU", "NPU")
_PRECISION_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}
_STATIC_CACHE_SIZE = 4  # compiled static-shape models kept per session (each holds its own weights)
_SUFFIXES = (".onnx", ".xml")


@cache
def _core() -> Any:
    """One ov.Core per process: creating it enumerates devices and loads plugins (~100 ms)."""
    import openvino as ov

    return ov.Core()


def _import_error() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"openvino not installed ({exc})"
    return None


def _match_device(device: str, present: list[str]) -> str | None:
    """'GPU' matches 'GPU' or 'GPU.0'; 'GPU.1' must be present as such."""
    if device in present:
        return device
    for name in present:
        if name.split(".")[0] == device:
            return device
    return None


def _compile_config(core: Any, device: str, precision: str, threads: int | None) -> dict[str, Any]:
    supported = set(core.get_property(device, "SUPPORTED_PROPERTIES"))
    config: dict[str, Any] = {}
    if "PERFORMANCE_HINT" in supported:
        config["PERFORMANCE_HINT"] = "LATENCY"
    if threads and "INFERENCE_NUM_THREADS" in supported:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if "INFERENCE_PRECISION_HINT" in supported:
        config["INFERENCE_PRECISION_HINT"] = _PRECISION_HINTS[precision]
    elif precision != "fp32":
        log.warning("device has no precision hint; the artifact's own precision applies", device=device,
                    precision=precision)
    return config


def _port_name(port: Any, index: int, kind: str) -> str:
    try:
        return port.get_any_name()
    except RuntimeError:  # an IR output without tensor names
        return f"{kind}_{index}"


class _Runner:
    """Runs one model; owns the compiled model(s) and their infer requests.

    An InferRequest is not safe to use from two threads at once, and the worker may run a
    preview and a study in parallel, so calls are serialised with a lock.
    """

    def __init__(self, core: Any, model: Any, device: str, config: dict[str, Any]) -> None:
        self._core = core
        self._model = model
        self._device = device
        self._config = config
        self._lock = threading.Lock()
        self.input_names = [_port_name(p, i, "input") for i, p in enumerate(model.inputs)]
        self.output_names = [_port_name(p, i, "output") for i, p in enumerate(model.outputs)]
        self._dtypes = {n: p.get_element_type().to_dtype() for n, p in zip(self.input_names, model.inputs, strict=True)}
        self._dynamic = any(p.get_partial_shape().is_dynamic for p in model.inputs)
        self._request: Any = None
        self._static: OrderedDict[tuple[tuple[int, ...], ...], Any] = OrderedDict()
        if not self._dynamic or device.split(".")[0] != "NPU":
            try:
                self._request = core.compile_model(model, device, config).create_infer_request()
            except RuntimeError as exc:
                if not self._dynamic:
                    raise
                log.info("dynamic compile refused; compiling per input shape", device=device, error=str(exc)[:200])

    def _fits(self, feed: dict[str, np.ndarray]) -> bool:
        """Whether the compiled model takes these shapes: its static dims must match, dynamic ones take any."""
        for name, port in zip(self.input_names, self._model.inputs, strict=True):
            partial = port.get_partial_shape()
            shape = feed[name].shape
            if partial.rank.is_static and len(shape) != partial.rank.get_length():
                return False
            for dim, size in zip(partial, shape, strict=False):
                if dim.is_static and dim.get_length() != size:
                    return False
        return True

    def _request_for(self, feed: dict[str, np.ndarray]) -> Any:
        """The compiled model for these shapes. An IR built with the card's static tile (the optimiser's
        default: static spatial dims compile to faster kernels) fed another tile size, as a bundle's
        window may ask, is reshaped and compiled once for that size and kept in the LRU cache."""
        if self._request is not None and self._fits(feed):
            return self._request
        key = tuple(tuple(feed[n].shape) for n in self.input_names)
        if key in self._static:
            self._static.move_to_end(key)
            return self._static[key]
        model = self._model.clone()
        model.reshape({n: list(feed[n].shape) for n in self.input_names})
        request = self._core.compile_model(model, self._device, self._config).create_infer_request()
        self._static[key] = request
        if len(self._static) > _STATIC_CACHE_SIZE:
            self._static.popitem(last=False)
        return request

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {n: np.ascontiguousarray(inputs[n], dtype=self._dtypes[n]) for n in self.input_names}
        with self._lock:
            request = self._request_for(feed)
            request.infer(feed)
            # copy: the request reuses its output buffers on the next call
            return {
                name: np.array(request.get_output_tensor(i).data, copy=True)
                for i, name in enumerate(self.output_names)
            }


class OpenVinoBackend(Backend):
    name = "openvino"

    def availability(self) -> tuple[bool, str]:
        error = _import_error()
        if error:
            return False, error
        import openvino as ov

        try:
            devices = _core().available_devices
        except RuntimeError as exc:
            return False, f"openvino {ov.__version__}: device enumeration failed ({exc})"
        return True, f"openvino {ov.__version__}; devices {', '.join(devices) or 'none'}"

    def device_availability(self, device: str) -> tuple[bool, str]:
        error = _import_error()
        if error:
            return False, error
        if device.split(".")[0] not in _DEVICE_FAMILIES:
            return False, f"openvino: unknown device {device!r}; use one of {list(_DEVICE_FAMILIES)} (or GPU.N)"
        present = list(_core().available_devices)
        if _match_device(device, present) is None:
            return False, f"openvino: no {device} device here (present: {', '.join(present) or 'none'})"
        return True, f"openvino {device}"

    def runs_reference(self, device: str, precision: str) -> tuple[bool, str]:
        """fp32/fp16/bf16 are compile hints on an ONNX model; int8 needs NNCF's quantised IR."""
        if precision == "int8":
            return False, "openvino int8 needs the optimiser's quantised IR; only the bundle holds one"
        return True, f"openvino compiles ONNX at {precision}"

    def load(self, artifact: Path, *, device: str = "CPU", precision: str = "fp32", threads: int | None = None) -> Session:
        error = _import_error()
        if error:
            raise BackendUnavailable(error)
        precision = check_precision(self.name, precision)
        ok, why = self.device_availability(device)
        if not ok:
            raise BackendUnavailable(why)
        path = check_artifact(artifact)
        if path.suffix.lower() not in _SUFFIXES:
            raise BackendUnavailable(f"openvino: cannot load {path.name}; expects one of {list(_SUFFIXES)}")
        if path.suffix.lower() == ".xml" and not path.with_suffix(".bin").is_file():
            raise FileNotFoundError(f"OpenVINO IR weights not found beside {path.name}: {path.with_suffix('.bin')}")
        core = _core()
        model = core.read_model(str(path))
        config = _compile_config(core, device, precision, threads)
        runner = _Runner(core, model, device, config)
        log.debug("loaded", backend=self.name, device=device, precision=precision, artifact=path.name,
                  config=config)
        return Session(self.name, device, precision, path, runner.input_names, runner.output_names, runner)


BACKEND = OpenVinoBackend()
