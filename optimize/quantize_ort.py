"""ONNX Runtime static INT8 quantisation (QDQ), and the Q/DQ ONNX that TensorRT builds INT8 engines from.

Why these choices:
* ``quant_pre_process`` first (shape inference + graph optimisation): quantize_static needs shapes to
  place Q/DQ pairs and it folds InstanceNorm/BatchNorm patterns the quantiser would otherwise split.
* QDQ format (not QOperator): the same file runs in ORT, and TensorRT reads Q/DQ as explicit
  quantisation, which is the only INT8 path left in TensorRT 11 (implicit calibration is gone).
* per-channel weights: 3D conv filters differ by orders of magnitude between channels; per-tensor
  scales lose the small ones.
* calibration method is a choice (MinMax, Percentile, Entropy): the optimiser tries them in the order
  asked and keeps the first that passes the gate, because MinMax is cheap and usually enough while
  Entropy costs a histogram pass per tensor.
* For TensorRT, activations and weights are symmetric int8 (zero point 0): TensorRT requires it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edgescreen.appliance.logs import get_logger
from edgescreen.optimize.calibration import Case

log = get_logger(__name__)

METHODS = ("minmax", "percentile", "entropy")


class _Reader:
    """onnxruntime's CalibrationDataReader over our cases (imported lazily with onnxruntime)."""

    def __init__(self, cases: Sequence[Case], input_names: Sequence[str]) -> None:
        self._items = [{n: np.ascontiguousarray(c.inputs[n], dtype=np.float32) for n in input_names} for c in cases]
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._items):
            return None
        self._i += 1
        return self._items[self._i - 1]

    def rewind(self) -> None:
        self._i = 0


@contextlib.contextmanager
def _root_level(level: int) -> Iterator[None]:
    """onnxruntime.quantization logs through the root logger at INFO/WARNING about every bias copy and
    per-channel axis of InstanceNorm scales: noise to a technician reading the optimiser's log."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(max(level, old))
    try:
        yield
    finally:
        root.setLevel(old)


def preprocess(src: Path, dest: Path) -> Path:
    """Shape inference and graph optimisation ahead of quantisation; falls back to the source graph
    when symbolic shape inference cannot handle a custom op (quantisation then still works)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dest = src.resolve(), dest.resolve()
    # chdir: when symbolic shape inference gives up it saves "sym_shape_infer_temp.onnx" (+ external
    # data) into the current directory, which would litter the caller's checkout
    with contextlib.chdir(dest.parent):
        try:
            with _root_level(logging.WARNING):
                quant_pre_process(str(src), str(dest), skip_symbolic_shape=False, auto_merge=True)
        except Exception as exc:  # noqa: BLE001 - any failure here only costs the symbolic shapes
            log.info("symbolic shape inference incomplete; using ONNX shape inference only", model=src.name,
                     error=str(exc)[:200])
            quant_pre_process(str(src), str(dest), skip_symbolic_shape=True)
    return dest


def quantize_qdq(src: Path, dest: Path, cases: Sequence[Case], *, method: str = "minmax",
                 for_tensorrt: bool = False, work_dir: Path | None = None) -> Path:
    """Write a static INT8 QDQ model of ``src`` to ``dest``, calibrated on ``cases``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; use one of {METHODS}")
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    src, dest = src.resolve(), dest.resolve()
    work = (work_dir or dest.parent).resolve()
    pre = preprocess(src, work / f"{src.stem}.pre.onnx")
    names = [i.name for i in onnx.load(str(pre), load_external_data=False).graph.input]
    extra: dict[str, object] = {"CalibMovingAverage": False}
    if method == "percentile":
        extra["CalibPercentile"] = 99.99
    if for_tensorrt:
        extra.update({"ActivationSymmetric": True, "WeightSymmetric": True, "QDQKeepRemovableActivations": True})
    start = time.perf_counter()
    with _root_level(logging.ERROR), contextlib.chdir(work):
        quantize_static(
            str(pre), str(dest), _Reader(cases, names),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
            activation_type=QuantType.QInt8 if for_tensorrt else QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=calib, extra_options=extra,
        )
    log.info("ort int8 quantised", model=src.name, method=method, tensorrt=for_tensorrt,
             seconds=round(time.perf_counter() - start, 1))
    return dest


def convert_fp16(src: Path, dest: Path) -> Path:
    """An FP16 ONNX for ORT's CUDA provider, keeping float32 inputs and outputs (the pipeline feeds float32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dest))
    return dest
