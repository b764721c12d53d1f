"""Runtime backends: availability on this very machine, and ORT/OpenVINO agreement on a real ONNX model.

The model is a Conv3d + Relu built with onnx.helper (dynamic D/H/W), small enough to run in
milliseconds on two shared cores, and checked against a NumPy reference so that "ORT == OpenVINO"
cannot pass by both being wrong the same way.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgescreen.appliance.runtime import BackendUnavailable, available_backends, get_backend
from edgescreen.appliance.runtime.select import FALLBACK, Choice, NoBackend, load_model

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

CHANNELS_OUT = 4
KERNEL = 3


def _weights(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, size=(CHANNELS_OUT, 1, KERNEL, KERNEL, KERNEL)).astype(np.float32)
    b = rng.normal(0, 0.1, size=(CHANNELS_OUT,)).astype(np.float32)
    return w, b


def _write_conv3d_model(path: Path, dynamic: bool = True) -> Path:
    w, b = _weights()
    dims: list[int | str] = [1, 1, "D", "H", "W"] if dynamic else [1, 1, 8, 16, 16]
    out_dims: list[int | str] = [1, CHANNELS_OUT, *dims[2:]]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["ct", "w", "b"], ["conv"], kernel_shape=[KERNEL] * 3, pads=[1] * 6),
            helper.make_node("Relu", ["conv"], ["logits"]),
        ],
        "conv3d_relu",
        [helper.make_tensor_value_info("ct", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_dims)],
        initializer=[
            helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel().tolist()),
            helper.make_tensor("b", TensorProto.FLOAT, b.shape, b.ravel().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgescreen-test")
    model.ir_version = 9  # readable by every ORT/OpenVINO the profiles name
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _reference(x: np.ndarray) -> np.ndarray:
    """Conv3d (pad 1) + ReLU in NumPy, for one 1-channel volume of shape (1, 1, D, H, W)."""
    w, b = _weights()
    vol = np.pad(x[0, 0].astype(np.float64), 1)
    d, h, wd = x.shape[2:]
    out = np.zeros((CHANNELS_OUT, d, h, wd))
    for i in range(KERNEL):
        for j in range(KERNEL):
            for k in range(KERNEL):
                out += w[:, 0, i, j, k, None, None, None] * vol[None, i : i + d, j : j + h, k : k + wd]
    out += b[:, None, None, None]
    return np.maximum(out, 0)[None].astype(np.float32)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_conv3d_model(tmp_path_factory.mktemp("models") / "conv3d.onnx")


def _volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, size=(1, 1, *shape)).astype(np.float32)


# ---------------------------------------------------------------- availability on this machine


def test_onnxruntime_and_openvino_are_available_here() -> None:
    found = available_backends()
    assert set(found) >= {"onnxruntime", "openvino", "tensorrt"}
    assert found["onnxruntime"][0], found["onnxruntime"]
    assert "CPUExecutionProvider" in found["onnxruntime"][1]
    assert found["openvino"][0], found["openvino"]
    assert "CPU" in found["openvino"][1]


def test_tensorrt_availability_names_what_is_missing() -> None:
    """A real probe: compare the backend's verdict with what this machine actually has."""
    ok, reason = available_backends()["tensorrt"]
    has_trt = importlib.util.find_spec("tensorrt") is not None
    has_gpu = shutil.which("nvidia-smi") is not None or Path("/etc/nv_tegra_release").exists()
    has_cuda = importlib.util.find_spec("cuda") is not None
    if has_trt and has_gpu and has_cuda:
        assert ok, reason
        return
    assert not ok
    assert reason.startswith("tensorrt:"), reason
    if not has_trt:
        assert "'tensorrt' not installed" in reason
    if not has_gpu:
        assert "no NVIDIA GPU" in reason
    if not has_cuda:
        assert "no CUDA runtime binding (pip install cuda-python)" in reason


def test_tensorrt_load_raises_backend_unavailable_with_the_reason(model_path: Path) -> None:
    ok, reason = get_backend("tensorrt").availability()
    if ok:
        pytest.skip("TensorRT is usable here; the GPU test covers it")
    with pytest.raises(BackendUnavailable) as err:
        get_backend("tensorrt").load(model_path.with_suffix(".engine"), device="GPU")
    assert str(err.value) == reason


def test_plugins_import_without_vendor_libraries() -> None:
    """Importing a plugin must not import its vendor library: that happens only when it is used."""
    import subprocess
    import sys

    code = (
        "import sys, edgescreen.appliance.runtime.openvino_backend, edgescreen.appliance.runtime.tensorrt_backend, "
        "edgescreen.appliance.runtime.onnxruntime_backend, edgescreen.appliance.runtime.select\n"
        "print(sorted(m for m in ('openvino', 'tensorrt', 'cuda', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- errors


def test_unknown_backend_name_is_refused_clearly() -> None:
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'coral'.*known: \['onnxruntime', 'openvino', 'tensorrt'\]"):
        get_backend("coral")


@pytest.mark.parametrize(
    ("backend", "device", "message"),
    [
        ("openvino", "NPU", r"openvino: no NPU device here \(present: CPU"),
        ("openvino", "FPGA", r"openvino: unknown device 'FPGA'"),
        ("onnxruntime", "CUDA", r"onnxruntime: CUDAExecutionProvider is not available here"),
        ("onnxruntime", "FPGA", r"onnxruntime: unknown device 'FPGA'"),
    ],
)
def test_unavailable_device_is_refused_clearly(model_path: Path, backend: str, device: str, message: str) -> None:
    if backend == "onnxruntime" and device == "CUDA":
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            pytest.skip("this machine has the CUDA provider")
    if backend == "openvino" and device == "NPU":
        import openvino as ov

        if any(d.startswith("NPU") for d in ov.Core().available_devices):
            pytest.skip("this machine has an NPU")
    with pytest.raises(BackendUnavailable, match=message):
        get_backend(backend).load(model_path, device=device)


def test_unknown_precision_and_missing_artifact(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match=r"unknown precision 'fp8'"):
        get_backend("openvino").load(model_path, precision="fp8")
    with pytest.raises(FileNotFoundError, match="model artifact not found"):
        get_backend("onnxruntime").load(tmp_path / "nope.onnx")


def test_missing_input_is_a_clear_error(model_path: Path) -> None:
    session = get_backend("onnxruntime").load(model_path, threads=1)
    with pytest.raises(ValueError, match=r"missing inputs \['ct'\]"):
        session.run({"image": _volume((4, 4, 4), 0)})


# ---------------------------------------------------------------- numerical agreement


@pytest.mark.parametrize("shape", [(8, 16, 16), (5, 12, 20), (11, 7, 9)])
def test_onnxruntime_and_openvino_agree_on_dynamic_shapes(model_path: Path, shape: tuple[int, int, int]) -> None:
    ort_session = get_backend("onnxruntime").load(model_path, device="CPU", precision="fp32", threads=1)
    ov_session = get_backend("openvino").load(model_path, device="CPU", precision="fp32", threads=1)
    assert ort_session.input_names == ov_session.input_names == ["ct"]
    assert ort_session.output_names == ov_session.output_names == ["logits"]
    x = _volume(shape, seed=sum(shape))
    a = ort_session.run({"ct": x})["logits"]
    b = ov_session.run({"ct": x})["logits"]
    assert a.shape == b.shape == (1, CHANNELS_OUT, *shape)
    np.testing.assert_allclose(a, _reference(x), atol=1e-4)
    np.testing.assert_allclose(b, a, atol=1e-4)


def test_one_openvino_session_serves_several_shapes(model_path: Path) -> None:
    """A study's slice count varies: the same session must take new shapes, and return fresh arrays."""
    session = get_backend("openvino").load(model_path, threads=1)
    first = session.run({"ct": _volume((6, 10, 10), 1)})["logits"]
    kept = first.copy()
    second = session.run({"ct": _volume((9, 8, 12), 2)})["logits"]
    assert second.shape == (1, CHANNELS_OUT, 9, 8, 12)
    np.testing.assert_array_equal(first, kept)  # not overwritten by the second call


def test_openvino_falls_back_to_per_shape_compiles(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a device (NPU, some GPUs) that refuses dynamic models: compile per shape instead."""
    from edgescreen.appliance.runtime import openvino_backend

    real = openvino_backend._core()
    compiled_shapes: list[str] = []

    class StaticOnlyCore:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def compile_model(self, model, device, config):
            if any(p.get_partial_shape().is_dynamic for p in model.inputs):
                raise RuntimeError("dynamic shapes are not supported by this device")
            compiled_shapes.append(str(model.inputs[0].get_partial_shape()))
            return real.compile_model(model, device, config)

    monkeypatch.setattr(openvino_backend, "_core", lambda: StaticOnlyCore())
    session = openvino_backend.BACKEND.load(model_path, threads=1)
    for shape in [(4, 6, 6), (5, 6, 7), (4, 6, 6)]:
        x = _volume(shape, 3)
        np.testing.assert_allclose(session.run({"ct": x})["logits"], _reference(x), atol=1e-4)
    assert compiled_shapes == ["[1,1,4,6,6]", "[1,1,5,6,7]"]  # the third call reused the first compile


def test_openvino_loads_an_ir(model_path: Path, tmp_path: Path) -> None:
    import openvino as ov

    xml = tmp_path / "conv3d.xml"
    ov.save_model(ov.Core().read_model(str(model_path)), str(xml), compress_to_fp16=False)
    session = get_backend("openvino").load(xml, threads=1)
    x = _volume((6, 8, 8), 4)
    np.testing.assert_allclose(session.run({"ct": x})["logits"], _reference(x), atol=1e-4)
    xml.with_suffix(".bin").unlink()
    with pytest.raises(FileNotFoundError, match="IR weights not found"):
        get_backend("openvino").load(xml)


# ---------------------------------------------------------------- choosing at run time


def _static_ir(model_path: Path, dest: Path, shape: tuple[int, int, int]) -> Path:
    """An OpenVINO IR with static spatial dims, as the optimiser builds them (the card's tile)."""
    import openvino as ov

    model = ov.Core().read_model(str(model_path))
    model.reshape({"ct": [1, 1, *shape]})
    ov.save_model(model, str(dest), compress_to_fp16=False)
    return dest


def test_the_bundles_artifact_is_used_when_it_loads(model_path: Path, tmp_path: Path) -> None:
    xml = _static_ir(model_path, tmp_path / "m.xml", (4, 6, 6))
    loaded = load_model("role", reference=model_path, first=Choice("bundle", "openvino", "CPU", "fp32", xml),
                        profile_candidates=[{"backend": "onnxruntime", "device": "CPU", "precision": "fp32"}])
    assert loaded.choice.source == "bundle" and loaded.choice.artifact == xml and loaded.refusals == []
    assert not loaded.fell_back and loaded.session.backend == "openvino"


def test_a_broken_bundle_artifact_falls_back_along_the_profile(model_path: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The bundle names a backend whose artifact fails to load (truncated IR weights, as a bad copy or a
    full disk leaves it): the profile's next runnable candidate takes over, each refusal with its reason."""
    xml = _static_ir(model_path, tmp_path / "m.xml", (4, 6, 6))
    bin_ = xml.with_suffix(".bin")
    bin_.write_bytes(bin_.read_bytes()[:10])
    profile = [{"backend": "tensorrt", "device": "GPU", "precision": "int8"},
               {"backend": "openvino", "device": "CPU", "precision": "int8"},
               {"backend": "openvino", "device": "NPU", "precision": "fp16"},
               {"backend": "openvino", "device": "CPU", "precision": "fp32"},
               {"backend": "onnxruntime", "device": "CPU", "precision": "fp32"}]
    with caplog.at_level(logging.WARNING, logger="edgescreen.appliance.runtime.select"):
        loaded = load_model("pancreas.stage1", reference=model_path,
                            first=Choice("bundle", "openvino", "CPU", "int8", xml), profile_candidates=profile)
    assert loaded.choice == Choice("profile", "openvino", "CPU", "fp32", model_path)
    assert loaded.fell_back
    reasons = {(r.source, r.backend, r.device, r.precision): r.reason for r in loaded.refusals}
    assert list(reasons) == [("bundle", "openvino", "CPU", "int8"), ("profile", "tensorrt", "GPU", "int8"),
                             ("profile", "openvino", "CPU", "int8"), ("profile", "openvino", "NPU", "fp16")]
    assert "m.xml" in loaded.refusals[0].artifact and reasons[("bundle", "openvino", "CPU", "int8")]
    assert "engine built on this GPU" in reasons[("profile", "tensorrt", "GPU", "int8")]
    assert "quantised IR" in reasons[("profile", "openvino", "CPU", "int8")]
    assert "no NPU device" in reasons[("profile", "openvino", "NPU", "fp16")]
    assert sum(1 for r in caplog.records if r.getMessage().startswith("backend refused")) == 4
    x = _volume((4, 6, 6), 9)
    np.testing.assert_allclose(loaded.session.run({"ct": x})["logits"], _reference(x), atol=1e-4)


def test_the_reference_runtime_is_the_last_resort(model_path: Path, tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    loaded = load_model("mammo", reference=model_path, first=Choice("bundle", "tensorrt", "GPU", "fp16", engine),
                        profile_candidates=[{"backend": "tensorrt", "device": "GPU", "precision": "fp16"}])
    assert loaded.choice == Choice("reference", *FALLBACK, model_path) and loaded.fell_back
    assert [r.source for r in loaded.refusals] == ["bundle", "profile"]


def test_nothing_loads_names_every_refusal(model_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x01garbage")
    with pytest.raises(NoBackend) as err:
        load_model("pancreas.stage2", reference=broken, first=Choice("requested", "openvino", "CPU", "fp32", broken))
    assert [r.source for r in err.value.refusals] == ["requested", "reference"]
    assert str(err.value).startswith("pancreas.stage2: no backend could load the model; requested openvino/CPU/fp32")


def test_a_missing_reference_model_is_an_install_error_not_a_fallback(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model("pancreas.stage1", reference=tmp_path / "gone.onnx")


def test_every_shipped_profile_runs_the_reference_model_here(model_path: Path) -> None:
    """Whatever a shipped profile lists, a box whose bundle broke keeps screening on this machine."""
    tomllib = pytest.importorskip("tomllib")
    from edgescreen.firmware_config import PROFILES_DIR

    for path in sorted(PROFILES_DIR.glob("*.toml")):
        candidates = tomllib.loads(path.read_text())["candidates"]
        missing = Choice("bundle", candidates[0]["backend"], candidates[0].get("device", "CPU"),
                         candidates[0]["precision"], model_path.with_name("gone.bin"))
        loaded = load_model("pancreas.stage1", reference=model_path, first=missing, profile_candidates=candidates)
        assert loaded.refusals[0].source == "bundle" and loaded.refusals[0].reason, path.name
        x = _volume((4, 4, 4), 1)
        np.testing.assert_allclose(loaded.session.run({"ct": x})["logits"], _reference(x), atol=1e-3)


def test_a_static_tile_ir_takes_another_tile_size(model_path: Path, tmp_path: Path) -> None:
    """The optimiser builds IRs at the card's tile; a bundle's window may ask for a larger one."""
    session = get_backend("openvino").load(_static_ir(model_path, tmp_path / "s.xml", (4, 6, 6)), threads=1)
    for shape in [(4, 6, 6), (8, 12, 12), (4, 6, 6)]:
        x = _volume(shape, 2)
        np.testing.assert_allclose(session.run({"ct": x})["logits"], _reference(x), atol=1e-4)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(model_path: Path, tmp_path: Path) -> None:
    ok, reason = get_backend("tensorrt").availability()
    if not ok:
        pytest.skip(reason)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("ct", (1, 1, 4, 4, 4), (1, 1, 8, 16, 16), (1, 1, 16, 32, 32))
    config.add_optimization_profile(profile)
    engine_path = tmp_path / "conv3d.engine"
    engine_path.write_bytes(bytes(builder.build_serialized_network(network, config)))

    with get_backend("tensorrt").load(engine_path, device="GPU", precision="fp32") as session:
        for shape in [(8, 16, 16), (5, 12, 20)]:
            x = _volume(shape, 5)
            # TF32 may be on for fp32 engines: 1e-3 rather than 1e-4
            np.testing.assert_allclose(session.run({"ct": x})["logits"], _reference(x), atol=1e-3)


# ---------------------------------------------------------------- TensorRT plumbing without a GPU


class _FakeCudart:
    """Just enough of cuda-python's runtime: device memory is a dict of bytearrays keyed by pointer."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self._next = 0x1000

    def cudaGetDeviceCount(self):
        return (0, 1)

    def cudaSetDevice(self, index):
        return (0,)

    def cudaStreamCreate(self):
        return (0, 7)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaMalloc(self, nbytes):
        self._next += 0x1000
        self.memory[self._next] = bytearray(nbytes)
        return (0, self._next)

    def cudaFree(self, ptr):
        del self.memory[ptr]
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        import ctypes

        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.memory[dst][:nbytes] = ctypes.string_at(src, nbytes)
        else:
            ctypes.memmove(dst, bytes(self.memory[src][:nbytes]), nbytes)
        return (0,)


def _fake_tensorrt(cudart: _FakeCudart):
    """A TensorRT 10 lookalike whose one engine computes y = 2x + 1 on float32 'ct' -> 'logits'."""
    import types

    trt = types.SimpleNamespace(__version__="10.3.0")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dtype: np.float32
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    class Context:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return len(shape) == 5

        def get_tensor_shape(self, name):
            return self.shapes["ct"]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream):
            assert isinstance(stream, int)
            n = int(np.prod(self.shapes["ct"]))
            x = np.frombuffer(bytes(cudart.memory[self.addresses["ct"]][: 4 * n]), dtype=np.float32)
            cudart.memory[self.addresses["logits"]][: 4 * n] = (2 * x + 1).astype(np.float32).tobytes()
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ["ct", "logits"][i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "ct" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return "float32"

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine() if blob == b"engine" else None

    trt.Runtime = Runtime
    return trt


def test_tensorrt_runner_plumbing_with_fake_libraries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TensorRT 10 call sequence (shapes, addresses, copies, growth, free) checked on any machine.

    Real numerics need a GPU (test_tensorrt_engine_matches_onnxruntime); this catches plumbing
    mistakes on the everyday machines, where that test skips.
    """
    from edgescreen.appliance.runtime import tensorrt_backend

    cudart = _FakeCudart()
    trt = _fake_tensorrt(cudart)
    monkeypatch.setattr(tensorrt_backend, "_import_tensorrt", lambda: (trt, None))
    monkeypatch.setattr(tensorrt_backend, "_import_cudart", lambda: cudart)
    assert tensorrt_backend.BACKEND.availability() == (True, "tensorrt 10.3.0; 1 CUDA device(s)")
    assert tensorrt_backend.BACKEND.device_availability("GPU.1")[1] == "tensorrt: no CUDA device 1 (this box has 1)"

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine")
    with tensorrt_backend.BACKEND.load(engine, device="GPU", precision="fp16") as session:
        assert (session.input_names, session.output_names, session.device) == (["ct"], ["logits"], "GPU.0")
        for shape in [(4, 4, 4), (6, 8, 8), (2, 3, 3)]:  # grows, then reuses the larger buffers
            x = _volume(shape, 9)
            np.testing.assert_allclose(session.run({"ct": x})["logits"], 2 * x + 1, rtol=1e-6)
        assert len(cudart.memory) == 2
        with pytest.raises(ValueError, match="outside the engine's profile"):
            session.run({"ct": np.zeros((4, 4), np.float32)})
    assert cudart.memory == {}  # close() freed every device buffer

    engine.write_bytes(b"built for another GPU")
    with pytest.raises(BackendUnavailable, match="rebuild it on this box"):
        tensorrt_backend.BACKEND.load(engine)
    with pytest.raises(BackendUnavailable, match="expects a serialized engine"):
        tensorrt_backend.BACKEND.load(_write_conv3d_model(tmp_path / "m.onnx"))


# ---------------------------------------------------------------- a job on a box whose bundle backend broke


def _signed_bundle_with_a_broken_backend(models_dir: Path, out: Path, key: Path) -> Path:
    """A signed bundle for the test models whose stage 1 names TensorRT (an engine built on another day's
    driver): signed and intact, but no box without that GPU stack can load it."""
    from edgescreen.optimize.bundle import write_bundle
    from edgescreen.optimize.report import markdown

    engine = out.parent / "stage1.engine"
    engine.write_bytes(b"a TensorRT engine from before the driver update")
    chosen = {}
    for role in ("pancreas.stage1", "pancreas.stage2", "pancreas.stage3"):
        source = models_dir / f"{role}.onnx"
        broken = role == "pancreas.stage1"
        entry = {"backend": "tensorrt" if broken else "onnxruntime", "device": "GPU" if broken else "CPU",
                 "precision": "fp16" if broken else "fp32", "gate": {"passed": True}}
        chosen[role] = {"artifact": engine if broken else source, "files": [engine] if broken else [source],
                        "card_path": models_dir / f"{role}.json", "card_file": source.name, "source": source,
                        "entry": entry}
    report = {"profile": "x86-cpu", "created_at": "-", "host": {"cpu": "-", "cores": 2}, "elapsed_s": 0.0,
              "select": "latency", "thresholds": {"dice_vs_fp32_min": 0.98, "dice_vs_truth_drop_max": 0.01,
                                                  "auc_drop_max": 0.005, "decision_agreement_min": 0.99,
                                                  "heatmap_corr_min": 0.95}, "models": []}
    write_bundle(out, profile="x86-cpu", chosen=chosen, report=report, render_md=markdown, key_path=key)
    return out


def test_a_job_completes_on_the_next_backend_when_the_bundles_fails(tmp_path: Path) -> None:
    """Issue 15 item 5 through the real worker: the bundle's stage-1 backend cannot load here, the job still
    finishes (on the profile's next backend running the reference model), its findings agree with the
    reference run within the accuracy gate, and the refusal is an event row the system page reads."""
    import json as _json

    from edgescreen.appliance.bundle import ensure_signing_key
    from edgescreen.appliance.config.site import Hardware, Scheduler, SiteConfig
    from edgescreen.appliance.context import AppContext
    from edgescreen.appliance.pipeline.analyze import AnalysisRequest, analyze_study
    from edgescreen.appliance.scheduler.worker import Worker
    from edgescreen.appliance.store import Store, jobs
    from tests.test_dicom_assembly import ingest
    from tests.test_pancreas_pipeline import write_study, write_test_models

    if get_backend("tensorrt").availability()[0]:
        pytest.skip("TensorRT loads here: this box cannot show the fallback")
    models_dir = write_test_models(tmp_path / "models")
    study = write_study(tmp_path / "study" / "ct")
    reference = analyze_study(AnalysisRequest(study, tmp_path / "reference", models_dir=models_dir))
    data_dir = tmp_path / "data"
    bundle = _signed_bundle_with_a_broken_backend(models_dir, tmp_path / "bundle", ensure_signing_key(data_dir))
    store = Store(data_dir)
    ingest(store, study)
    job_id = jobs.enqueue(store, reference["study_uid"], reference["series_uid"], "pancreas")
    config = SiteConfig(hardware=Hardware(bundle=str(bundle)), scheduler=Scheduler(store_quiet_s=0, idle_grace_s=0))
    ctx = AppContext(config=config, data_dir=data_dir)
    worker = Worker(ctx, poll_s=0.05)
    for _ in range(20):
        worker.step()
        if jobs.get(store, job_id)["state"] not in ("queued", "running"):
            break
    job = jobs.get(store, job_id)
    assert job["state"] == "done", str({k: job[k] for k in ("state", "waiting_reason", "error")})
    findings = _json.loads(store.query_one("SELECT findings FROM results WHERE job_id = ?", (job_id,))[0])
    stage1 = next(m for m in findings["models"] if m["role"] == "pancreas.stage1")
    assert stage1["backend"] != "tensorrt" and stage1["refused"][0]["source"] == "bundle"
    assert stage1["refused"][0]["backend"] == "tensorrt" and "tensorrt" in stage1["refused"][0]["reason"]
    assert all(not m["refused"] for m in findings["models"] if m["role"] != "pancreas.stage1")
    assert any("pancreas.stage1: running on" in w for w in findings["warnings"])
    # within the gate of the reference: the same triage, the same lesions, scores and volumes as FP32's
    assert findings["triage"] == reference["triage"]
    assert abs(findings["abnormal_probability"] - reference["abnormal_probability"]) <= 0.005
    assert len(findings["lesions"]) == len(reference["lesions"])
    assert findings["pancreas_volume_ml"] == pytest.approx(reference["pancreas_volume_ml"], rel=0.02)
    events = store.query("SELECT source, state, detail FROM events WHERE kind = 'backend'")
    assert [(e["source"], e["state"]) for e in events] == [("pancreas.stage1", "fallback")]
    detail = _json.loads(events[0]["detail"])
    assert detail["job"] == job_id and detail["refused"][0]["backend"] == "tensorrt"


def test_the_mammography_session_is_loaded_once_for_many_exams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker analyses exam after exam: the model session is loaded for the first and reused after
    (it was reloaded for every exam before), and the findings still name the model that ran."""
    from edgescreen.appliance.pipeline import analyze as analyze_mod
    from edgescreen.appliance.pipeline.analyze import AnalysisRequest, analyze_study
    from edgescreen.appliance.runtime import select
    from edgescreen.models.phantom.mg import write_mg_exam

    exam = tmp_path / "exam"
    write_mg_exam(exam, 11, "malignant")
    loads: list[str] = []
    real = select.load_model

    def counting(role: str, **kwargs: object) -> select.LoadedModel:
        loads.append(role)
        return real(role, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(analyze_mod, "_MODEL_CACHE", {})
    monkeypatch.setattr(select, "load_model", counting)
    first = analyze_study(AnalysisRequest([exam], tmp_path / "1"))
    second = analyze_study(AnalysisRequest([exam], tmp_path / "2"))
    assert loads == ["mammo"]
    assert second["models"] == first["models"] and second["models"][0]["backend"] == "onnxruntime"
    assert second["mammo"]["exam_score"] == first["mammo"]["exam_score"]
