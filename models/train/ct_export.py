"""ONNX export, onnxruntime cross-check and model-card writing for the pancreas models.

Export uses the TorchScript exporter (``dynamo=False``): it needs no onnxscript, yields plain opset-17
graphs and supports named dynamic axes. Every export is run once in onnxruntime against torch on the
same input; a mismatch aborts, so a card never points at a graph that computes something else.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgescreen.appliance.modelcard import ModelCard, sha256_file

OPSET = 17
FEATURES = "features"  # the pooled-encoder output every retrained model carries (card-contract.md section 1)
MAX_BYTES = 20 * 1024 * 1024
LICENCE = "Proprietary: edgescreen project licence (see pyproject.toml); trained weights carry the same licence"
INTENDED_USE = (
    "Research, demonstration and pipeline validation only. Trained exclusively on synthetic CT phantoms "
    "(models.phantom.ct); it has never seen a patient and must not be used for diagnosis, screening or "
    "treatment decisions."
)
CITATION = (
    "Architecture after PANDA: Cao K. et al., Large-scale pancreatic cancer detection via non-contrast CT "
    "and deep learning, Nature Medicine 29, 3033-3043 (2023); nnU-Net: Isensee F. et al., Nature Methods 18, "
    "203-211 (2021)."
)


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: list[str],
    dynamic_spatial: bool,
) -> None:
    """Export in eval mode, then check onnxruntime agrees with torch (max abs diff <= 1e-3)."""
    model.eval()
    axes: dict[str, dict[int, str]] = {input_name: {0: "N"}}
    if dynamic_spatial:
        axes[input_name].update({2: "D", 3: "H", 4: "W"})
    for name in output_names:
        axes[name] = {0: "N"}
        if dynamic_spatial and name != FEATURES:
            axes[name].update({2: "D", 3: "H", 4: "W"})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(tmp), input_names=[input_name], output_names=output_names,
            opset_version=OPSET, dynamic_axes=axes, dynamo=False, do_constant_folding=True,
        )
    os.replace(tmp, path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise RuntimeError(f"{path} is {size} bytes, over the {MAX_BYTES} byte budget")
    verify_onnx(model, example, path, input_name, output_names)


def verify_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names: list[str]) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(output_names, {input_name: example.numpy()})
    with torch.no_grad():
        want = model(example)
    if isinstance(want, torch.Tensor):
        want = (want,)
    worst = 0.0
    for name, g, w in zip(output_names, got, want, strict=True):
        if g.shape != tuple(w.shape):
            raise RuntimeError(f"{path}: output {name} shape {g.shape} != torch {tuple(w.shape)}")
        ref = w.numpy()
        # relative to the logits' scale: float32 kernels differ by ~1e-6 relative, summed over deep graphs
        worst = max(worst, float(np.abs(g - ref).max()) / max(1.0, float(np.abs(ref).max())))
    if worst > 1e-3:
        raise RuntimeError(f"{path}: onnxruntime differs from torch by {worst:.2e} (relative)")
    return worst


def save_checkpoint(model: torch.nn.Module, role: str) -> Path:
    """Keep the trained weights before export, so a failed export never costs a training run."""
    path = Path(__file__).resolve().parents[1] / "data" / "checkpoints" / f"{role}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_card(path: Path, card: dict[str, Any]) -> ModelCard:
    """Validate with the appliance's own schema, stamp sha256 of the ONNX file, write atomically."""
    card = dict(card)
    card["sha256"] = sha256_file(path.parent / card["file"])
    validated = ModelCard.model_validate(card)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, path)
    return validated


def card_document(role: str, version: str, name: str, body: dict[str, Any], training_data: str,
                  metrics: dict[str, Any]) -> dict[str, Any]:
    """A pancreas model card: the stage's own ``body`` (inputs, outputs, preprocessing, decision) between the
    fields every reference card shares (identity, intended use, licence, not-for-clinical-use), in card order."""
    return {
        "schema_version": 1, "role": role, "name": name, "version": version, "file": f"{role}.onnx",
        **body,
        "intended_use": INTENDED_USE, "training_data": training_data, "licence": LICENCE, "citation": CITATION,
        "not_for_clinical_use": True, "metrics": metrics,
    }


def recipe(steps: int, batch: int, lr: float, seed: int) -> str:
    """One sentence for a card's training_data: what a reader needs to repeat or judge the run."""
    from edgescreen.models.train.ct_data import phantom_fingerprint

    return (f" Recipe: {steps} steps of batch {batch}, AdamW lr {lr:g} with warm-up and cosine decay, seed {seed}, "
            f"{train_threads()} torch thread(s), phantom generator revision {phantom_fingerprint()}.")


def train_threads() -> int:
    """Torch threads for training: 2 at most (shared 2-core machine); EDGESCREEN_TRAIN_THREADS=1 when crowded."""
    return max(1, min(2, int(os.environ.get("EDGESCREEN_TRAIN_THREADS", "2"))))


def seed_everything(seed: int, threads: int | None = None) -> np.random.Generator:
    """Deterministic training on CPU: fixed seeds, fixed thread count, deterministic kernels."""
    threads = threads or train_threads()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return np.random.default_rng(seed)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Initialise ``model`` from a checkpoint (.pt state dict) or an exported ONNX file of the same net.

    The TorchScript exporter keeps parameter names as ONNX initializer names, so an ONNX file is a
    complete record of the weights: training can resume from a shipped model.
    """
    if path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        # a model exported inside an export wrapper (SegmentationWithFeatures, LesionNetWithFeatures) carries
        # the wrapper's attribute name as a prefix
        def find(key: str) -> np.ndarray:
            for name in (key, f"unet.{key}", f"net.{key}"):
                if name in inits:
                    return inits[name]
            raise KeyError(f"{path}: no initializer for parameter {key}")

        state = {k: torch.from_numpy(find(k).copy()) for k in model.state_dict()}
    else:
        state = torch.load(path, map_location="cpu")
    model.load_state_dict(state)
