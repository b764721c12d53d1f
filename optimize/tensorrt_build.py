"""TensorRT engines, built on the target box itself (an engine is tied to the GPU and TensorRT version).

Why this shape:
* Strongly typed networks only. TensorRT 11 removed the weak-typing flags (BuilderFlag.FP16/INT8 and
  the INT8 calibrator); 10.12+ deprecated them. So precision lives in the ONNX graph:
  - FP16: the graph is converted to float16 first (float32 inputs/outputs kept, so the pipeline feeds
    float32 as everywhere else), then built strongly typed;
  - INT8: explicit quantisation: a Q/DQ ONNX with symmetric int8 scales calibrated on our cases
    (optimize.quantize_ort with ``for_tensorrt=True``), then built strongly typed.
  The STRONGLY_TYPED creation flag is required on 10.x and ignored (always on) on 11.x.
* Dynamic dims get one optimisation profile at the card's fixed shape (the pipeline always feeds the
  patch / crop / letterboxed image), so TensorRT tunes its tactics for exactly that shape.
* A timing cache (``<cache_dir>/tensorrt-<gpu>-<trt version>.cache``) is loaded before and saved after
  every build: tactic timing dominates build time on a Jetson (minutes per model), and the cache makes
  a rebuild (a new model version, a retry after a failed gate) take seconds.

Nothing here runs without an NVIDIA GPU and the ``tensorrt`` package; the tests that need them are
marked ``gpu`` and skip elsewhere.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from edgescreen.appliance.logs import get_logger

log = get_logger(__name__)

ENGINE_SUFFIX = ".engine"
WORKSPACE_BYTES = 1 << 30
MAX_BATCH = 4


class TensorRtUnavailable(RuntimeError):
    """No tensorrt package or no CUDA device here."""


def availability() -> tuple[bool, str]:
    """(True, "tensorrt X on <gpu>") or (False, why), without raising."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return False, f"tensorrt not installed ({exc})"
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # noqa: BLE001 - no driver / no device surfaces as a generic error
        return False, f"tensorrt {trt.__version__}: cannot create a builder ({exc}); is there a CUDA GPU?"
    if builder is None:
        return False, f"tensorrt {trt.__version__}: no CUDA device"
    return True, f"tensorrt {trt.__version__}"


def _gpu_name() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().splitlines()
        return out[0] if out else "gpu"
    except (OSError, subprocess.SubprocessError):
        return "gpu"


def timing_cache_path(cache_dir: Path) -> Path:
    import tensorrt as trt

    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"{_gpu_name()}-{trt.__version__}").strip("-")
    return cache_dir / f"tensorrt-{tag}.cache"


def _network_flags(trt: Any) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(onnx_path: Path, engine_path: Path, *, input_shapes: dict[str, list[int]], cache_dir: Path,
                 max_batch: int = MAX_BATCH, workspace_bytes: int = WORKSPACE_BYTES) -> Path:
    """Parse ``onnx_path`` (already FP16 or Q/DQ INT8) and build a strongly typed engine.

    ``input_shapes`` is the shape the engine is tuned for (batch 1); a dynamic batch dim may grow to
    ``max_batch`` (the pipeline may batch sliding-window tiles).
    """
    ok, why = availability()
    if not ok:
        raise TensorRtUnavailable(why)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"tensorrt could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = input_shapes.get(tensor.name)
        if shape is None:
            if any(d < 0 for d in tensor.shape):
                raise ValueError(f"{onnx_path.name}: input {tensor.name} is dynamic and no shape was given")
            shape = list(tensor.shape)
        largest = [max_batch, *shape[1:]] if tensor.shape[0] < 0 else shape
        profile.set_shape(tensor.name, shape, shape, largest)
    config.add_optimization_profile(profile)

    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = timing_cache_path(cache_dir)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"tensorrt failed to build an engine from {onnx_path.name} (see the log above)")
    engine_path.write_bytes(bytes(serialized))
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    tmp.replace(cache_file)
    log.info("tensorrt engine built", model=onnx_path.name, engine=engine_path.name,
             seconds=round(time.perf_counter() - start, 1), timing_cache=str(cache_file))
    return engine_path
