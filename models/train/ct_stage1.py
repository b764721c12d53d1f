"""Train pancreas.stage1: nnU-Net-style 3D U-Net segmenting pancreas and 6 landmark organs at 3 mm.

PANDA's stage 1 localises the pancreas with nnU-Net; segmenting the neighbours too (liver, spleen,
kidneys, aorta, vertebrae) gives the network the anatomical context that separates pancreas from
bowel and vessels of the same density on non-contrast CT.

    python -m models.train.ct_stage1 [--volumes 120] [--steps 2600] [--out models]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.train.ct_common import ORGAN_NAMES, STAGE1, TRAIN_SEEDS, dice, sliding_window, window
from models.train.ct_data import collect, pipeline_noise, stage1_volume
from models.train.ct_export import (
    card_document,
    export_onnx,
    load_weights,
    recipe,
    save_checkpoint,
    seed_everything,
    write_card,
)
from models.train.ct_nets import UNet3D, n_params, soft_dice_loss, warmup_cosine

CHANNELS = (8, 16, 32, 64, 128)
ROLE = "pancreas.stage1"
VERSION = "0.2.0"


def build_model() -> UNet3D:
    return UNet3D(1, len(ORGAN_NAMES), CHANNELS)


def sample_patch(vol: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random training patch; half of them centred near the pancreas (nnU-Net foreground oversampling)."""
    hu, lab = vol["hu"], vol["labels"]
    patch = STAGE1.size
    pad = [(0, max(p - s, 0)) for s, p in zip(hu.shape, patch, strict=True)]
    if any(p[1] for p in pad):
        hu = np.pad(hu, pad, constant_values=-1000)
        lab = np.pad(lab, pad)
    if rng.random() < 0.5:
        zz, yy, xx = np.nonzero(lab == 1)
        i = int(rng.integers(len(zz)))
        centre = (zz[i], yy[i], xx[i])
        starts = [int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p))
                  for c, p, s in zip(centre, patch, hu.shape, strict=True)]
    else:
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(hu.shape, patch, strict=True)]
    sl = tuple(slice(a, a + p) for a, p in zip(starts, patch, strict=True))
    x = pipeline_noise(hu[sl].astype(np.float32), float(vol["noise_sigma"]), "stage1", rng)
    # intensity augmentation: scanner calibration offsets and gain drift of a few HU / percent
    x = x * float(rng.uniform(0.96, 1.04)) + float(rng.uniform(-12, 12))
    return window(x, STAGE1.hu_low, STAGE1.hu_high), lab[sl]


def train(
    n_volumes: int, steps: int, batch: int, seed: int, log_every: int = 50, init: Path | None = None, lr: float = 3e-3
) -> tuple[UNet3D, dict]:
    rng = seed_everything(seed)
    t0 = time.time()
    seeds, vols, skipped = collect(TRAIN_SEEDS[0], n_volumes, stage1_volume, stop=TRAIN_SEEDS[1])
    t_data = time.time() - t0
    print(f"stage1: {len(vols)} volumes ready in {t_data:.0f} s (generator rejected seeds {skipped})", flush=True)
    model = build_model()
    if init is not None:
        load_weights(model, init)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps)
    model.train()
    t1 = time.time()
    running = 0.0
    for step in range(1, steps + 1):
        xs, ys = zip(*(sample_patch(vols[int(rng.integers(len(vols)))], rng) for _ in range(batch)), strict=True)
        x = torch.from_numpy(np.stack(xs)[:, None])
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        logits = model(x)
        onehot = F.one_hot(y, len(ORGAN_NAMES)).permute(0, 4, 1, 2, 3).float()
        loss = F.cross_entropy(logits, y) + soft_dice_loss(torch.softmax(logits, 1)[:, 1:], onehot[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % log_every == 0:
            print(f"stage1 step {step}/{steps} loss {running / log_every:.3f} {time.time() - t1:.0f} s", flush=True)
            running = 0.0
    info = {"train_seconds": round(time.time() - t1, 1), "data_seconds": round(t_data, 1), "steps": steps,
            "batch": batch, "train_seeds": [seeds[0], seeds[-1]], "params": n_params(model), "skipped_seeds": skipped,
            "init": str(init) if init else None, "lr": lr, "seed": seed}
    return model, info


def validate(onnx_path: Path, seeds: list[int]) -> dict[str, float]:
    """Dice per organ with the exported ONNX graph on seeds outside the training range."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scores: dict[str, list[float]] = {n: [] for n in ORGAN_NAMES[1:]}
    _, vols, _ = collect(seeds[0], len(seeds), stage1_volume, stop=seeds[0] + 50)
    for vol in vols:
        img = window(vol["hu"].astype(np.float32), STAGE1.hu_low, STAGE1.hu_high)[None]
        probs = sliding_window(lambda t: sess.run(None, {"ct": t})[0], img, STAGE1.size, 0.5, len(ORGAN_NAMES))
        pred = probs.argmax(0)
        for k, n in enumerate(ORGAN_NAMES[1:], start=1):
            scores[n].append(dice(pred == k, vol["labels"] == k))
    return {n: float(np.mean(v)) for n, v in scores.items()}


def card(info: dict) -> dict:
    return card_document(
        ROLE, VERSION, "edgescreen pancreas stage 1: abdominal organ segmentation (nnU-Net-style 3D U-Net)",
        body={
            "inputs": [{"name": "ct", "layout": "NCDHW", "dtype": "float32", "shape": ["N", 1, "D", "H", "W"], "channels": ["ct"]}],
            "outputs": [{"name": "organs", "kind": "segmentation", "activation": "softmax", "classes": list(ORGAN_NAMES)}],
            "preprocessing": {
                "normalization": {"type": "hu_window", "low": STAGE1.hu_low, "high": STAGE1.hu_high},
                "target_spacing_mm": list(STAGE1.spacing_mm),
                "orientation": "LPS",
                "patch_size": list(STAGE1.size),
                "overlap": 0.5,
            },
        },
        training_data=(
            f"{info['n_volumes']} synthetic non-contrast abdominal CT phantoms from models.phantom.ct "
            f"(seeds {info['train_seeds'][0]}-{info['train_seeds'][1]}, about 1/3 normal, the rest with one lesion "
            "of the 8 classes), rendered at the target spacing. Calibration seeds 100000-100999, held-out 200000+."
            + recipe(info["steps"], info["batch"], info["lr"], info["seed"])
            + (f" This run resumed from {Path(info['init']).name} (lr {info['lr']}, {info['steps']} more steps)."
               if info.get("init") else "")
        ),
        metrics={"params": float(info["params"]), "train_seconds": info["train_seconds"],
                    "validation_dice_calibration_seeds": info.get("val_dice", {})},
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=120)
    ap.add_argument("--steps", type=int, default=2600)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--init", type=Path, default=None, help="resume from a .pt checkpoint or an exported .onnx")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    model, info = train(args.volumes, args.steps, args.batch, args.seed, init=args.init, lr=args.lr)
    info["n_volumes"] = args.volumes
    save_checkpoint(model, ROLE)
    onnx_path = args.out / f"{ROLE}.onnx"
    example = torch.rand((1, 1, *STAGE1.size), generator=torch.Generator().manual_seed(0))
    export_onnx(model, example, onnx_path, "ct", ["organs"], dynamic_spatial=True)
    info["val_dice"] = validate(onnx_path, [100_900 + i for i in range(4)])
    print(f"stage1 validation Dice (calibration seeds): {info['val_dice']}", flush=True)
    write_card(args.out / f"{ROLE}.json", card(info))
    print(f"stage1: wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB), {info}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
