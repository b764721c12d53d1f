"""Train pancreas.stage2: joint pancreas + lesion segmentation and abnormality classification on the pancreas crop.

PANDA's stage 2 learns "is there a lesion, and where" together, because the segmentation gives the
classifier a localised, explainable reason; segmenting the gland as well gives every crop, normal or
not, dense supervision (the lesion-only version 0.1.0, trained 600 steps, reached held-out lesion Dice
0.12 and AUC 0.67). Here the abnormality logit is built from the strongest
smoothed lesion evidence plus pooled bottleneck features (see ct_nets.LesionNet). The decision
threshold is set on calibration seeds (disjoint from training and held-out) at 99% specificity.

    python -m models.train.ct_stage2 [--studies 450] [--steps 2200] [--out models]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.train.ct_common import CALIB_SEEDS, LESION_CLASSES, STAGE2, TRAIN_SEEDS, sigmoid, window
from models.train.ct_data import collect, fine_crops, pipeline_noise, thick_slices
from models.train.ct_export import (
    card_document,
    export_onnx,
    recipe,
    save_checkpoint,
    seed_everything,
    write_card,
)
from models.train.ct_nets import LesionNet, n_params, soft_dice_loss, warmup_cosine

CHANNELS = (8, 16, 32, 64, 96)
ROLE = "pancreas.stage2"
VERSION = "0.2.0"
PATCH = (32, 64, 64)  # training sub-patch of the crop: cheaper steps, the net is fully convolutional
MIN_LESION_VOXELS = 20  # a patch holding fewer lesion voxels than this is not called abnormal
LR = 3e-3
UNIFORM_FRACTION = 0.25  # share of training patches drawn anywhere in the crop (nnU-Net samples 2/3 at random)
# calibration: normal renders of these seeds set the threshold; a few lesion renders report sensitivity
N_CALIB_NORMALS = 80
N_CALIB_LESIONS = 2 * len(LESION_CLASSES)
CALIB_NORMALS_FROM = CALIB_SEEDS[0]
CALIB_LESIONS_FROM = CALIB_SEEDS[0] + 500


def calib_lesion(seed: int) -> str:
    """Calibration lesion seeds cycle through the 8 classes (shared with stage 3's calibration)."""
    return LESION_CLASSES[(seed - CALIB_LESIONS_FROM) % len(LESION_CLASSES)]
TARGET_SPECIFICITY = 0.99


def build_model() -> LesionNet:
    return LesionNet(1, CHANNELS)


def prepare(hu: np.ndarray) -> np.ndarray:
    return window(hu.astype(np.float32), STAGE2.hu_low, STAGE2.hu_high)


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


def train(n_studies: int, steps: int, batch: int, seed: int, log_every: int = 50) -> tuple[LesionNet, dict]:
    rng = seed_everything(seed)
    t0 = time.time()
    seeds, items, skipped = collect(TRAIN_SEEDS[0], n_studies, fine_crops, stop=TRAIN_SEEDS[1])
    t_data = time.time() - t0
    n_les = sum(bool(it["s2_lesion"].any()) for it in items)
    print(f"stage2: {len(items)} crops ({n_les} with lesion) in {t_data:.0f} s; generator rejected {skipped}", flush=True)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps)
    model.train()
    t1 = time.time()
    running = np.zeros(3)
    for step in range(1, steps + 1):
        xs, ys, cs = zip(*(sample_patch(items[int(rng.integers(len(items)))], rng) for _ in range(batch)), strict=True)
        x = torch.from_numpy(np.stack(xs)[:, None])
        y = torch.from_numpy(np.stack(ys))
        c = torch.tensor(cs, dtype=torch.float32)[:, None]
        seg, cls = model(x)
        onehot = F.one_hot(y, len(LesionNet.SEG_CLASSES)).permute(0, 4, 1, 2, 3).float()
        seg_loss = F.cross_entropy(seg, y) + soft_dice_loss(torch.softmax(seg, 1)[:, 1:], onehot[:, 1:])
        cls_loss = F.binary_cross_entropy_with_logits(cls, c)
        loss = seg_loss + 0.5 * cls_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += [float(loss.detach()), float(seg_loss.detach()), float(cls_loss.detach())]
        if step % log_every == 0:
            r = running / log_every
            print(f"stage2 step {step}/{steps} loss {r[0]:.3f} seg {r[1]:.3f} cls {r[2]:.3f} {time.time() - t1:.0f} s", flush=True)
            running[:] = 0
    info = {"train_seconds": round(time.time() - t1, 1), "data_seconds": round(t_data, 1), "steps": steps,
            "batch": batch, "train_seeds": [seeds[0], seeds[-1]], "params": n_params(model), "n_studies": n_studies,
            "skipped_seeds": skipped, "seed": seed}
    return model, info


def onnx_scores(onnx_path: Path, items: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Abnormality probabilities of full crops through the exported graph (what the appliance runs)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = []
    for it in items:
        _, logit = sess.run(None, {"ct": prepare(it["s2_hu"])[None, None]})
        out.append(float(sigmoid(logit.reshape(-1)[0])))
    return np.array(out)


def calibrate(onnx_path: Path) -> dict[str, float | str]:
    """Threshold = smallest value above the 99% quantile of calibration normals; sensitivity on calib lesions."""
    ns, normals, _ = collect(CALIB_NORMALS_FROM, N_CALIB_NORMALS, fine_crops, lesion_of=lambda s: None, stop=CALIB_SEEDS[1])
    ls, lesions, _ = collect(CALIB_LESIONS_FROM, N_CALIB_LESIONS, fine_crops, lesion_of=calib_lesion, stop=CALIB_SEEDS[1])
    neg = onnx_scores(onnx_path, normals)
    pos = onnx_scores(onnx_path, lesions)
    k = int(np.ceil(TARGET_SPECIFICITY * len(neg)))  # at least k normals must fall below the threshold
    threshold = float(np.nextafter(np.sort(neg)[k - 1], 1.0))
    return {
        "threshold": threshold,
        "calibration_normals": float(len(neg)),
        "calibration_specificity": float(np.mean(neg < threshold)),
        "calibration_lesions": float(len(pos)),
        "calibration_sensitivity": float(np.mean(pos >= threshold)),
        "calibration_normal_seeds": f"{ns[0]}-{ns[-1]}",
        "calibration_lesion_seeds": f"{ls[0]}-{ls[-1]}",
    }


def card(info: dict, calib: dict) -> dict:
    return card_document(
        ROLE, VERSION, "edgescreen pancreas stage 2: pancreas + lesion segmentation and abnormality (multi-task 3D U-Net)",
        body={
            "inputs": [{"name": "ct", "layout": "NCDHW", "dtype": "float32", "shape": ["N", 1, *STAGE2.size], "channels": ["ct"]}],
            "outputs": [
                {"name": "lesion", "kind": "segmentation", "activation": "softmax", "classes": list(LesionNet.SEG_CLASSES)},
                {"name": "abnormal", "kind": "classification", "activation": "sigmoid", "classes": ["abnormal"]},
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
                "threshold": min(1.0, float(np.ceil(calib["threshold"] * 1e6) / 1e6)),  # never below the calibrated value
                "meaning": (
                    f"sigmoid(abnormal) >= threshold flags the study as suspicious; set on {int(calib['calibration_normals'])} "
                    f"calibration normals (seeds {calib['calibration_normal_seeds']}) for {TARGET_SPECIFICITY:.0%} specificity"
                ),
            },
        },
        training_data=(
            f"{info['n_studies']} synthetic non-contrast CT phantoms from models.phantom.ct (seeds "
            f"{info['train_seeds'][0]}-{info['train_seeds'][1]}, about 1/3 normal, the rest one lesion of the 8 classes), "
            "crops centred on the true pancreas bounding box. Calibration seeds "
            f"{calib['calibration_normal_seeds']} (normal) and {calib['calibration_lesion_seeds']} (lesions); held-out 200000+."
            + recipe(info["steps"], info["batch"], LR, info["seed"])
        ),
        metrics={"params": float(info["params"]), "train_seconds": info["train_seconds"], **calib},
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=450)
    ap.add_argument("--steps", type=int, default=2200)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1])
    args = ap.parse_args(argv)
    model, info = train(args.studies, args.steps, args.batch, args.seed)
    save_checkpoint(model, ROLE)
    onnx_path = args.out / f"{ROLE}.onnx"
    example = torch.rand((1, 1, *STAGE2.size), generator=torch.Generator().manual_seed(0))
    export_onnx(model, example, onnx_path, "ct", ["lesion", "abnormal"], dynamic_spatial=False)
    calib = calibrate(onnx_path)
    print(f"stage2 calibration: {calib}", flush=True)
    write_card(args.out / f"{ROLE}.json", card(info, calib))
    print(f"stage2: wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB), {info}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
