"""Which artifacts to try for a model on a box, and how each is built.

A candidate is (backend, device, precision), taken from the hardware profile in its preference order.
Each candidate has one or more *attempts*, tried in order until one passes the accuracy gate:

  onnxruntime fp32   the ONNX file itself (also the baseline every ratio is measured against)
  onnxruntime fp16   float16 ONNX (CUDA provider)
  onnxruntime int8   static QDQ, per-channel, one attempt per calibration method asked for
                     (default MinMax, then Percentile, then Entropy)
  openvino fp32/fp16 converted IR, fp16-compressed weights for fp16
  openvino int8      nncf.quantize with preset PERFORMANCE (symmetric activations: the fastest CPU
                     kernels; 3D U-Net stage 1 here ran ~2x faster than MIXED), then MIXED
                     (asymmetric activations, more accurate), then MIXED with the first layer and
                     the output heads in float, then nncf.quantize_with_accuracy_control
  tensorrt fp16      float16 ONNX -> strongly typed engine
  tensorrt int8      symmetric Q/DQ ONNX -> strongly typed engine (explicit quantisation)

Availability is checked before any work, through the runtime backends' own probes, so a box without
a GPU lists "tensorrt GPU: unavailable: <why>" in the report instead of failing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgescreen.appliance.config.profile import HardwareProfile
from edgescreen.appliance.runtime import BackendUnavailable, get_backend
from edgescreen.optimize import openvino_build, quantize_ort, tensorrt_build
from edgescreen.optimize.calibration import Case


@dataclass(frozen=True)
class CandidateSpec:
    backend: str
    device: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.device}/{self.precision}"

    @property
    def slug(self) -> str:
        return f"{self.backend}-{self.device}-{self.precision}".lower().replace(".", "_")


BASELINE = CandidateSpec("onnxruntime", "CPU", "fp32")


def candidates_for(profile: HardwareProfile) -> list[CandidateSpec]:
    """The profile's candidates in order, without duplicates."""
    seen: list[CandidateSpec] = []
    for c in profile.candidates:
        spec = CandidateSpec(c.backend, c.device, c.precision)
        if spec not in seen:
            seen.append(spec)
    return seen


def availability(spec: CandidateSpec) -> tuple[bool, str]:
    """Whether this box can build *and* run the candidate; the reason when not."""
    try:
        ok, why = get_backend(spec.backend).device_availability(spec.device)
    except BackendUnavailable as exc:
        return False, str(exc)
    if not ok:
        return False, why
    if spec.backend == "openvino" and spec.precision == "int8" and importlib.util.find_spec("nncf") is None:
        return False, "nncf not installed (pip install edgescreen[optimize])"
    if spec.backend == "tensorrt":
        return tensorrt_build.availability()
    if spec.backend == "onnxruntime" and spec.precision == "int8" and importlib.util.find_spec("onnx") is None:
        return False, "onnx not installed (pip install edgescreen[optimize])"
    return True, why


@dataclass
class BuildOptions:
    ort_methods: Sequence[str] = ("minmax", "percentile", "entropy")
    ov_presets: Sequence[str] = ("performance", "mixed")
    accuracy_control: bool = True
    accuracy_control_max_drop: float = 0.01
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # the card's fixed shapes, batch 1
    static_shapes: bool = True  # bake the spatial dims into OpenVINO IR (TensorRT always tunes for them)
    cache_dir: Path = field(default_factory=lambda: Path("."))


# score(calibration case index, outputs) -> per-case agreement with FP32, for NNCF's accuracy control
CaseScore = Callable[[int, dict], float]


@dataclass
class Attempt:
    """One way of building a candidate: ``build(work_dir)`` returns (artifact, all its files)."""

    method: str
    build: Callable[[Path], tuple[Path, list[Path]]]


def attempts(spec: CandidateSpec, role: str, src: Path, calibration: Sequence[Case], opts: BuildOptions,
             score: CaseScore | None = None) -> list[Attempt]:
    """The attempts for ``spec`` in the order they are tried."""
    stem = f"{role}.{spec.slug}"
    b, p = spec.backend, spec.precision
    # spatial dims fixed to the card's, batch left dynamic: the pipeline may batch tiles
    ov_shapes = {n: [-1, *s[1:]] for n, s in opts.input_shapes.items()} if opts.static_shapes else None

    def same(work: Path) -> tuple[Path, list[Path]]:
        return src, [src]

    if b == "onnxruntime":
        if p == "fp32":
            return [Attempt("as-is", same)]
        if p == "fp16":
            def fp16(work: Path) -> tuple[Path, list[Path]]:
                out = quantize_ort.convert_fp16(src, work / f"{stem}.onnx")
                return out, [out]
            return [Attempt("float16", fp16)]
        if p == "int8":
            def qdq(method: str) -> Callable[[Path], tuple[Path, list[Path]]]:
                def run(work: Path) -> tuple[Path, list[Path]]:
                    out = quantize_ort.quantize_qdq(src, work / f"{stem}-{method}.onnx", calibration, method=method,
                                                    work_dir=work)
                    return out, [out]
                return run
            return [Attempt(f"qdq-{m}", qdq(m)) for m in opts.ort_methods]
    if b == "openvino":
        if p in ("fp32", "fp16"):
            def ir(work: Path) -> tuple[Path, list[Path]]:
                out = openvino_build.convert(src, work / f"{stem}.xml", fp16=p == "fp16", static_shapes=ov_shapes)
                return out, openvino_build.ir_files(out)
            return [Attempt("convert" + ("-fp16-weights" if p == "fp16" else ""), ir)]
        if p == "int8":
            def nncf_plain(preset: str, edges: bool) -> Callable[[Path], tuple[Path, list[Path]]]:
                def run(work: Path) -> tuple[Path, list[Path]]:
                    out = openvino_build.quantize_int8(src, work / f"{stem}-{preset}{'-edges' if edges else ''}.xml",
                                                       calibration, preset=preset, static_shapes=ov_shapes,
                                                       keep_edges_float=edges)
                    return out, openvino_build.ir_files(out)
                return run

            # the most accurate preset asked for (the last) is the one the fallbacks refine
            careful = opts.ov_presets[-1]

            def nncf_ac(work: Path) -> tuple[Path, list[Path]]:
                assert score is not None
                out = openvino_build.quantize_int8_accuracy_control(
                    src, work / f"{stem}-ac.xml", calibration, score, max_drop=opts.accuracy_control_max_drop,
                    preset=careful, static_shapes=ov_shapes)
                return out, openvino_build.ir_files(out)
            found = [Attempt(f"nncf-{preset}", nncf_plain(preset, False)) for preset in opts.ov_presets]
            found.append(Attempt(f"nncf-{careful}-float-edges", nncf_plain(careful, True)))
            if opts.accuracy_control and score is not None:
                found.append(Attempt(f"nncf-{careful}-accuracy-control", nncf_ac))
            return found
    if b == "tensorrt":
        shapes = opts.input_shapes

        def engine(method: str) -> Callable[[Path], tuple[Path, list[Path]]]:
            def run(work: Path) -> tuple[Path, list[Path]]:
                if p == "fp16":
                    onnx_in = quantize_ort.convert_fp16(src, work / f"{stem}.fp16.onnx")
                elif p == "int8":
                    onnx_in = quantize_ort.quantize_qdq(src, work / f"{stem}.qdq.onnx", calibration, method=method,
                                                        for_tensorrt=True, work_dir=work)
                else:
                    onnx_in = src
                out = tensorrt_build.build_engine(onnx_in, work / f"{stem}{tensorrt_build.ENGINE_SUFFIX}",
                                                  input_shapes=shapes, cache_dir=opts.cache_dir)
                return out, [out]
            return run
        if p == "int8":
            return [Attempt(f"qdq-{m}-strongly-typed", engine(m)) for m in opts.ort_methods]
        return [Attempt(f"{p}-strongly-typed", engine(p))]
    raise ValueError(f"no way to build {spec.name}")
