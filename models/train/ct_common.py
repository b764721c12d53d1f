"""Shared, torch-free helpers for the PANDA-style pancreas models: seeds, spacings, windows, geometry.

Everything here is numpy/scipy only, so the evaluation (models/evaluate.py) and the tests can use the
same preprocessing as training without importing torch (the appliance never needs torch). The
preprocessing itself is NOT defined here: it is the appliance's own (``appliance.pipeline.preprocess``
and ``appliance.pipeline.sliding_window``), imported, so training and inference cannot drift apart:
  * resampling: ``preprocess.resample`` (``scipy.ndimage.zoom(order=1)``, labels ``order=0``);
  * ``hu_window`` normalisation: ``preprocess.normalize`` with the card's window;
  * stage 1: the pipeline's Gaussian-weighted sliding window over ``patch_size`` with ``overlap``;
  * stages 2/3: a ``crop_size`` box starting at ``preprocess.crop_box`` (centre - size // 2), padded
    with air (normalised 0) outside.
The thin wrappers below only adapt the pipeline's Grid/card-based signatures to plain arrays. The
activations and metrics (softmax, sigmoid, Dice, AUC, bootstrap) are not here either: the trainers import
the appliance's one copy (``appliance.pipeline.activations``, ``appliance.pipeline.metrics``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgescreen.appliance.modelcard import HuWindow
from edgescreen.appliance.pipeline import preprocess
from edgescreen.appliance.pipeline.activations import softmax
from edgescreen.appliance.pipeline.sliding_window import WindowSpec
from edgescreen.appliance.pipeline.sliding_window import sliding_window as pipeline_sliding_window

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
    """The card's ``hu_window`` normalisation (the pipeline's ``normalize``): clip to [low, high], scale to [0, 1]."""
    return preprocess.normalize(hu, HuWindow(type="hu_window", low=float(low), high=float(high)))


def resample(volume: np.ndarray, spacing: Sequence[float], target: Sequence[float], *, labels: bool = False) -> np.ndarray:
    """The pipeline's resampling of an array on an axis-aligned grid: linear for images, nearest for labels."""
    grid = preprocess.Grid.make(volume.shape, spacing, (0.0, 0.0, 0.0), np.eye(3))
    return preprocess.resample(volume, grid, target, labels=labels)[0]


def bbox_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Centre (voxel indices) of the bounding box of a mask: the crop centre the pipeline uses.

    An empty mask gives the volume's centre (a training crop still needs a place).
    """
    centre = preprocess.bbox_centre(mask)
    return centre if centre is not None else tuple(s // 2 for s in mask.shape)  # type: ignore[return-value]


def crop(volume: np.ndarray, centre: Sequence[int], size: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """A ``size`` box starting where the pipeline starts it (``preprocess.crop_box``), padded with ``fill``."""
    out = np.full(tuple(size), fill, dtype=volume.dtype)
    src, dst = [], []
    for start, s, n in zip(preprocess.crop_box(centre, size), size, volume.shape, strict=True):
        lo, hi = max(start, 0), min(start + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def sliding_window(
    run: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    patch: Sequence[int],
    overlap: float,
    n_classes: int,
) -> np.ndarray:
    """Softmax probabilities (C, D, H, W) for a (channels, D, H, W) image: the pipeline's sliding window.

    ``run`` maps a (1, channels, *patch) array to logits (1, n_classes, *patch); the pipeline pads with
    0 (air after windowing), weights tiles with nnU-Net's Gaussian and cuts the padding off again.
    """
    spec = WindowSpec(tuple(int(p) for p in patch), float(overlap), ("probs",))  # type: ignore[arg-type]
    out = pipeline_sliding_window({"x": image}, lambda feed: {"probs": softmax(run(feed["x"]), axis=1)}, spec)
    probs = out["probs"]
    if probs.shape[0] != n_classes:
        raise ValueError(f"the model gave {probs.shape[0]} classes, expected {n_classes}")
    return probs
