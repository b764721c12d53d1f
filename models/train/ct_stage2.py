"""Train pancreas.stage2: joint pancreas + lesion segmentation and abnormality classification on the pancreas crop.

PANDA's stage 2 learns "is there a lesion, and where" together, because the segmentation gives the
classifier a localised, explainable reason; segmenting the gland as well gives every crop, normal or
not, dense supervision (the lesion-only version 0.1.0, trained 600 steps, reached held-out lesion Dice
0.12 and AUC 0.67). Here the abnormality logit is built from the strongest smoothed lesion evidence
plus pooled bottleneck features (see ct_nets.LesionNet). Operating points (99%, 95%, 90% specificity,
95% sensitivity) are set on calibration seeds, disjoint from training and held-out ones; 99%
specificity is the default.

    python -m edgescreen.models.train.ct_stage2 [--n 450] [--steps 2200] [--init models/pancreas.stage2.onnx]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgescreen.appliance.pipeline.activations import sigmoid
from edgescreen.appliance.pipeline.metrics import threshold_for_sensitivity, threshold_for_specificity
from edgescreen.models.train import ct_trainer
from edgescreen.models.train.ct_common import CALIB_SEEDS, LESION_CLASSES, STAGE2, TRAIN_SEEDS, window
from edgescreen.models.train.ct_data import collect, fine_crops, pipeline_noise, thick_slices, training_lesion
from edgescreen.models.train.ct_export import FEATURES, card_document, recipe
from edgescreen.models.train.ct_nets import LesionNet, soft_dice_loss

CHANNELS = (8, 16, 32, 64, 96)
ROLE = "pancreas.stage2"
VERSION = "0.3.0"
PATCH = (32, 64, 64)  # training sub-patch of the crop: cheaper steps, the net is fully convolutional
MIN_LESION_VOXELS = 20  # a patch holding fewer lesion voxels than this is not called abnormal
UNIFORM_FRACTION = 0.25  # share of training patches drawn anywhere in the crop (nnU-Net samples 2/3 at random)
# the near iso-attenuating solid lesions the previous model missed most (PNET 0.2, "other" 0.3 sensitivity
# at its threshold) are drawn this many times as often as the other studies
HARD_CLASSES = {"pnet": 2.0, "other": 2.0}
# calibration: normal renders of these seeds set the thresholds; lesion renders set sens95 and report sensitivity
N_CALIB_NORMALS = 80
N_CALIB_LESIONS = 2 * len(LESION_CLASSES)
CALIB_NORMALS_FROM = CALIB_SEEDS[0]
CALIB_LESIONS_FROM = CALIB_SEEDS[0] + 500
TARGET_SPECIFICITY = 0.99
OPERATING_POINTS = (("spec99", "specificity", 0.99), ("spec95", "specificity", 0.95), ("spec90", "specificity", 0.90),
                    ("sens95", "sensitivity", 0.95))


def calib_lesion(seed: int) -> str:
    """Calibration lesion seeds cycle through the 8 classes (shared with stage 3's calibration)."""
    return LESION_CLASSES[(seed - CALIB_LESIONS_FROM) % len(LESION_CLASSES)]


def build_model() -> LesionNet:
    return LesionNet(1, CHANNELS)


def prepare(hu: np.ndarray) -> np.ndarray:
    return window(hu.astype(np.float32), STAGE2.hu_low, STAGE2.hu_high)


class LesionNetWithFeatures(torch.nn.Module):
    """Export view: (lesion segmentation, abnormal logit, globally average-pooled bottleneck features)."""

    def __init__(self, net: LesionNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.net.with_features(x)


def sample_patch(item: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """A sub-patch of the crop: anywhere in it (a quarter of the time), else around the lesion or the gland.

    The uniform quarter shows the net the bowel, vessels and duodenum at the crop's edges: at inference
    it reads the whole crop, and a fluid-filled loop it never saw in training must not look like a cyst.
    """
    hu, les, pan = item["s2_hu"], item["s2_lesion"], item["s2_pancreas"]
    if rng.random() < UNIFORM_FRACTION:
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(hu.shape, PATCH, strict=True)]
    else:
        target = les if les.any() and rng.random() < 0.8 else pan
        if target.any():
            zz, yy, xx = np.nonzero(target)
            i = int(rng.integers(len(zz)))
            centre = (zz[i], yy[i], xx[i])
        else:
            centre = tuple(s // 2 for s in hu.shape)
        starts = [int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p))
                  for c, p, s in zip(centre, PATCH, hu.shape, strict=True)]
    sl = tuple(slice(a, a + p) for a, p in zip(starts, PATCH, strict=True))
    x = pipeline_noise(hu[sl].astype(np.float32), float(item["noise_sigma"]), "fine", rng)
    x = thick_slices(x, float(item["thickness"]), STAGE2.spacing_mm[0], rng)
    x = x * float(rng.uniform(0.97, 1.03)) + float(rng.uniform(-10, 10))
    lesion = les[sl] > 0
    y = np.where(lesion, 2, pan[sl] > 0).astype(np.int64)  # LesionNet.SEG_CLASSES: background, pancreas, lesion
    return window(x, STAGE2.hu_low, STAGE2.hu_high), y, float(lesion.sum() >= MIN_LESION_VOXELS)


def onnx_scores(onnx_path: Path, items: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Abnormality probabilities of full crops through the exported graph (what the appliance runs)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = []
    for it in items:
        (logit,) = sess.run(["abnormal"], {"ct": prepare(it["s2_hu"])[None, None]})
        out.append(float(sigmoid(logit.reshape(-1)[0])))
    return np.array(out)


def threshold_for(neg: np.ndarray, pos: np.ndarray, target: str, value: float) -> float:
    """The lowest threshold meeting the target on the calibration scores (flag when score >= threshold)."""
    if target == "specificity":
        return threshold_for_specificity(neg, value)
    return threshold_for_sensitivity(pos, value)


def calibrate(onnx_path: Path) -> dict[str, Any]:
    """Operating points on calibration normals (specificity targets) and lesions (sensitivity target)."""
    ns, normals, _ = collect(CALIB_NORMALS_FROM, N_CALIB_NORMALS, fine_crops, lesion_of=lambda s: None, stop=CALIB_SEEDS[1])
    ls, lesions, _ = collect(CALIB_LESIONS_FROM, N_CALIB_LESIONS, fine_crops, lesion_of=calib_lesion, stop=CALIB_SEEDS[1])
    neg, pos = onnx_scores(onnx_path, normals), onnx_scores(onnx_path, lesions)
    calib_set = (f"phantoms seeds {ns[0]}-{ns[-1]} ({len(neg)} normals), {ls[0]}-{ls[-1]} ({len(pos)} lesions, "
                 "2 per class), validated-domain acquisition")
    points = []
    for name, target, value in OPERATING_POINTS:
        # never below the calibrated value: round the threshold up to 6 decimals
        thr = min(1.0, float(np.ceil(threshold_for(neg, pos, target, value) * 1e6) / 1e6))
        points.append({"name": name, "target": target, "target_value": value, "threshold": thr, "calibration_set": calib_set,
                       "measured": {"specificity": float(np.mean(neg < thr)), "sensitivity": float(np.mean(pos >= thr)),
                                    "n_normal": float(len(neg)), "n_lesion": float(len(pos))}})
    default = points[0]
    return {
        "operating_points": points,
        "threshold": default["threshold"],
        "calibration_normals": float(len(neg)),
        "calibration_specificity": default["measured"]["specificity"],
        "calibration_lesions": float(len(pos)),
        "calibration_sensitivity": default["measured"]["sensitivity"],
        "calibration_normal_seeds": f"{ns[0]}-{ns[-1]}",
        "calibration_lesion_seeds": f"{ls[0]}-{ls[-1]}",
    }


class Stage2(ct_trainer.Stage):
    role, version = ROLE, VERSION
    n, steps, batch, seed, lr = 450, 2200, 2, 2, 3e-3
    output_names = ("lesion", "abnormal", FEATURES)

    def build_model(self) -> torch.nn.Module:
        return build_model()

    def load(self, n: int) -> tuple[list[int], list[dict[str, np.ndarray]], list[int]]:
        seeds, items, skipped = collect(TRAIN_SEEDS[0], n, fine_crops, stop=TRAIN_SEEDS[1])
        weights = np.array([HARD_CLASSES.get(training_lesion(s) or "", 1.0) for s in seeds])
        self.p = weights / weights.sum()
        return seeds, items, skipped

    def describe(self, items: list, seeds: list[int]) -> dict[str, Any]:
        return {"n_lesion": int(sum(bool(it["s2_lesion"].any()) for it in items)), "oversampled": HARD_CLASSES}

    def batch_loss(self, model: torch.nn.Module, items: list, rng: np.random.Generator, batch: int
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        picks = rng.choice(len(items), size=batch, p=self.p)
        xs, ys, cs = zip(*(sample_patch(items[int(i)], rng) for i in picks), strict=True)
        x = torch.from_numpy(np.stack(xs)[:, None])
        y = torch.from_numpy(np.stack(ys))
        c = torch.tensor(cs, dtype=torch.float32)[:, None]
        seg, cls = model(x)
        onehot = F.one_hot(y, len(LesionNet.SEG_CLASSES)).permute(0, 4, 1, 2, 3).float()
        seg_loss = F.cross_entropy(seg, y) + soft_dice_loss(torch.softmax(seg, 1)[:, 1:], onehot[:, 1:])
        cls_loss = F.binary_cross_entropy_with_logits(cls, c)
        return seg_loss + 0.5 * cls_loss, {"seg": float(seg_loss.detach()), "cls": float(cls_loss.detach())}

    def example(self) -> torch.Tensor:
        return torch.rand((1, 1, *STAGE2.size), generator=torch.Generator().manual_seed(0))

    def export_view(self, model: torch.nn.Module) -> torch.nn.Module:
        return LesionNetWithFeatures(model)

    def check(self, onnx_path: Path) -> dict[str, Any]:
        return calibrate(onnx_path)

    def card(self, info: dict[str, Any], checked: dict[str, Any]) -> dict[str, Any]:
        return card(info, checked)


def card(info: dict[str, Any], calib: dict[str, Any]) -> dict[str, Any]:
    calib = dict(calib)
    points = calib.pop("operating_points")
    return card_document(
        ROLE, info.get("version", VERSION), "edgescreen pancreas stage 2: pancreas + lesion segmentation and abnormality (multi-task 3D U-Net)",
        body={
            "inputs": [{"name": "ct", "layout": "NCDHW", "dtype": "float32", "shape": ["N", 1, *STAGE2.size], "channels": ["ct"]}],
            "outputs": [
                {"name": "lesion", "kind": "segmentation", "activation": "softmax", "classes": list(LesionNet.SEG_CLASSES)},
                {"name": "abnormal", "kind": "classification", "activation": "sigmoid", "classes": ["abnormal"]},
                {"name": FEATURES, "kind": "features", "activation": "none", "size": CHANNELS[-1]},
            ],
            "preprocessing": {
                "normalization": {"type": "hu_window", "low": STAGE2.hu_low, "high": STAGE2.hu_high},
                "target_spacing_mm": list(STAGE2.spacing_mm),
                "orientation": "LPS",
                "crop_size": list(STAGE2.size),
            },
            "decision": {
                "output": "abnormal",
                "class_name": "abnormal",
                "threshold": points[0]["threshold"],
                "meaning": (
                    f"sigmoid(abnormal) >= threshold flags the study as suspicious; set on {int(calib['calibration_normals'])} "
                    f"calibration normals (seeds {calib['calibration_normal_seeds']}) for {TARGET_SPECIFICITY:.0%} specificity"
                ),
            },
            "operating_points": points,
            "default_operating_point": points[0]["name"],
            "domain": {
                "source": (f"synthetic non-contrast CT phantoms (models.phantom.ct, validated-domain acquisition), seeds "
                           f"{info['train_seeds'][0]}-{info['train_seeds'][1]}"),
                "modality": ["CT"],
                "body_part": ["ABDOMEN", "ABDOMENPELVIS", "CHESTABDPELVIS", "PANCREAS"],
                "slice_thickness_mm": {"min": 1.0, "max": 5.0},
                "pixel_spacing_mm": {"min": 0.5, "max": 1.0},
                "kernel_family": ["standard"],
                "contrast_phase": ["non_contrast"],
            },
        },
        # a re-export of earlier weights (--export-only) states that run's own recipe, kept in its recipe file
        training_data=info.get("training_data") or (
            f"{info['n']} synthetic non-contrast CT phantoms from models.phantom.ct (seeds "
            f"{info['train_seeds'][0]}-{info['train_seeds'][1]}, about 1/3 normal, the rest one lesion of the 8 classes; "
            f"oversampled classes {info.get('oversampled', {})}), crops centred on the true pancreas bounding box. "
            f"Calibration seeds {calib['calibration_normal_seeds']} (normal) and {calib['calibration_lesion_seeds']} "
            "(lesions); held-out 200000+."
            + recipe(info["steps"], info["batch"], info["lr"], info["seed"])
            + (f" This run started from {Path(info['init']).name} (the previous model) and trained {info['steps']} "
               f"more steps at lr {info['lr']:g} on renders of the current phantom." if info.get("init") else "")
        ),
        metrics={"params": float(info["params"]), "train_seconds": info["train_seconds"], **calib},
    )


def main(argv: list[str] | None = None) -> int:
    return ct_trainer.main(Stage2(), argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
