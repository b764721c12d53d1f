"""Tiny torch-free ONNX models with cards and matching synthetic cases, for tests and self-checks.

Why these exist: the optimiser's tests must run in seconds on two cores and must not wait for the
reference models to be trained. A randomly initialised network makes a poor test subject, because its
argmax sits on a knife edge everywhere and any quantisation "fails". So each toy model adds a
*designed* path to a small random U-Net-like body: a 1x1 convolution whose logits pick the class by
intensity band (class = round(x * (C - 1)) for x in [0, 1]). The body (3x3x3 convolutions, instance
norm, leaky ReLU, strided conv, transposed conv, concat) gives the quantisers the same operator mix as
the real models; the designed path makes the output stable and the ground truth known, so a correct
INT8 build passes the gates and a perturbed one fails them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from scipy import ndimage

from edgescreen.optimize.calibration import Case

OPSET = 17


@dataclass(frozen=True)
class ToySpec:
    role: str
    kind: str  # "seg3d" | "cls3d"
    patch: tuple[int, int, int]
    n_classes: int
    width: int = 8


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _conv_block(nodes: list, inits: list, rng: np.random.Generator, x: str, cin: int, cout: int, tag: str,
                stride: int = 1) -> str:
    w = rng.normal(0, np.sqrt(2.0 / (cin * 27)), (cout, cin, 3, 3, 3))
    inits += [_init(f"{tag}.w", w), _init(f"{tag}.g", np.ones(cout)), _init(f"{tag}.b", np.zeros(cout))]
    nodes += [
        helper.make_node("Conv", [x, f"{tag}.w"], [f"{tag}.c"], pads=[1] * 6, strides=[stride] * 3),
        helper.make_node("InstanceNormalization", [f"{tag}.c", f"{tag}.g", f"{tag}.b"], [f"{tag}.n"], epsilon=1e-5),
        helper.make_node("LeakyRelu", [f"{tag}.n"], [f"{tag}.y"], alpha=0.01),
    ]
    return f"{tag}.y"


def _band_logits(nodes: list, inits: list, x: str, n: int, out: str, gain: float = 40.0) -> None:
    """logit_c = gain * (c x - c^2 / (2 (n - 1))): argmax_c is round(x (n - 1)) for x in [0, 1]."""
    c = np.arange(n, dtype=np.float32)
    inits += [_init("band.w", (gain * c).reshape(n, 1, 1, 1, 1)), _init("band.b", -gain * c**2 / (2 * (n - 1)))]
    nodes.append(helper.make_node("Conv", [x, "band.w", "band.b"], [out]))


def build_toy_onnx(spec: ToySpec, path: Path, seed: int = 0) -> Path:
    """Write the toy model: dynamic batch and spatial dims, like the exported reference models."""
    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: list = []
    w = spec.width
    e1 = _conv_block(nodes, inits, rng, "image", 1, w, "enc1")
    e2 = _conv_block(nodes, inits, rng, e1, w, 2 * w, "enc2", stride=2)
    if spec.kind == "seg3d":
        inits += [_init("up.w", rng.normal(0, 0.1, (2 * w, w, 2, 2, 2))), _init("up.b", np.zeros(w))]
        nodes += [
            helper.make_node("ConvTranspose", [e2, "up.w", "up.b"], ["up.y"], strides=[2, 2, 2]),
            helper.make_node("Concat", ["up.y", e1], ["cat"], axis=1),
        ]
        d1 = _conv_block(nodes, inits, rng, "cat", 2 * w, w, "dec1")
        inits += [_init("head.w", rng.normal(0, 0.05, (spec.n_classes, w, 1, 1, 1))), _init("head.b", np.zeros(spec.n_classes))]
        nodes.append(helper.make_node("Conv", [d1, "head.w", "head.b"], ["head.y"]))
        _band_logits(nodes, inits, "image", spec.n_classes, "band.y")
        nodes.append(helper.make_node("Add", ["band.y", "head.y"], ["logits"]))
        out_shape: list = ["N", spec.n_classes, "D", "H", "W"]
    else:
        # mean intensity picks the class; the body adds a small learned-looking perturbation
        nodes.append(helper.make_node("GlobalAveragePool", ["image"], ["gap.x"]))
        _band_logits(nodes, inits, "gap.x", spec.n_classes, "band.y", gain=200.0)
        nodes += [helper.make_node("GlobalAveragePool", [e2], ["gap.f"]),
                  helper.make_node("Flatten", ["gap.f"], ["flat.f"], axis=1),
                  helper.make_node("Flatten", ["band.y"], ["flat.b"], axis=1)]
        inits += [_init("fc.w", rng.normal(0, 0.05, (2 * w, spec.n_classes))), _init("fc.b", np.zeros(spec.n_classes))]
        nodes += [helper.make_node("Gemm", ["flat.f", "fc.w", "fc.b"], ["fc.y"]),
                  helper.make_node("Add", ["flat.b", "fc.y"], ["logits"])]
        out_shape = ["N", spec.n_classes]
    graph = helper.make_graph(
        nodes, f"toy_{spec.kind}",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgescreen-toy")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def perturb_onnx(src: Path, dest: Path, scale: float, seed: int = 1) -> Path:
    """A deliberately broken copy: every weight gets relative Gaussian noise of ``scale``."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init).astype(np.float32)
        noisy = arr + rng.normal(0, scale, arr.shape).astype(np.float32) * (np.abs(arr).mean() + 1e-3)
        init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(dest))
    return dest


def toy_card(spec: ToySpec, onnx_name: str) -> dict:
    """A card that passes the appliance's schema, so the optimiser is tested on the real contract."""
    classes = [f"class{i}" for i in range(spec.n_classes)]
    if spec.kind == "seg3d":
        classes[0] = "background"
        outputs = [{"name": "logits", "kind": "segmentation", "activation": "softmax", "classes": classes}]
        pre = {"normalization": {"type": "hu_window", "low": 0.0, "high": 1.0}, "target_spacing_mm": [3.0, 3.0, 3.0],
               "patch_size": list(spec.patch), "overlap": 0.5}
    else:
        outputs = [{"name": "logits", "kind": "classification", "activation": "softmax", "classes": classes}]
        pre = {"normalization": {"type": "hu_window", "low": 0.0, "high": 1.0}, "target_spacing_mm": [1.25, 1.25, 1.25],
               "crop_size": list(spec.patch)}
    return {
        "schema_version": 1, "role": spec.role, "name": f"toy-{spec.kind}", "version": "0.0.1", "file": onnx_name,
        "inputs": [{"name": "image", "layout": "NCDHW", "shape": ["N", 1, "D", "H", "W"], "channels": ["ct"]}],
        "outputs": outputs, "preprocessing": pre,
        "intended_use": "tests only", "training_data": "none: designed weights", "licence": "test",
        "not_for_clinical_use": True,
    }


def write_toy_model(spec: ToySpec, models_dir: Path, seed: int = 0) -> Path:
    """ONNX + card in ``models_dir`` as ``<role>.onnx`` / ``<role>.json``; returns the card path."""
    from edgescreen.appliance.modelcard import sha256_file

    onnx_path = build_toy_onnx(spec, models_dir / f"{spec.role}.onnx", seed=seed)
    card = toy_card(spec, onnx_path.name)
    card["sha256"] = sha256_file(onnx_path)
    card_path = models_dir / f"{spec.role}.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card_path


def toy_case(spec: ToySpec, seed: int) -> Case:
    """A smooth random volume in [0, 1] and its truth (intensity bands, or the mean's band)."""
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.normal(0, 1, spec.patch), 3.0)
    vol = (vol - vol.min()) / (np.ptp(vol) + 1e-6)
    if spec.kind == "cls3d":
        # shift the mean so every class occurs; keep it away from band edges
        target = (seed % spec.n_classes) / (spec.n_classes - 1)
        vol = np.clip(vol - vol.mean() + target, 0, 1) * 0.3 + target * 0.7
    x = vol.astype(np.float32)[None, None]
    bands = np.rint(x[0, 0] * (spec.n_classes - 1)).astype(np.int64)
    if spec.kind == "seg3d":
        truth: dict = {"logits": bands}
    else:
        onehot = np.zeros(spec.n_classes, dtype=np.int64)
        onehot[int(np.rint(float(x.mean()) * (spec.n_classes - 1)))] = 1
        truth = {"logits": onehot}
    label = f"band{int(np.argmax(truth['logits']))}" if spec.kind == "cls3d" else None
    return Case(seed=seed, inputs={"image": x}, truth=truth, lesion=label)


def toy_volume(spec: ToySpec, seed: int, scale: int = 2) -> Any:
    """A whole volume for a tiled toy model (``scale`` x its patch on each axis) and its band truth, as
    optimize.window's held-out volumes are."""
    from edgescreen.optimize.window import VolumeCase

    rng = np.random.default_rng(seed)
    shape = tuple(p * scale for p in spec.patch)
    vol = ndimage.gaussian_filter(rng.normal(0, 1, shape), 3.0)
    vol = ((vol - vol.min()) / (np.ptp(vol) + 1e-6)).astype(np.float32)
    return VolumeCase(seed, None, {"image": vol[None]}, np.rint(vol * (spec.n_classes - 1)).astype(np.uint8))
