"""Shared, torch-free helpers for the PANDA-style pancreas models: seeds, spacings, windows, geometry.

Everything here is numpy/scipy only, so the evaluation (models/evaluate.py) and the tests can use the
same preprocessing as training without importing torch (the appliance never needs torch). The
preprocessing deliberately mirrors what the appliance pipeline does from the model card:
  * resampling: ``scipy.ndimage.zoom(order=1)`` from the series spacing to ``target_spacing_mm``
    (labels with ``order=0``), zoom factor = source spacing / target spacing;
  * ``hu_window`` normalisation: clip HU to [low, high], then scale linearly to [0, 1];
  * stage 1: Gaussian-weighted sliding window (nnU-Net style) over ``patch_size`` with ``overlap``;
  * stages 2/3: a fixed ``crop_size`` box around a centre, padded with air (normalised 0) outside.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Seed ranges are disjoint so that no phantom patient is ever both trained on and evaluated on.
TRAIN_SEEDS = (0, 99_999)
CALIB_SEEDS = (100_000, 100_999)
HELDOUT_SEED_BASE = 200_000  # held-out studies are 200000, 200001, ... (see evaluate.heldout_plan)

LESION_CLASSES: tuple[str, ...] = ("pdac", "pnet", "spt", "ipmn", "mcn", "scn", "cp", "other")
# background first, then the phantom's ORGAN_LABELS in label order (checked against models.phantom.ct
# at training time by ct_data.organ_names()).
ORGAN_NAMES: tuple[str, ...] = (
    "background", "pancreas", "liver", "spleen", "right_kidney", "left_kidney", "aorta", "vertebrae",
)


@dataclass(frozen=True)
class StageSpec:
    """The preprocessing contract of one stage, written verbatim into its model card."""

    spacing_mm: tuple[float, float, float]
    hu_low: float
    hu_high: float
    size: tuple[int, int, int]  # patch_size (stage 1) or crop_size (stages 2/3), (z, y, x) voxels


# Stage 1 sees the whole abdomen at 3 mm: enough to find organs, cheap enough for a CPU box. The patch
# (96 x 192 x 192 mm) is what a crowded 2-core training machine could afford; it still spans an organ
# and its neighbours.
STAGE1 = StageSpec(spacing_mm=(3.0, 3.0, 3.0), hu_low=-200.0, hu_high=300.0, size=(32, 64, 64))
# Stage 2 looks for subtle (5-20 HU) PDAC: a fine grid so a 1 cm tumour spans many voxels.
STAGE2 = StageSpec(spacing_mm=(1.25, 1.25, 1.25), hu_low=-150.0, hu_high=250.0, size=(96, 80, 96))
# Stage 3 classifies the lesion: a box centred on the lesion on stage 2's grid (one render feeds both).
STAGE3 = StageSpec(spacing_mm=(1.25, 1.25, 1.25), hu_low=-150.0, hu_high=350.0, size=(48, 64, 64))


def window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """The card's ``hu_window`` normalisation: clip to [low, high] and scale to [0, 1] (float32)."""
    out = (np.clip(hu.astype(np.float32), low, high) - np.float32(low)) / np.float32(high - low)
    return out.astype(np.float32, copy=False)


def zoom_factors(spacing: Sequence[float], target: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(s) / float(t) for s, t in zip(spacing, target, strict=True))


def resample(volume: np.ndarray, spacing: Sequence[float], target: Sequence[float], *, labels: bool = False) -> np.ndarray:
    """Resample as the pipeline does: linear for images, nearest for label maps."""
    factors = zoom_factors(spacing, target)
    if all(abs(f - 1.0) < 1e-6 for f in factors):
        return volume
    if labels:
        return ndimage.zoom(volume, factors, order=0, mode="nearest")
    return ndimage.zoom(volume.astype(np.float32), factors, order=1, mode="nearest")


def bbox_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Centre (voxel indices) of the bounding box of a mask: the crop centre the pipeline uses."""
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        return tuple(s // 2 for s in mask.shape)  # type: ignore[return-value]
    return tuple(int(round((int(i.min()) + int(i.max())) / 2)) for i in idx)  # type: ignore[return-value]


def crop(volume: np.ndarray, centre: Sequence[int], size: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """A ``size`` box centred on ``centre`` (the box starts at centre - size // 2), padded with ``fill``."""
    out = np.full(tuple(size), fill, dtype=volume.dtype)
    src, dst = [], []
    for c, s, n in zip(centre, size, volume.shape, strict=True):
        start = int(c) - s // 2
        lo, hi = max(start, 0), min(start + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net's Gaussian tile weight: centre voxels count more than tile borders."""
    grid = np.zeros(tuple(patch), dtype=np.float32)
    grid[tuple(p // 2 for p in patch)] = 1.0
    weight = ndimage.gaussian_filter(grid, [p * sigma_scale for p in patch], mode="constant", cval=0.0)
    weight /= weight.max()
    weight[weight == 0] = weight[weight > 0].min()
    return weight.astype(np.float32)


def _starts(length: int, patch: int, step: int) -> list[int]:
    if length <= patch:
        return [0]
    n = int(np.ceil((length - patch) / step)) + 1
    return [int(round(i * (length - patch) / (n - 1))) for i in range(n)]


def sliding_window(
    run: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    patch: Sequence[int],
    overlap: float,
    n_classes: int,
) -> np.ndarray:
    """Softmax probabilities (C, D, H, W) for a (channels, D, H, W) image, nnU-Net style.

    ``run`` maps a (1, channels, *patch) array to logits (1, n_classes, *patch). Volumes smaller than
    the patch are padded with 0 (air after windowing) and the padding is cut off again.
    """
    shape = image.shape[1:]
    pads = [(0, max(p - s, 0)) for s, p in zip(shape, patch, strict=True)]
    padded = np.pad(image, [(0, 0), *pads], mode="constant")
    pshape = padded.shape[1:]
    weight = gaussian_importance(patch)
    acc = np.zeros((n_classes, *pshape), dtype=np.float32)
    norm = np.zeros(pshape, dtype=np.float32)
    steps = [max(1, int(p * (1 - overlap))) for p in patch]
    for z in _starts(pshape[0], patch[0], steps[0]):
        for y in _starts(pshape[1], patch[1], steps[1]):
            for x in _starts(pshape[2], patch[2], steps[2]):
                sl = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
                tile = padded[(slice(None), *sl)][None]
                probs = softmax(run(tile)[0], axis=0)
                acc[(slice(None), *sl)] += probs * weight
                norm[sl] += weight
    acc /= norm[None]
    return acc[:, : shape[0], : shape[1], : shape[2]]


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty (nothing to find, nothing found)."""
    p, t = pred.astype(bool), truth.astype(bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def round_up(n: int, multiple: int) -> int:
    return int(np.ceil(n / multiple) * multiple)
