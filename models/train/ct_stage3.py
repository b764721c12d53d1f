"""Train pancreas.stage3: lesion subtype classifier (PDAC or one of seven non-PDAC classes).

PANDA's stage 3 tells PDAC from PNET, SPT, IPMN, MCN, SCN, chronic pancreatitis and "other", because
the management differs. The input is a lesion-centred crop with two channels: the CT and the lesion
mask (from stage 2 in the appliance; the truth in training), so the net knows which blob to describe.

    python -m models.train.ct_stage3 [--studies 300] [--steps 4000] [--out models]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.train.ct_common import CALIB_SEEDS, LESION_CLASSES, STAGE3, TRAIN_SEEDS, softmax, window
from models.train.ct_data import collect, fine_crops, pipeline_noise, thick_slices, training_lesion
from models.train.ct_export import (
    card_document,
    export_onnx,
    recipe,
    save_checkpoint,
    seed_everything,
    write_card,
)
from models.train.ct_nets import LesionClassifier, n_params, warmup_cosine
from models.train.ct_stage2 import CALIB_LESIONS_FROM, N_CALIB_LESIONS, calib_lesion

CHANNELS = (16, 32, 64, 128)  # each block strides: 48x64x64 -> 3x4x4
ROLE = "pancreas.stage3"
VERSION = "0.2.0"
LR = 2e-3


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


def train(n_studies: int, steps: int, batch: int, seed: int, log_every: int = 50) -> tuple[LesionClassifier, dict]:
    rng = seed_everything(seed)
    t0 = time.time()
    seeds, items, skipped = collect(TRAIN_SEEDS[0], n_studies, fine_crops,
                                    lesion_of=lambda s: training_lesion(s) or False, stop=TRAIN_SEEDS[1])
    data = [(it, LESION_CLASSES.index(training_lesion(s))) for s, it in zip(seeds, items, strict=True)]
    t_data = time.time() - t0
    counts = np.bincount([y for _, y in data], minlength=len(LESION_CLASSES))
    print(f"stage3: {len(data)} lesion crops in {t_data:.0f} s, per class {counts.tolist()}", flush=True)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-3)
    sched = warmup_cosine(opt, steps)
    model.train()
    t1 = time.time()
    running = 0.0
    for step in range(1, steps + 1):
        idx = rng.integers(len(data), size=batch)
        x = torch.from_numpy(np.stack([augment(data[i][0], rng) for i in idx]))
        y = torch.tensor([data[i][1] for i in idx])
        loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % log_every == 0:
            print(f"stage3 step {step}/{steps} loss {running / log_every:.3f} {time.time() - t1:.0f} s", flush=True)
            running = 0.0
    info = {"train_seconds": round(time.time() - t1, 1), "data_seconds": round(t_data, 1), "steps": steps, "batch": batch,
            "train_seeds": [seeds[0], seeds[-1]], "params": n_params(model), "n_studies": len(seeds),
            "per_class": counts.tolist(), "skipped_seeds": skipped, "seed": seed}
    return model, info


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


def card(info: dict, val: dict) -> dict:
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
            f"{info['n_studies']} synthetic non-contrast CT phantoms with one lesion each from models.phantom.ct (lesion "
            f"seeds within {info['train_seeds'][0]}-{info['train_seeds'][1]}, per class {info['per_class']} in the order "
            f"{list(LESION_CLASSES)}), crops centred on the true lesion bounding box, true lesion mask as channel 2. "
            f"Calibration seeds {val['calibration_lesion_seeds']}; held-out 200000+."
            + recipe(info["steps"], info["batch"], LR, info["seed"])
        ),
        metrics={"params": float(info["params"]), "train_seconds": info["train_seconds"], **val},
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=300, help="lesion studies (the lesion seeds among stage 2's)")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1])
    args = ap.parse_args(argv)
    model, info = train(args.studies, args.steps, args.batch, args.seed)
    save_checkpoint(model, ROLE)
    onnx_path = args.out / f"{ROLE}.onnx"
    example = torch.rand((1, 2, *STAGE3.size), generator=torch.Generator().manual_seed(0))
    export_onnx(model, example, onnx_path, "ct_lesion", ["subtype"], dynamic_spatial=False)
    val = validate(onnx_path)
    print(f"stage3 calibration: {val}", flush=True)
    write_card(args.out / f"{ROLE}.json", card(info, val))
    print(f"stage3: wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB), {info}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
