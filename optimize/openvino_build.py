"""OpenVINO artifacts: FP32 and FP16 IR by conversion, INT8 IR by NNCF post-training quantisation.

Why:
* FP32/FP16: ``ov.convert_model`` + ``ov.save_model(compress_to_fp16=...)``. FP16 IR halves the weight
  file; on a CPU without native fp16 the plugin decompresses the weights at load and computes in f32
  (the runtime backend pins the precision hint), so FP16 is a size win there and a speed win on iGPUs.
* INT8: ``nncf.quantize`` on the OpenVINO model (not on ONNX): NNCF's OpenVINO backend knows the CPU
  plugin's fused int8 kernels, including 3D convolutions and transposed convolutions, which is where
  the big CPU win comes from (ORT has no fast 3D int8 path). Preset PERFORMANCE (symmetric
  activations) gets the fastest kernels and is tried first; MIXED (asymmetric activations) suits
  LeakyReLU/InstanceNorm activations that are not centred better and is the more accurate retry.
* When plain INT8 fails the gate, ``nncf.quantize_with_accuracy_control`` reverts the most harmful
  layers to float until the *calibration* cases' agreement with FP32 is within the gate's margin; the
  held-out gate then judges the result independently (the restorer never sees held-out cases).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgescreen.appliance.logs import get_logger
from edgescreen.optimize.calibration import Case

log = get_logger(__name__)

MAX_RESTORE_ITERATIONS = 4


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """NNCF draws rich progress bars on stdout and logs at INFO; the optimiser's stdout is its report,
    so both go to stderr (warnings only)."""
    import nncf

    nncf.set_log_level(logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _read(src: Path, static_shapes: dict[str, list[int]] | None) -> Any:
    import openvino as ov

    model = ov.convert_model(str(src))
    if static_shapes:
        model.reshape({name: ov.PartialShape(shape) for name, shape in static_shapes.items()})
    return model


def ir_files(xml: Path) -> list[Path]:
    """An IR is two files; both go in the bundle and both are hashed."""
    return [xml, xml.with_suffix(".bin")]


def convert(src: Path, dest_xml: Path, *, fp16: bool, static_shapes: dict[str, list[int]] | None = None) -> Path:
    """ONNX -> OpenVINO IR (.xml + .bin), with FP16-compressed weights when ``fp16``."""
    import openvino as ov

    ov.save_model(_read(src, static_shapes), str(dest_xml), compress_to_fp16=fp16)
    return dest_xml


def _dataset(cases: Sequence[Case], input_names: Sequence[str]) -> Any:
    import nncf

    return nncf.Dataset(list(cases), lambda c: {n: np.ascontiguousarray(c.inputs[n], dtype=np.float32) for n in input_names})


_WEIGHTED = {"Convolution", "ConvolutionBackpropData", "GroupConvolution", "MatMul"}


def edge_layers(model: Any) -> list[str]:
    """The first weighted layer and every output head (the last weighted layer before each result).

    These are where INT8 hurts most and costs least to keep in float: the first convolution sees
    raw intensities with a few channels, the heads draw the class boundaries the gate measures.
    """
    ordered = [op for op in model.get_ordered_ops() if op.get_type_name() in _WEIGHTED]
    found = {ordered[0].get_friendly_name()} if ordered else set()
    for result in model.get_results():
        stack, seen = [result.input_value(0).get_node()], set()
        while stack:
            node = stack.pop()
            if node.get_friendly_name() in seen:
                continue
            seen.add(node.get_friendly_name())
            if node.get_type_name() in _WEIGHTED:
                found.add(node.get_friendly_name())
                continue
            stack.extend(inp.get_source_output().get_node() for inp in node.inputs())
    return sorted(found)


def quantize_int8(src: Path, dest_xml: Path, cases: Sequence[Case], *, preset: str = "performance",
                  static_shapes: dict[str, list[int]] | None = None, fast_bias_correction: bool = True,
                  keep_edges_float: bool = False) -> Path:
    """Post-training INT8 with NNCF over all calibration cases (subset_size = len(cases)).

    ``keep_edges_float`` leaves `edge_layers` in float: the cheap second try before accuracy control
    (one more quantisation instead of one compile per layer group).
    """
    import nncf
    import openvino as ov

    model = _read(src, static_shapes)
    names = [p.get_any_name() for p in model.inputs]
    ignored = nncf.IgnoredScope(names=edge_layers(model), validate=False) if keep_edges_float else None
    start = time.perf_counter()
    with _quiet():
        quantized = nncf.quantize(
            model, _dataset(cases, names), preset=nncf.QuantizationPreset(preset),
            subset_size=len(cases), fast_bias_correction=fast_bias_correction, ignored_scope=ignored,
        )
    ov.save_model(quantized, str(dest_xml), compress_to_fp16=False)
    log.info("openvino int8 quantised", model=src.name, preset=preset, seconds=round(time.perf_counter() - start, 1))
    return dest_xml


# score(case index, outputs by name) -> agreement with FP32 in [0, 1] for that case
CaseScore = Callable[[int, dict[str, np.ndarray]], float]


def quantize_int8_accuracy_control(src: Path, dest_xml: Path, calibration: Sequence[Case], score: CaseScore,
                                   *, max_drop: float, preset: str = "mixed",
                                   static_shapes: dict[str, list[int]] | None = None,
                                   max_iterations: int = MAX_RESTORE_ITERATIONS) -> Path:
    """INT8 with NNCF's accuracy control: layers go back to float until the mean per-case agreement
    with FP32 on the calibration cases drops by at most ``max_drop``.

    It is the expensive fallback: NNCF first ranks every quantiser group by compiling the model with
    that group reverted (about 4 minutes for a 38-group 3D U-Net on two cores with 8 ranking cases),
    then reverts groups one at a time, re-validating every calibration case. Ranking uses 4 cases and
    the iterations are capped: a model that needs more than a handful of layers reverted has lost the
    INT8 speed anyway, and the optimiser's time budget (four models in 15 minutes) matters more.
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    model = _read(src, static_shapes)
    names = [p.get_any_name() for p in model.inputs]
    indexed = list(enumerate(calibration))

    def validate(compiled: Any, items: Any) -> tuple[float, list[float]]:
        outputs = [p.get_any_name() for p in compiled.outputs]
        values = []
        for index, case in items:
            result = compiled({n: np.ascontiguousarray(case.inputs[n], dtype=np.float32) for n in names})
            values.append(float(score(index, {o: np.asarray(result[i]) for i, o in enumerate(outputs)})))
        return float(np.mean(values)), values

    dataset = nncf.Dataset(indexed, lambda item: {n: np.ascontiguousarray(item[1].inputs[n], dtype=np.float32)
                                                  for n in names})
    start = time.perf_counter()
    with _quiet():
        quantized = nncf.quantize_with_accuracy_control(
            model, dataset, dataset, validate, max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
            preset=nncf.QuantizationPreset(preset), subset_size=len(calibration),
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=max_iterations, ranking_subset_size=min(len(calibration), 4)),
        )
    ov.save_model(quantized, str(dest_xml), compress_to_fp16=False)
    log.info("openvino int8 with accuracy control", model=src.name, max_drop=max_drop,
             seconds=round(time.perf_counter() - start, 1))
    return dest_xml
