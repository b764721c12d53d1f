"""Train pancreas.stage1: nnU-Net-style 3D U-Net segmenting pancreas and 6 landmark organs at 3 mm.

PANDA's stage 1 localises the pancreas with nnU-Net; segmenting the neighbours too (liver, spleen,
kidneys, aorta, vertebrae) gives the network the anatomical context that separates pancreas from
bowel and vessels of the same density on non-contrast CT. It trains on the domain-randomised phantom
(``Acquisition.randomized``: contrast phases, kernels, 0.6-5 mm slices, dose, truncation, metal,
children, scans from the chest to the pelvis; the patient's crowded bowel, mesentery and pelvis), so
that on a real series it must find the gland among everything a real abdomen holds, not by its HU.

    python -m edgescreen.models.train.ct_stage1 [--n 120] [--steps 2600] [--init models/pancreas.stage1.onnx]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from edgescreen.appliance.pipeline.metrics import dice
from edgescreen.models.train import ct_trainer
from edgescreen.models.train.ct_common import ORGAN_NAMES, STAGE1, TRAIN_SEEDS, sliding_window, window
from edgescreen.models.train.ct_data import collect, pipeline_noise, stage1_training_volume, stage1_volume
from edgescreen.models.train.ct_export import FEATURES, card_document, recipe
from edgescreen.models.train.ct_nets import SegmentationWithFeatures, UNet3D, soft_dice_loss

CHANNELS = (8, 16, 32, 64, 128)
ROLE = "pancreas.stage1"
VERSION = "0.3.0"
NEAR_PANCREAS = 0.4  # share of patches centred near the gland; the rest anywhere, chest to pelvis
VALIDATION_SEEDS = tuple(100_900 + i for i in range(4))


def build_model() -> UNet3D:
    return UNet3D(1, len(ORGAN_NAMES), CHANNELS)


def sample_patch(vol: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random training patch: some centred near the pancreas (nnU-Net foreground oversampling), the rest anywhere."""
    hu, lab = vol["hu"], vol["labels"]
    patch = STAGE1.size
    pad = [(0, max(p - s, 0)) for s, p in zip(hu.shape, patch, strict=True)]
    if any(p[1] for p in pad):
        hu = np.pad(hu, pad, constant_values=-1000)
        lab = np.pad(lab, pad)
    zz, yy, xx = np.nonzero(lab == 1) if rng.random() < NEAR_PANCREAS else ((),) * 3
    if len(zz):
        i = int(rng.integers(len(zz)))
        centre = (zz[i], yy[i], xx[i])
        starts = [int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p))
                  for c, p, s in zip(centre, patch, hu.shape, strict=True)]
    else:
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(hu.shape, patch, strict=True)]
    sl = tuple(slice(a, a + p) for a, p in zip(starts, patch, strict=True))
    x = hu[sl].astype(np.float32)
    if rng.random() < 0.4:  # partial volume and soft kernels: edges a direct render draws too sharp
        x = ndimage.gaussian_filter(x, [float(rng.uniform(0.2, 0.8)) for _ in range(3)], mode="nearest")
    x = pipeline_noise(x, float(vol["noise_sigma"]), "stage1", rng)
    # intensity augmentation: scanner calibration offsets and gain drift
    x = x * float(rng.uniform(0.93, 1.07)) + float(rng.uniform(-15, 15))
    return window(x, STAGE1.hu_low, STAGE1.hu_high), lab[sl]


def validate(onnx_path: Path, seeds: tuple[int, ...] = VALIDATION_SEEDS) -> dict[str, float]:
    """Dice per organ with the exported ONNX graph on calibration seeds (validated-domain acquisition)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scores: dict[str, list[float]] = {n: [] for n in ORGAN_NAMES[1:]}
    _, vols, _ = collect(seeds[0], len(seeds), stage1_volume, stop=seeds[0] + 50)
    for vol in vols:
        img = window(vol["hu"].astype(np.float32), STAGE1.hu_low, STAGE1.hu_high)[None]
        probs = sliding_window(lambda t: sess.run(["organs"], {"ct": t})[0], img, STAGE1.size, 0.5, len(ORGAN_NAMES))
        pred = probs.argmax(0)
        for k, n in enumerate(ORGAN_NAMES[1:], start=1):
            scores[n].append(dice(pred == k, vol["labels"] == k))
    return {n: float(np.mean(v)) for n, v in scores.items()}


# Published real-CT figures the phantom was aimed at (and the card's domain states).
PHANTOM_SOURCES = (
    "Phantom aimed at published adult non-contrast CT figures: organ attenuation (liver 55-65 HU, spleen and "
    "pancreas 40-50 HU, kidney 30-40 HU, fat -120 to -80 HU; pancreas lower and lobulated with fatty infiltration "
    "with age); pancreas volume about 70 mL in adults, declining after 60 (Saisho Y. et al., Clin Anat 2007); "
    "pancreatic head at L2, body at L1, aortic bifurcation at L4; contrast enhancement of a biphasic pancreas "
    "protocol (aorta 250-350 HU arterial, liver 100-120 HU and portal vein 160-200 HU portal venous)."
)


class Stage1(ct_trainer.Stage):
    role, version = ROLE, VERSION
    n, steps, batch, seed, lr = 120, 2600, 2, 1, 3e-3
    output_names = ("organs", FEATURES)
    dynamic_spatial = True

    def build_model(self) -> torch.nn.Module:
        return build_model()

    def load(self, n: int) -> tuple[list[int], list[dict[str, np.ndarray]], list[int]]:
        return collect(TRAIN_SEEDS[0], n, stage1_training_volume, stop=TRAIN_SEEDS[1])

    def batch_loss(self, model: torch.nn.Module, items: list, rng: np.random.Generator, batch: int
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        xs, ys = zip(*(sample_patch(items[int(rng.integers(len(items)))], rng) for _ in range(batch)), strict=True)
        x = torch.from_numpy(np.stack(xs)[:, None])
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        logits = model(x)
        onehot = F.one_hot(y, len(ORGAN_NAMES)).permute(0, 4, 1, 2, 3).float()
        return F.cross_entropy(logits, y) + soft_dice_loss(torch.softmax(logits, 1)[:, 1:], onehot[:, 1:]), {}

    def example(self) -> torch.Tensor:
        return torch.rand((1, 1, *STAGE1.size), generator=torch.Generator().manual_seed(0))

    def export_view(self, model: torch.nn.Module) -> torch.nn.Module:
        return SegmentationWithFeatures(model)

    def check(self, onnx_path: Path) -> dict[str, Any]:
        return {"validation_dice_calibration_seeds": validate(onnx_path)}

    def card(self, info: dict[str, Any], checked: dict[str, Any]) -> dict[str, Any]:
        return card(info, checked)


def card(info: dict[str, Any], checked: dict[str, Any]) -> dict[str, Any]:
    return card_document(
        ROLE, VERSION, "edgescreen pancreas stage 1: abdominal organ segmentation (nnU-Net-style 3D U-Net)",
        body={
            "inputs": [{"name": "ct", "layout": "NCDHW", "dtype": "float32", "shape": ["N", 1, "D", "H", "W"], "channels": ["ct"]}],
            "outputs": [{"name": "organs", "kind": "segmentation", "activation": "softmax", "classes": list(ORGAN_NAMES)},
                        {"name": FEATURES, "kind": "features", "activation": "none", "size": CHANNELS[-1]}],
            "preprocessing": {
                "normalization": {"type": "hu_window", "low": STAGE1.hu_low, "high": STAGE1.hu_high},
                "target_spacing_mm": list(STAGE1.spacing_mm),
                "orientation": "LPS",
                "patch_size": list(STAGE1.size),
                "overlap": 0.5,
            },
            "domain": {
                "source": (f"domain-randomised synthetic CT phantoms (models.phantom.ct, Acquisition.randomized), seeds "
                           f"{info['train_seeds'][0]}-{info['train_seeds'][1]}. " + PHANTOM_SOURCES),
                "modality": ["CT"],
                "body_part": ["ABDOMEN", "ABDOMENPELVIS", "CHESTABDPELVIS", "PANCREAS"],
                "slice_thickness_mm": {"min": 0.6, "max": 5.0},
                "pixel_spacing_mm": {"min": 0.4, "max": 1.0},
                "kernel_family": ["soft", "standard", "sharp"],
                "contrast_phase": ["non_contrast", "arterial", "portal_venous", "delayed"],
            },
        },
        training_data=(
            f"{info['n']} domain-randomised synthetic abdominal CT phantoms from models.phantom.ct (seeds "
            f"{info['train_seeds'][0]}-{info['train_seeds'][1]}, about 1/3 normal, the rest with one lesion of the 8 "
            "classes), each scanned with Acquisition.randomized(seed): 60% non-contrast and 40% arterial, portal "
            "venous or delayed phase; soft, standard or sharp kernels; 0.625-5 mm slices; dose and calibration "
            "offsets; some truncated fields of view, spinal metal and children; scans of the abdomen, abdomen-pelvis "
            "(45%) and chest-abdomen-pelvis (25%), with a crowded bowel (collapsed, fluid, gas and mixed loops), "
            "mesentery, pelvic bones and organs. Rendered at the target spacing. Calibration seeds 100000-100999, "
            "held-out 200000+. " + PHANTOM_SOURCES
            + recipe(info["steps"], info["batch"], info["lr"], info["seed"])
            + (f" This run started from {Path(info['init']).name} (the previous model, trained on the narrower "
               f"phantom) and trained {info['steps']} more steps at lr {info['lr']:g}." if info.get("init") else "")
        ),
        metrics={"params": float(info["params"]), "train_seconds": info["train_seconds"], **checked},
    )


def main(argv: list[str] | None = None) -> int:
    return ct_trainer.main(Stage1(), argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
