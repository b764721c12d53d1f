"""ONNX Runtime: the FP32 baseline everywhere, plus its CUDA and TensorRT execution providers where present.

ONNX Runtime silently falls back to the CPU provider when a GPU provider fails to initialise (a
missing libcudnn, a driver mismatch). A box that believes it runs on CUDA while it runs on two CPU
cores misses every latency budget without a word, so after creating the session we check which
providers it actually got and refuse the load if the requested one is not first.
"""

from __future__ import annotations

from pathlib import Path

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

_PROVIDERS = {
    "CPU": ["CPUExecutionProvider"],
    "CUDA": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "TensorRT": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_ALIASES = {"GPU": "CUDA", "cuda": "CUDA", "cpu": "CPU", "tensorrt": "TensorRT", "TENSORRT": "TensorRT"}

# ONNX type strings -> numpy dtypes, so callers may pass float32 to an fp16 model.
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def _device_key(device: str) -> str:
    return _ALIASES.get(device, device)


def _provider_options(device: str, precision: str, artifact: Path) -> list[dict[str, str]]:
    """Per-provider options, aligned with the provider list.

    TensorRT builds an engine on first load, which takes minutes on a Jetson; caching it next to
    the artifact makes later loads fast. fp16 is a build flag of that engine, not of the ONNX file.
    """
    options: list[dict[str, str]] = []
    for provider in _PROVIDERS[device]:
        if provider == "TensorrtExecutionProvider":
            cache = artifact.parent / f".trt-cache-{artifact.stem}"
            opts = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache)}
            if precision == "fp16":
                opts["trt_fp16_enable"] = "True"
            # int8: a QDQ model is quantised explicitly and needs no flag; trt_int8_enable would ask
            # for a calibration table we do not ship.
            options.append(opts)
        else:
            options.append({})
    return options


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def availability(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return False, f"onnxruntime not installed ({exc})"
        return True, f"onnxruntime {ort.__version__}; providers {', '.join(ort.get_available_providers())}"

    def device_availability(self, device: str) -> tuple[bool, str]:
        ok, detail = self.availability()
        if not ok:
            return ok, detail
        key = _device_key(device)
        if key not in _PROVIDERS:
            return False, f"onnxruntime: unknown device {device!r}; use one of {sorted(_PROVIDERS)}"
        import onnxruntime as ort

        present = ort.get_available_providers()
        wanted = _PROVIDERS[key][0]
        if wanted not in present:
            return False, f"onnxruntime: {wanted} is not available here (present: {present})"
        return True, f"onnxruntime {key} via {wanted}"

    def runs_reference(self, device: str, precision: str) -> tuple[bool, str]:
        """fp32 anywhere; fp16 only through the TensorRT provider (a build flag of its engine)."""
        if precision == "fp32" or (precision == "fp16" and _device_key(device) == "TensorRT"):
            return True, f"onnxruntime runs ONNX at {precision} on {device}"
        return False, f"onnxruntime {device} {precision} needs an artifact built by the optimiser; only the bundle holds one"

    def load(self, artifact: Path, *, device: str = "CPU", precision: str = "fp32", threads: int | None = None) -> Session:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime not installed ({exc})") from exc
        precision = check_precision(self.name, precision)
        ok, why = self.device_availability(device)
        if not ok:
            raise BackendUnavailable(why)
        key = _device_key(device)
        path = check_artifact(artifact)
        wanted = _PROVIDERS[key]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if key == "CPU" and precision in ("fp16", "bf16"):
            log.info("onnxruntime CPU runs the graph as stored; precision is a property of the artifact",
                     artifact=path.name, precision=precision)
        sess = ort.InferenceSession(
            str(path), sess_options=options, providers=wanted, provider_options=_provider_options(key, precision, path)
        )
        got = sess.get_providers()
        if not got or got[0] != wanted[0]:
            raise BackendUnavailable(
                f"onnxruntime: {wanted[0]} failed to initialise (session fell back to {got}); "
                "check the CUDA/cuDNN/TensorRT libraries"
            )
        input_names = [i.name for i in sess.get_inputs()]
        input_types = {i.name: _ORT_DTYPES.get(i.type) for i in sess.get_inputs()}
        output_names = [o.name for o in sess.get_outputs()]

        def runner(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            feed = {}
            for name in input_names:
                value = np.asarray(inputs[name])
                dtype = input_types[name]
                feed[name] = value.astype(dtype, copy=False) if dtype is not None else value
            values = sess.run(output_names, feed)
            return dict(zip(output_names, values, strict=True))

        log.debug("loaded", backend=self.name, device=key, precision=precision, artifact=path.name)
        return Session(self.name, key, precision, path, input_names, output_names, runner)


BACKEND = OnnxRuntimeBackend()
