"""Calibration and held-out cases: tensors exactly as the model sees them, with ground truth beside them.

Quantisers need inputs that look like what the network gets in the field (the ranges they calibrate to
come from them), and the accuracy gate needs cases with truth that were *never* calibrated on. Both
come from the project's phantoms, rendered straight at the model card's target spacing (the phantom
fixes a patient in millimetres, so rendering at the card's grid gives the anatomy that resampling a
native 512x512 series would, at a fraction of the cost; it keeps somewhat less noise than that path,
see models/MODELS.md) and normalised by the card's own rule with the pipeline's own code (appliance.pipeline.preprocess), so
the optimiser needs no training code.

Seed ranges are disjoint and recorded in the bundle's report:
  training        0 ..  99_999 (models/train)
  calibration   100_000 + i    (the trainers' calibration range; never gated on)
  held-out      300_000 + i    (gate only; never calibrated on, never trained on, and apart from the
                               trainers' own evaluation seeds 200_000+)

The gate set always mixes normal and lesion cases (every lesion class in turn), so a quantiser that
erases subtle lesions cannot pass on normal anatomy alone.

Per role, what a case is (the card decides the shapes):
  pancreas.stage1  one ``patch_size`` tile centred on the pancreas (the tile the sliding window spends
                   most of its time on), truth = organ label map;
  pancreas.stage2  the ``crop_size`` box around the pancreas, truth = lesion mask + abnormal (0/1);
  pancreas.stage3  the ``crop_size`` box around the lesion, truth = the lesion class (one-hot);
  mammo            one real mini-MIAS image (the model learnt from real images, so its calibration
                   must look like them) prepared by appliance.pipeline.mammo, truth = its worst finding.
A clinic's own calibration tensors can replace the phantom ones (``--calibration DIR``: ``DIR/<role>/
*.npz``, arrays named as the card's inputs); the gate keeps using phantom cases, which carry truth.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.modelcard import ModelCard
from edgescreen.appliance.pipeline.preprocess import Grid, bbox_centre, crop_box, normalize, sample_box

log = get_logger(__name__)

TRAINING_SEEDS = (0, 99_999)
CALIBRATION_SEED_BASE = 100_000
HELDOUT_SEED_BASE = 300_000
LESION_CLASSES: tuple[str, ...] = ("pdac", "pnet", "spt", "ipmn", "mcn", "scn", "cp", "other")
PANCREAS_LABEL = 1
MAX_SKIPPED = 200
AIR_HU = -1000.0  # the phantom's air; crops beyond the rendered volume are filled with it


@dataclass
class Case:
    """One input as the network sees it, plus truth keyed by output name (see optimize.gate)."""

    seed: int
    inputs: dict[str, np.ndarray]
    truth: dict[str, np.ndarray] = field(default_factory=dict)
    lesion: str | None = None


@dataclass
class CaseSet:
    role: str
    purpose: str  # "calibration" | "heldout"
    source: str
    cases: list[Case]
    skipped: list[int] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        seeds = [c.seed for c in self.cases]
        lesions = sorted({c.lesion for c in self.cases if c.lesion})
        return {
            "purpose": self.purpose, "source": self.source, "cases": len(self.cases),
            "seeds": [min(seeds), max(seeds)] if seeds else [],
            "lesion_cases": sum(1 for c in self.cases if c.lesion), "lesion_classes": lesions,
            "skipped_seeds": self.skipped,
        }


# A builder turns (card, seed, lesion) into a case; tests pass their own.
CaseBuilder = Callable[[ModelCard, int, "str | None"], Case]


def plan(role: str, purpose: str, n: int) -> list[tuple[int, str | None]]:
    """(seed, lesion) for ``n`` cases: a third normal, the rest cycling through every lesion class.

    Stage 3 only ever sees lesions, so its cases are all lesions; mammography cycles through normal,
    benign and malignant images.
    """
    base = CALIBRATION_SEED_BASE if purpose == "calibration" else HELDOUT_SEED_BASE
    out: list[tuple[int, str | None]] = []
    for i in range(n):
        if role == "pancreas.stage3":
            lesion: str | None = LESION_CLASSES[i % len(LESION_CLASSES)]
        elif role == "mammo":
            lesion = ("normal", "benign", "malignant")[i % 3]
        else:
            lesion = None if i % 3 == 0 else LESION_CLASSES[(i - i // 3 - 1) % len(LESION_CLASSES)]
        out.append((base + i, lesion))
    return out


def build_cases(card: ModelCard, purpose: str, n: int, builder: CaseBuilder | None = None,
                cache_dir: Path | None = None, progress: Callable[[int, int], None] | None = None) -> CaseSet:
    """``n`` cases for ``card`` from ``builder`` (the phantom builder for its role by default).

    The phantom refuses some (seed, lesion) pairs with ValueError (a lesion that does not fit that
    patient's gland); such a seed is recorded as skipped and the next unplanned seed of the same
    range takes its place with the same lesion, so the lesion mix stays as planned.
    """
    builder = builder or phantom_builder(card.role)
    planned = plan(card.role, purpose, n)
    spare = iter(range(planned[-1][0] + 1, planned[-1][0] + 1 + MAX_SKIPPED)) if planned else iter(())
    cases, skipped = [], []
    for i, (seed, lesion) in enumerate(planned):
        while True:
            try:
                cases.append(_cached(cache_dir, card, seed, lesion, builder))
                break
            except ValueError as exc:
                skipped.append(seed)
                log.info("phantom refused a seed; using the next one", role=card.role, seed=seed, lesion=lesion,
                         error=str(exc)[:160])
                seed = next(spare, None)
                if seed is None:
                    raise RuntimeError(f"{card.role}: the phantom refused {len(skipped)} seeds; last: {exc}") from exc
        if progress:
            progress(i + 1, n)
    source = getattr(builder, "source", getattr(builder, "__name__", "custom"))
    return CaseSet(card.role, purpose, str(source), cases, skipped)


def _cached(cache_dir: Path | None, card: ModelCard, seed: int, lesion: str | None, builder: CaseBuilder) -> Case:
    """Rendering a fine CT crop costs seconds; the same (card, seed) case is kept as an .npz."""
    if cache_dir is None:
        return builder(card, seed, lesion)
    key = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{card.role}-{card.version}-{(card.sha256 or 'nosha')[:16]}")
    path = cache_dir / key / f"{seed}-{lesion or 'normal'}.npz"
    if path.is_file():
        with np.load(path) as z:
            inputs = {k[3:]: z[k] for k in z.files if k.startswith("in.")}
            truth = {k[3:]: z[k] for k in z.files if k.startswith("gt.")}
        return Case(seed, inputs, truth, lesion)
    case = builder(card, seed, lesion)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **{f"in.{k}": v for k, v in case.inputs.items()},
                        **{f"gt.{k}": v for k, v in case.truth.items()})
    os.replace(tmp, path)
    return case


def directory_cases(card: ModelCard, directory: Path, n: int) -> CaseSet:
    """A clinic's own calibration tensors: ``directory/<role>/*.npz`` with arrays named as the inputs."""
    files = sorted((directory / card.role).glob("*.npz"))[:n]
    if not files:
        raise FileNotFoundError(f"{directory / card.role}: no .npz calibration tensors for {card.role}")
    names = [i.name for i in card.inputs]
    cases = []
    for i, path in enumerate(files):
        with np.load(path) as z:
            missing = [k for k in names if k not in z.files]
            if missing:
                raise ValueError(f"{path}: missing input arrays {missing}; the card's inputs are {names}")
            cases.append(Case(seed=-(i + 1), inputs={k: z[k].astype(np.float32) for k in names}))
    return CaseSet(card.role, "calibration", f"dir:{directory}", cases)


# ------------------------------------------------------------------------------- CT phantom builders


def crop(volume: np.ndarray, centre: Sequence[int], size: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """The ``size`` box around ``centre``, placed and filled exactly as the pipeline places its crops
    (appliance.pipeline.preprocess: ``crop_box`` then ``sample_box`` on the volume's own grid, which
    samples voxel for voxel), so calibration sees what the appliance feeds the model."""
    grid = Grid.make(volume.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    return sample_box(volume, grid, grid, crop_box(centre, size), size, order=0, fill=fill)


def _ct():  # noqa: ANN202 - the phantom module, imported only when phantom cases are wanted
    from edgescreen.models.phantom import ct

    return ct


def render_ct(seed: int, lesion: str | None, spacing: Sequence[float], size: Sequence[int]) -> Any:
    """Render a phantom on a grid of about ``spacing`` (z, y, x) mm, restricted in z to what a ``size``
    box around the pancreas needs (a full abdomen at 1.25 mm is ~30x the voxels of the crop).

    The phantom's grid is (FOV / matrix) in-plane and (z extent / slices) in z, so a cheap probe render
    gives FOV, extent and the pancreas' z; ``origin_mm`` is patient (x, y, z), so z is its third value.
    """
    ct = _ct()
    probe = ct.generate_ct_volume(seed, lesion, matrix=48, slices=48)
    dz, _, dx = (float(s) for s in probe.spacing_mm)
    extent_z, fov = probe.hu.shape[0] * dz, probe.hu.shape[2] * dx
    matrix = max(16, int(round(fov / spacing[2])))
    slices = max(8, int(round(extent_z / spacing[0])))
    zs = np.nonzero((probe.labels == PANCREAS_LABEL).any(axis=(1, 2)))[0]
    z_range = None
    if len(zs):
        z0 = float(probe.origin_mm[2])
        centre = z0 + (zs.min() + zs.max()) / 2 * dz
        half = size[0] * spacing[0] / 2 + 2 * dz
        z_range = (centre - half, centre + half)
    return ct.generate_ct_volume(seed, lesion, slices=slices, matrix=matrix, z_range_mm=z_range)


def _channels(card: ModelCard, hu: np.ndarray, labels: np.ndarray, lesion: np.ndarray) -> dict[str, np.ndarray]:
    """The card's input tensors from one crop: each channel named by the card, in its order."""
    out = {}
    for spec in card.inputs:
        chans = []
        for name in spec.channels:
            if name == "ct":
                chans.append(normalize(hu, card.preprocessing.normalization))
            elif name == "pancreas_mask":
                chans.append((labels == PANCREAS_LABEL).astype(np.float32))
            elif name == "lesion_mask":
                chans.append((lesion > 0).astype(np.float32))
            else:
                raise ValueError(f"{card.role}: channel {name!r} cannot come from a CT phantom")
        out[spec.name] = np.stack(chans)[None].astype(np.float32)
    return out


def ct_builder(card: ModelCard, seed: int, lesion: str | None) -> Case:
    """A case for one of the pancreas stages, from the CT phantom (see the module docstring)."""
    pre = card.preprocessing
    if pre.target_spacing_mm is None or len(pre.target_spacing_mm) != 3:
        raise ValueError(f"{card.role}: the card has no 3D target_spacing_mm; cannot render calibration cases")
    size = pre.patch_size or pre.crop_size
    if size is None:
        raise ValueError(f"{card.role}: the card has neither patch_size nor crop_size")
    ph = render_ct(seed, lesion, pre.target_spacing_mm, size)
    hu = np.asarray(ph.hu, dtype=np.float32)
    labels, les = np.asarray(ph.labels), np.asarray(ph.lesion)
    on_lesion = card.role == "pancreas.stage3" and les.any()
    centre = bbox_centre(les > 0 if on_lesion else labels == PANCREAS_LABEL)
    if centre is None:  # an empty mask has no centre: cropping the middle would gate on the wrong anatomy
        raise ValueError(f"{card.role}: seed {seed} renders no pancreas at the card's spacing")
    hu_c = crop(hu, centre, size, fill=AIR_HU)
    lab_c, les_c = crop(labels, centre, size), crop(les, centre, size)
    truth: dict[str, np.ndarray] = {}
    organ_ids = {"background": 0, **{k.lower(): v for k, v in _ct().ORGAN_LABELS.items()}}
    lesion_names = {c.lower() for c in LESION_CLASSES}
    abnormal = int(lesion is not None)
    for out in card.outputs:
        names = [c.lower() for c in out.classes]
        if out.kind == "segmentation" and out.activation == "softmax":
            # organ classes are matched to the phantom's labels by name; a "lesion" class wins over the organ
            if all(n in organ_ids or n == "lesion" for n in names):
                lut = np.zeros(256, dtype=np.int64)
                for index, name in enumerate(names):
                    if name != "lesion":
                        lut[organ_ids[name]] = index
                labels_c = lut[lab_c]
                if "lesion" in names:
                    labels_c = np.where(les_c > 0, names.index("lesion"), labels_c)
                truth[out.name] = labels_c
        elif out.kind == "segmentation":
            truth[out.name] = (les_c > 0).astype(np.int64)
        elif out.kind == "classification" and set(names) <= lesion_names:
            if lesion is not None:
                truth[out.name] = np.array([int(n == lesion) for n in names], dtype=np.int64)
        elif out.kind == "classification":
            values = {"abnormal": abnormal, "lesion": abnormal, "normal": 1 - abnormal}
            truth[out.name] = np.array([values.get(n, abnormal) for n in names], dtype=np.int64)
    return Case(seed, _channels(card, hu_c, lab_c, les_c), truth, lesion)


ct_builder.source = "phantom:ct"  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------ mammography

MINIMIAS_ENV = "EDGESCREEN_MINIMIAS"
_STRATA = ("normal", "benign", "malignant")


def minimias_dir() -> Path | None:
    """mini-MIAS development images: $EDGESCREEN_MINIMIAS, else ../shared/data/mini-mias beside the repo."""
    env = os.environ.get(MINIMIAS_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "mini-mias"
    return path if (path / "labels.csv").is_file() else None


def _minimias_strata(directory: Path) -> dict[str, list[str]]:
    """Image names per worst finding (normal / benign / malignant), sorted, from labels.csv."""
    import csv

    worst: dict[str, str] = {}
    with open(directory / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            sev = {"B": "benign", "M": "malignant"}.get((row.get("severity") or "").strip(), "normal")
            name = row["image"].strip()
            if _STRATA.index(sev) >= _STRATA.index(worst.get(name, "normal")):
                worst[name] = sev
    return {s: sorted(n for n, w in worst.items() if w == s and (directory / f"{n}.png").is_file()) for s in _STRATA}


def minimias_builder(card: ModelCard, seed: int, lesion: str | None) -> Case:
    """A real mini-MIAS image of the wanted stratum, prepared exactly as the pipeline prepares one.

    Held-out cases count from the start of each stratum, calibration cases from its end, so the two
    never share an image. These images are the mammography model's *development* set (the truly
    held-out third is kept away from this repository), so absolute AUCs here are optimistic; the
    gate's figures are differences against FP32 on the same images, which that does not bias.
    """
    from PIL import Image

    from edgescreen.appliance.pipeline.mammo import prepare_mammogram

    directory = minimias_dir()
    if directory is None:
        raise FileNotFoundError(f"mini-MIAS not found; set ${MINIMIAS_ENV}")
    stratum = lesion if lesion in _STRATA else "normal"
    names = _minimias_strata(directory)[stratum]
    if seed >= HELDOUT_SEED_BASE:
        index = (seed - HELDOUT_SEED_BASE) // len(_STRATA)
    else:
        index = len(names) - 1 - (seed - CALIBRATION_SEED_BASE) // len(_STRATA)
    name = names[index % len(names)]
    pixels = np.asarray(Image.open(directory / f"{name}.png").convert("L"))
    x = prepare_mammogram(pixels, card.preprocessing).tensor
    abnormal, malignant = int(stratum != "normal"), int(stratum == "malignant")
    truth = {}
    for out in card.outputs:
        if out.kind == "classification":
            values = {"abnormal": abnormal, "malignant": malignant, "normal": 1 - abnormal}
            truth[out.name] = np.array([values.get(c, abnormal) for c in out.classes], dtype=np.int64)
    return Case(seed, {card.inputs[0].name: x}, truth, None if stratum == "normal" else f"{stratum}:{name}")


minimias_builder.source = "mini-mias"  # type: ignore[attr-defined]


def phantom_builder(role: str) -> CaseBuilder:
    """CT phantom for the pancreas stages; real mini-MIAS images for mammography where present."""
    if role != "mammo":
        return ct_builder
    if minimias_dir() is None:
        raise FileNotFoundError(f"no mammography cases: mini-MIAS not found (set ${MINIMIAS_ENV}) and no "
                                "mammography phantom; pass --calibration DIR for calibration tensors")
    return minimias_builder
