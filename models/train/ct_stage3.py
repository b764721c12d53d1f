"""Train pancreas.stage3: lesion subtype classifier (PDAC or one of seven non-PDAC classes).

PANDA's stage 3 tells PDAC from PNET, SPT, IPMN, MCN, SCN, chronic pancreatitis and "other", because
the management differs. The input is a lesion-centred crop with two channels: the CT and the lesion
mask (from stage 2 in the appliance; the truth in training), so the net knows which blob to describe.

    python -m edgescreen.models.train.ct_stage3 [--n 300] [--steps 4000] [--out models]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgescreen.appliance.pipeline.activations import softmax
from edgescreen.models.train import ct_trainer
from edgescreen.models.train.ct_common import CALIB_SEEDS, LESION_CLASSES, STAGE3, TRAIN_SEEDS, window
from edgescreen.models.train.ct_data import collect, fine_crops, pipeline_noise, thick_slices, training_lesion
from edgescreen.models.train.ct_export import card_document, recipe
from edgescreen.models.train.ct_nets import LesionClassifier
from edgescreen.models.train.ct_stage2 import CALIB_LESIONS_FROM, N_CALIB_LESIONS, calib_lesion

CHANNELS = (16, 32, 64, 128)  # each block strides: 48x64x64 -> 3x4x4
ROLE = "pancreas.stage3"
VERSION = "0.2.0"


def build_model() -> LesionClassifier:
    return LesionClassifier(2, len(LESION_CLASSES), CHANNELS)


def prepare(hu: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(2, D, H, W): windowed CT and the lesion mask, the two channels the card declares."""
    return np.stack([window(hu.astype(np.float32), STAGE3.hu_low, STAGE3.hu_high), mask.astype(np.float32)])


def augment(item: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Pipeline noise and thick slices (as stage 2), HU gain/offset, flips (no handedness), a small shift."""
    hu = pipeline_noise(item["s3_hu"].astype(np.float32), float(item["noise_sigma"]), "fine", rng)
    hu = thick_slices(hu, float(item["thickness"]), STAGE3.spacing_mm[0], rng)
    hu = hu * float(rng.uniform(0.97, 1.03)) + float(rng.uniform(-10, 10))
    x = prepare(hu, item["s3_lesion"])
    for ax in (1, 2, 3):
        if rng.random() < 0.5:
            x = np.flip(x, axis=ax)
    shift = [int(v) for v in rng.integers(-3, 4, size=3)]
    return np.ascontiguousarray(np.roll(x, shift, axis=(1, 2, 3)))


def validate(onnx_path: Path) -> dict[str, float | str]:
    """Accuracy on stage 2's calibration lesion seeds (2 per class: a quick sanity check, not the report)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    seeds, items, _ = collect(CALIB_LESIONS_FROM, N_CALIB_LESIONS, fine_crops, lesion_of=calib_lesion, stop=CALIB_SEEDS[1])
    hits = []
    for s, it in zip(seeds, items, strict=True):
        probs = softmax(sess.run(None, {"ct_lesion": prepare(it["s3_hu"], it["s3_lesion"])[None]})[0], axis=1)
        hits.append(int(probs.argmax()) == LESION_CLASSES.index(calib_lesion(s)))
    return {"calibration_accuracy": float(np.mean(hits)), "calibration_lesions": float(len(hits)),
            "calibration_lesion_seeds": f"{seeds[0]}-{seeds[-1]}"}


class Stage3(ct_trainer.Stage):
    role, version = ROLE, VERSION
    n, steps, batch, seed, lr = 300, 4000, 8, 3, 2e-3
    weight_decay = 1e-3
    input_name = "ct_lesion"
    output_names = ("subtype",)

    def build_model(self) -> torch.nn.Module:
        return build_model()

    def load(self, n: int) -> tuple[list[int], list[dict[str, np.ndarray]], list[int]]:
        seeds, items, skipped = collect(TRAIN_SEEDS[0], n, fine_crops, lesion_of=lambda s: training_lesion(s) or False,
                                        stop=TRAIN_SEEDS[1])
        self.labels = [LESION_CLASSES.index(training_lesion(s)) for s in seeds]
        return seeds, items, skipped

    def describe(self, items: list, seeds: list[int]) -> dict[str, Any]:
        return {"per_class": np.bincount(self.labels, minlength=len(LESION_CLASSES)).tolist()}

    def batch_loss(self, model: torch.nn.Module, items: list, rng: np.random.Generator, batch: int
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        idx = rng.integers(len(items), size=batch)
        x = torch.from_numpy(np.stack([augment(items[i], rng) for i in idx]))
        y = torch.tensor([self.labels[i] for i in idx])
        return F.cross_entropy(model(x), y, label_smoothing=0.05), {}

    def example(self) -> torch.Tensor:
        return torch.rand((1, 2, *STAGE3.size), generator=torch.Generator().manual_seed(0))

    def check(self, onnx_path: Path) -> dict[str, Any]:
        return validate(onnx_path)

    def card(self, info: dict[str, Any], checked: dict[str, Any]) -> dict[str, Any]:
        return card(info, checked)


def card(info: dict[str, Any], val: dict[str, Any]) -> dict[str, Any]:
    return card_document(
        ROLE, VERSION, "edgescreen pancreas stage 3: lesion subtype classifier (3D CNN)",
        body={
            "inputs": [{"name": "ct_lesion", "layout": "NCDHW", "dtype": "float32", "shape": ["N", 2, *STAGE3.size],
                        "channels": ["ct", "lesion_mask"]}],
            "outputs": [{"name": "subtype", "kind": "classification", "activation": "softmax", "classes": list(LESION_CLASSES)}],
            "preprocessing": {
                "normalization": {"type": "hu_window", "low": STAGE3.hu_low, "high": STAGE3.hu_high},
                "target_spacing_mm": list(STAGE3.spacing_mm),
                "orientation": "LPS",
                "crop_size": list(STAGE3.size),
            },
        },
        training_data=(
            f"{info['n']} synthetic non-contrast CT phantoms with one lesion each from models.phantom.ct (lesion "
            f"seeds within {info['train_seeds'][0]}-{info['train_seeds'][1]}, per class {info['per_class']} in the order "
            f"{list(LESION_CLASSES)}), crops centred on the true lesion bounding box, true lesion mask as channel 2. "
            f"Calibration seeds {val['calibration_lesion_seeds']}; held-out 200000+."
            + recipe(info["steps"], info["batch"], info["lr"], info["seed"])
            + (f" This run started from {Path(info['init']).name} (the previous model, trained on an earlier phantom) "
               f"and trained {info['steps']} more steps on renders of the current phantom." if info.get("init") else "")
        ),
        metrics={"params": float(info["params"]), "train_seconds": info["train_seconds"], **val},
    )


def main(argv: list[str] | None = None) -> int:
    return ct_trainer.main(Stage3(), argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
