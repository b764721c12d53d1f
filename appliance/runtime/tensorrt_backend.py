"""TensorRT 10+: runs a serialized engine (.engine / .plan) built on this very GPU by the optimiser.

Nothing here imports tensorrt or CUDA at module import: a CPU-only box imports this plugin fine and
reports why it cannot use it. Device memory is handled with cuda-python (``cuda.bindings.runtime``,
or the older ``cuda.cudart`` layout) rather than PyTorch or PyCUDA, because torch is for training
only and PyCUDA needs a compiler on the box.

The engine is run with the name-based API of TensorRT 10 (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``); the binding-index API was removed in 10.0. Engines
built with dynamic spatial profiles take any shape inside their optimisation profile; output shapes
are read back from the context after the input shapes are set. Outputs whose shape depends on the
data (``-1`` after shape inference) would need an output allocator and are refused with a message.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
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

_SUFFIXES = (".engine", ".plan", ".trt")


def _import_tensorrt() -> tuple[Any | None, str | None]:
    try:
        import tensorrt as trt
    except ImportError as exc:
        return None, f"Python package 'tensorrt' not installed ({exc}; pip install 'tensorrt>=10')"
    except Exception as exc:  # a wheel without its libnvinfer raises OSError on import
        return None, f"tensorrt failed to import ({type(exc).__name__}: {exc})"
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        return None, f"tensorrt {trt.__version__} is too old; the runtime needs TensorRT 10+ (execute_async_v3)"
    return trt, None


def _import_cudart() -> Any | None:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (12.6+) or ``cuda.cudart`` (older)."""
    try:
        from cuda.bindings import runtime as cudart

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[no-redef]

        return cudart
    except ImportError:
        return None


def _check(result: Any, what: str) -> Any:
    """cuda-python returns (err, *values); raise on a non-zero error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA {what} failed: {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _gpu_presence(cudart: Any | None) -> str | None:
    """None when a CUDA GPU is present, else why not. Uses the driver when a binding exists."""
    if cudart is not None:
        try:
            count = _check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        except Exception as exc:
            return f"no usable CUDA device ({exc})"
        return None if count and count > 0 else "no CUDA device (cudaGetDeviceCount = 0)"
    if Path("/etc/nv_tegra_release").exists():  # Jetson: no nvidia-smi on older JetPacks
        return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVIDIA GPU (nvidia-smi not found)"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed ({exc})"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return f"no NVIDIA GPU listed by nvidia-smi ({(out.stderr or out.stdout).strip()[:200]})"
    return None


def _device_index(device: str) -> int:
    """'GPU', 'GPU.1', 'cuda:1', 'CUDA' -> CUDA device ordinal."""
    head, _, tail = device.replace(":", ".").partition(".")
    if head.upper() not in ("GPU", "CUDA"):
        raise BackendUnavailable(f"tensorrt: unknown device {device!r}; use GPU or GPU.N")
    return int(tail) if tail else 0


class _EngineRunner:
    """Owns the engine, its execution context, one CUDA stream and the device buffers."""

    def __init__(self, trt: Any, cudart: Any, engine: Any, device_index: int) -> None:
        self._trt = trt
        self._cudart = cudart
        self._engine = engine
        self._device_index = device_index
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailable("tensorrt: could not create an execution context (out of GPU memory?)")
        self._stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, size in bytes)
        self._lock = threading.Lock()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}

    def _buffer(self, name: str, nbytes: int) -> int:
        """Device buffers grow to the largest shape seen and are reused, not freed per call."""
        ptr, size = self._buffers.get(name, (0, 0))
        if size >= nbytes and ptr:
            return ptr
        if ptr:
            _check(self._cudart.cudaFree(ptr), "cudaFree")
        ptr = _check(self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc")
        self._buffers[name] = (int(ptr), nbytes)
        return int(ptr)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            _check(cudart.cudaSetDevice(self._device_index), "cudaSetDevice")
            host_inputs = {n: np.ascontiguousarray(inputs[n], dtype=self._dtypes[n]) for n in self.input_names}
            for name, array in host_inputs.items():
                if not self._context.set_input_shape(name, tuple(array.shape)):
                    raise ValueError(f"tensorrt: shape {array.shape} for {name!r} is outside the engine's profile")
                ptr = self._buffer(name, array.nbytes)
                _check(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, self._stream), "H2D copy")
                self._context.set_tensor_address(name, ptr)
            outputs: dict[str, np.ndarray] = {}
            for name in self.output_names:
                shape = tuple(self._context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise ValueError(f"tensorrt: output {name!r} has a data-dependent shape {shape}; not supported")
                outputs[name] = np.empty(shape, dtype=self._dtypes[name])
                self._context.set_tensor_address(name, self._buffer(name, outputs[name].nbytes))
            if not self._context.execute_async_v3(int(self._stream)):  # TensorRT wants the raw handle
                raise RuntimeError("tensorrt: execute_async_v3 failed (see the TensorRT log)")
            for name, array in outputs.items():
                ptr = self._buffers[name][0]
                _check(cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, d2h, self._stream), "D2H copy")
            _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            return outputs

    def close(self) -> None:
        with self._lock:
            for ptr, _ in self._buffers.values():
                self._cudart.cudaFree(ptr)
            self._buffers.clear()
            if self._stream is not None:
                self._cudart.cudaStreamDestroy(self._stream)
                self._stream = None
            self._context = None
            self._engine = None


class TensorRtBackend(Backend):
    name = "tensorrt"

    def _missing(self) -> list[str]:
        """Everything missing at once, so a technician fixes the box in one pass, not three."""
        missing: list[str] = []
        _, trt_error = _import_tensorrt()
        if trt_error:
            missing.append(trt_error)
        cudart = _import_cudart()
        gpu_error = _gpu_presence(cudart)
        if gpu_error:
            missing.append(gpu_error)
        if cudart is None:
            missing.append("no CUDA runtime binding (pip install cuda-python)")
        return missing

    def availability(self) -> tuple[bool, str]:
        missing = self._missing()
        if missing:
            return False, "tensorrt: " + "; ".join(missing)
        trt, _ = _import_tensorrt()
        cudart = _import_cudart()
        count = _check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        return True, f"tensorrt {trt.__version__}; {count} CUDA device(s)"

    def device_availability(self, device: str) -> tuple[bool, str]:
        try:
            index = _device_index(device)
        except (BackendUnavailable, ValueError) as exc:
            return False, str(exc)
        ok, detail = self.availability()
        if not ok:
            return ok, detail
        count = _check(_import_cudart().cudaGetDeviceCount(), "cudaGetDeviceCount")
        if index >= count:
            return False, f"tensorrt: no CUDA device {index} (this box has {count})"
        return True, f"tensorrt GPU.{index}"

    def runs_reference(self, device: str, precision: str) -> tuple[bool, str]:
        return False, "tensorrt runs an engine built on this GPU by the optimiser, never the ONNX model itself"

    def load(self, artifact: Path, *, device: str = "GPU", precision: str = "fp16", threads: int | None = None) -> Session:
        precision = check_precision(self.name, precision)  # baked into the engine; recorded, not applied
        ok, why = self.device_availability(device)
        if not ok:
            raise BackendUnavailable(why)
        path = check_artifact(artifact)
        if path.suffix.lower() not in _SUFFIXES:
            raise BackendUnavailable(f"tensorrt: cannot load {path.name}; expects a serialized engine {list(_SUFFIXES)}")
        trt, _ = _import_tensorrt()
        cudart = _import_cudart()
        index = _device_index(device)
        _check(cudart.cudaSetDevice(index), "cudaSetDevice")
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendUnavailable(
                f"tensorrt: could not deserialize {path.name}; an engine only runs on the TensorRT version "
                "and GPU it was built on - rebuild it on this box (edgescreen optimize)"
            )
        runner = _EngineRunner(trt, cudart, engine, index)
        runner.runtime = runtime  # type: ignore[attr-defined]  # keep the runtime alive as long as the engine
        log.debug("loaded", backend=self.name, device=f"GPU.{index}", precision=precision, artifact=path.name)
        return Session(self.name, f"GPU.{index}", precision, path, runner.input_names, runner.output_names,
                       runner, runner.close)


BACKEND = TensorRtBackend()
