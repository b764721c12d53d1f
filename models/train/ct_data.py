"""Phantom studies for the pancreas models, rendered straight at each stage's grid and cached.

Rendering a 512x512 series and resampling it costs seconds per study; rendering the same patient (the
seed fixes the patient in mm) on a grid whose spacing equals the model's target spacing costs a
fraction of that, so training and evaluation render at model resolution. What a direct coarse render
lacks compared with the pipeline's ``zoom(order=1)`` of a native series (noise, thick-slice blur) is
put back by ``pipeline_noise`` and ``thick_slices`` during training, and ``models.evaluate``'s
pipeline check runs a few held-out studies the appliance's way (native series, resampled).

Cache: ``models/data/ct/<phantom source hash>/<kind>/<seed>-<lesion>.npz`` (git-ignored).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgescreen.models.train.ct_common import (
    LESION_CLASSES,
    ORGAN_NAMES,
    STAGE1,
    STAGE2,
    STAGE3,
    bbox_centre,
    crop,
)

CACHE_ROOT = Path(os.environ.get("EDGESCREEN_CT_CACHE", Path(__file__).resolve().parents[1] / "data" / "ct"))


@functools.lru_cache(maxsize=1)
def phantom_fingerprint() -> str:
    """Short hash of the phantom generator's source: a changed generator never reuses a stale cache."""
    src = Path(__file__).resolve().parents[1] / "phantom"
    digest = hashlib.sha256()
    for f in sorted(src.glob("*.py")):
        if f.name in CT_SOURCES:
            digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:12]


CT_SOURCES = ("ct.py", "_canvas.py", "_ct_anatomy.py", "_ct_lesions.py", "_ct_acquisition.py", "_ct_artefacts.py",
              "_ct_pelvis.py")
# Training and evaluation use renders of the current generator only. EDGESCREEN_CT_STRICT=0 lets a
# quick experiment reuse renders of an earlier revision (never for shipped models or the report).
STRICT = os.environ.get("EDGESCREEN_CT_STRICT", "1") == "1"


class PhantomError(RuntimeError):
    """The generator could not draw this seed (kept apart so trainers can skip it and say so)."""


def phantom():  # noqa: ANN201 - the generator module
    """The project's CT phantom generator, imported lazily (it is written alongside these models)."""
    from edgescreen.models.phantom import ct

    names = ("background", *sorted(ct.ORGAN_LABELS, key=ct.ORGAN_LABELS.get))
    if tuple(names) != ORGAN_NAMES or tuple(ct.LESION_CLASSES) != LESION_CLASSES:
        raise RuntimeError(f"phantom labels {names} / {ct.LESION_CLASSES} differ from the models' {ORGAN_NAMES} / {LESION_CLASSES}")
    return ct


def training_lesion(seed: int) -> str | None:
    """The lesion a training/calibration seed carries: one third normal, the rest uniform over 8 classes."""
    rng = np.random.default_rng([seed, 7919])
    k = int(rng.integers(0, 12))
    return None if k < 4 else LESION_CLASSES[k - 4]


def _cached(kind: str, seed: int, lesion: str | None, build) -> dict[str, np.ndarray]:  # noqa: ANN001
    name = f"{seed}-{lesion or 'normal'}.npz"
    path = CACHE_ROOT / phantom_fingerprint() / kind / name
    candidates = [path] if STRICT else [path, *sorted(CACHE_ROOT.glob(f"*/{kind}/{name}"), key=lambda p: -p.stat().st_mtime)]
    for cand in candidates:
        if cand.is_file():
            with np.load(cand) as z:
                out = {k: z[k] for k in z.files}
            out["phantom_revision"] = np.array(cand.parents[1].name)
            return out
    try:
        arrays = build()
    except ValueError as exc:
        raise PhantomError(f"phantom seed {seed} lesion {lesion}: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    arrays["phantom_revision"] = np.array(path.parents[1].name)
    return arrays


def stage1_volume(seed: int, lesion: str | None, randomized: bool = False) -> dict[str, np.ndarray]:
    """Whole-abdomen study at stage 1 spacing: ``hu`` (int16), ``labels`` (uint8) and facts for later crops.

    ``randomized``: scanned with ``Acquisition.randomized(seed)`` (contrast phases, kernels, 0.6-5 mm
    slices, dose, truncation, metal, children, ranges from the chest to the pelvis): stage 1's training
    distribution. Otherwise the validated-domain acquisition, as held-out evaluation renders it.

    ``pancreas_z_mm`` is the patient z (mm) of the pancreas label's bounding-box centre, ``lesion_z_mm``
    that of the lesion (nan when none); ``noise_sigma`` is the seed's native-series noise (HU), which
    the trainers use to put back the noise a direct coarse render lacks (see ``pipeline_noise``).
    """

    acq = phantom().Acquisition.randomized(seed) if randomized else None

    def build() -> dict[str, np.ndarray]:
        ph = phantom().generate_ct_volume(seed, lesion, acquisition=acq, **_grid_args(seed, STAGE1.spacing_mm, acq))
        dz, z0 = float(ph.spacing_mm[0]), float(ph.origin_mm[2])
        zs = np.nonzero((ph.labels == 1).any(axis=(1, 2)))[0]
        lz = np.nonzero(ph.lesion.any(axis=(1, 2)))[0]
        return {
            "hu": ph.hu, "labels": ph.labels, "spacing": np.array(ph.spacing_mm),
            "pancreas_z_mm": np.array(z0 + dz * (zs.min() + zs.max()) / 2),
            "lesion_z_mm": np.array(z0 + dz * (lz.min() + lz.max()) / 2 if len(lz) else np.nan),
            "noise_sigma": np.array(float(ph.truth["noise_sigma_hu"])),
            "thickness": np.array(float(ph.truth["slice_thickness_mm"])),
        }

    return _cached("stage1r" if randomized else "stage1", seed, lesion, build)


def stage1_training_volume(seed: int, lesion: str | None) -> dict[str, np.ndarray]:
    """Stage 1's training render: the domain-randomised acquisition (a loader for ``collect``)."""
    return stage1_volume(seed, lesion, randomized=True)


@functools.lru_cache(maxsize=4096)
def extent_mm(seed: int, acquisition=None) -> tuple[float, float, float]:  # noqa: ANN001 - Acquisition | None
    """The scan's extent (z, y, x) in mm, from a tiny probe render (the seed and acquisition fix it in mm)."""
    ph = phantom().generate_ct_volume(seed, None, matrix=16, slices=8, acquisition=acquisition)
    return tuple(float(n * s) for n, s in zip(ph.hu.shape, ph.spacing_mm, strict=True))  # type: ignore[return-value]


def _grid_args(seed: int, spacing: Sequence[float], acquisition=None) -> dict[str, int]:  # noqa: ANN001
    """matrix/slices that sample the scan's FOV and z extent at about ``spacing`` mm."""
    ext = extent_mm(seed, acquisition)
    return {"matrix": max(16, int(round(ext[2] / spacing[2]))), "slices": max(8, int(round(ext[0] / spacing[0])))}


def fine_crops(seed: int, lesion: str | None) -> dict[str, np.ndarray]:
    """Stage 2 crop (pancreas bbox centre) and stage 3 crop (lesion bbox centre) from one fine render.

    Stages 2 and 3 share a grid (``STAGE2.spacing_mm == STAGE3.spacing_mm``), so one z-restricted render
    covering both crops feeds both. Oracle centres (true masks), as the evaluation prescribes.
    """
    assert tuple(STAGE2.spacing_mm) == tuple(STAGE3.spacing_mm)

    def build() -> dict[str, np.ndarray]:
        coarse = stage1_volume(seed, lesion)
        pz, lz = float(coarse["pancreas_z_mm"]), float(coarse["lesion_z_mm"])
        h2 = STAGE2.size[0] * STAGE2.spacing_mm[0] / 2 + 8
        h3 = STAGE3.size[0] * STAGE3.spacing_mm[0] / 2 + 8
        lo, hi = pz - h2, pz + h2
        if np.isfinite(lz):
            lo, hi = min(lo, lz - h3), max(hi, lz + h3)
        ph = phantom().generate_ct_volume(seed, lesion, z_range_mm=(lo, hi), **_grid_args(seed, STAGE2.spacing_mm))
        centre = bbox_centre(ph.labels == 1)
        out = {
            "s2_hu": crop(ph.hu, centre, STAGE2.size, fill=-1000),
            "s2_lesion": crop(ph.lesion, centre, STAGE2.size),
            "s2_pancreas": crop((ph.labels == 1).astype(np.uint8), centre, STAGE2.size),
            "noise_sigma": coarse["noise_sigma"],
            "thickness": coarse["thickness"],
            "lesion_voxels": np.array(int(ph.lesion.sum())),
        }
        lc = bbox_centre(ph.lesion) if ph.lesion.any() else centre
        out["s3_hu"] = crop(ph.hu, lc, STAGE3.size, fill=-1000)
        out["s3_lesion"] = crop(ph.lesion, lc, STAGE3.size)
        return out

    return _cached("fine", seed, lesion, build)


# Extra white noise (as a fraction of the seed's native noise sigma) that a direct render at the model
# grid lacks compared with the pipeline's zoom(order=1) of the native 512 series. Measured on seeds 5
# and 11 in the liver (direct vs resampled native): about 0.7-0.8 at 3 mm, 0.4-0.5 at 1.25 mm, because
# the generator shrinks noise on coarse grids as if block-averaged while linear zoom does not average.
PIPELINE_NOISE = {"stage1": (0.5, 1.0), "fine": (0.25, 0.65)}


def pipeline_noise(x: np.ndarray, sigma: float, kind: str, rng: np.random.Generator, p: float = 0.85) -> np.ndarray:
    """Add the noise the pipeline's resampling would have kept (float32 HU in, float32 HU out)."""
    if rng.random() >= p:
        return x
    lo, hi = PIPELINE_NOISE[kind]
    k = float(rng.uniform(lo, hi)) * sigma
    return x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(k)


def thick_slices(x: np.ndarray, thickness: float, spacing_z: float, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mimic a thick-slice series upsampled in z by the pipeline: keep every k-th slice, interpolate back."""
    k = int(round(thickness / spacing_z))
    if k < 2 or rng.random() >= p:
        return x
    off = int(rng.integers(k))
    kept = x[off::k]
    pos = (np.arange(x.shape[0]) - off) / k
    i0 = np.clip(np.floor(pos).astype(int), 0, len(kept) - 1)
    i1 = np.clip(i0 + 1, 0, len(kept) - 1)
    w = np.clip(pos - i0, 0, 1).astype(np.float32)[:, None, None]
    return kept[i0] * (1 - w) + kept[i1] * w


def _render_one(job: tuple) -> None:  # noqa: ANN001 - (load, seed, lesion), run in a worker process
    load, seed, lesion = job
    with contextlib.suppress(PhantomError):  # collect() meets it again, skips the seed and reports it
        load(seed, lesion)


def render_workers() -> int:
    """Processes that render phantoms ahead of a run: every core unless EDGESCREEN_RENDER_WORKERS says less."""
    return max(1, int(os.environ.get("EDGESCREEN_RENDER_WORKERS", os.cpu_count() or 1)))


def prerender(load, pairs: Sequence[tuple[int, str | None]], workers: int | None = None) -> None:  # noqa: ANN001
    """Fill the cache for ``pairs`` with several processes (rendering is single-threaded numpy).

    Only a warm-up: results travel through the on-disk cache, so the caller's sequential loop stays
    the one place that loads, skips and reports seeds, and a run with one worker behaves the same.
    """
    workers = render_workers() if workers is None else workers
    todo = [(load, s, les) for s, les in pairs]
    if workers < 2 or len(todo) < 2:
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(_render_one, todo, chunksize=1):
            pass


def collect(start: int, n: int, load, lesion_of=training_lesion, stop: int | None = None):  # noqa: ANN001, ANN201
    """The first ``n`` seeds from ``start`` that the generator can draw: (seeds, items, skipped seeds).

    A seed the generator rejects (``PhantomError``) is skipped and reported rather than stopping a
    20-minute training run; ``lesion_of(seed)`` picks the lesion (None: normal, or skip the seed
    entirely when it returns ``False``).
    """
    ahead, s = [], start
    while len(ahead) < n + max(2, n // 20) and (stop is None or s <= stop):
        les = lesion_of(s)
        if les is not False:
            ahead.append((s, les))
        s += 1
    prerender(load, ahead)
    seeds, items, skipped = [], [], []
    s = start
    while len(items) < n:
        if stop is not None and s > stop:
            raise RuntimeError(f"only {len(items)} usable seeds in {start}-{stop}")
        les = lesion_of(s)
        if les is not False:
            try:
                items.append(load(s, les))
                seeds.append(s)
            except PhantomError:
                skipped.append(s)
        s += 1
    return seeds, items, skipped
