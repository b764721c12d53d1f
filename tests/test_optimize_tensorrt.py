"""TensorRT candidates: the Q/DQ model they are built from is checked here; engines need a GPU (marked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgescreen.optimize import tensorrt_build
from edgescreen.optimize.candidates import BuildOptions, CandidateSpec, attempts, availability
from edgescreen.optimize.quantize_ort import quantize_qdq
from edgescreen.optimize.toymodels import ToySpec, build_toy_onnx, toy_case

SEG = ToySpec("pancreas.stage1", "seg3d", (8, 16, 16), 4)
HAS_GPU, WHY_NOT = tensorrt_build.availability()


def test_tensorrt_qdq_is_symmetric_int8(tmp_path: Path) -> None:
    """Explicit quantisation for TensorRT: every zero point 0, int8 activations and weights."""
    src = build_toy_onnx(SEG, tmp_path / "toy.onnx")
    out = quantize_qdq(src, tmp_path / "qdq.onnx", [toy_case(SEG, i) for i in range(4)], for_tensorrt=True,
                       work_dir=tmp_path)
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qnodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert qnodes, "no Q/DQ nodes were inserted"
    zero_points = [inits[n.input[2]] for n in qnodes if len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert not list(Path.cwd().glob("sym_shape_infer_temp*"))  # quantisation leaves the caller's cwd clean


def test_tensorrt_attempts_escalate_calibration_methods() -> None:
    opts = BuildOptions(ort_methods=("minmax", "percentile"), input_shapes={"image": [1, 1, 8, 16, 16]})
    int8 = attempts(CandidateSpec("tensorrt", "GPU", "int8"), SEG.role, Path("m.onnx"), [], opts)
    assert [a.method for a in int8] == ["qdq-minmax-strongly-typed", "qdq-percentile-strongly-typed"]
    fp16 = attempts(CandidateSpec("tensorrt", "GPU", "fp16"), SEG.role, Path("m.onnx"), [], opts)
    assert [a.method for a in fp16] == ["fp16-strongly-typed"]


@pytest.mark.skipif(HAS_GPU, reason="this box has TensorRT and a GPU")
def test_tensorrt_reports_why_it_is_unavailable() -> None:
    ok, why = availability(CandidateSpec("tensorrt", "GPU", "fp16"))
    assert not ok and why


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason=f"needs an NVIDIA GPU with TensorRT: {WHY_NOT}")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engine_builds_with_a_timing_cache(tmp_path: Path, precision: str) -> None:
    src = build_toy_onnx(SEG, tmp_path / "toy.onnx")
    opts = BuildOptions(ort_methods=("minmax",), input_shapes={"image": [1, 1, 8, 16, 16]}, cache_dir=tmp_path / "cache")
    cases = [toy_case(SEG, i) for i in range(4)]
    attempt = attempts(CandidateSpec("tensorrt", "GPU", precision), SEG.role, src, cases, opts)[0]
    engine, files = attempt.build(tmp_path)
    assert engine.suffix == ".engine" and engine.stat().st_size > 0 and files == [engine]
    cache = tensorrt_build.timing_cache_path(tmp_path / "cache")
    assert cache.is_file() and cache.stat().st_size > 0
    from edgescreen.appliance.runtime import get_backend

    with get_backend("tensorrt").load(engine, device="GPU", precision=precision) as session:
        out = session.run(cases[0].inputs)
    assert next(iter(out.values())).shape == (1, 4, 8, 16, 16)
