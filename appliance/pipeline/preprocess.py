"""Feed a model what its card asks for, and map what it returns back onto the patient's images.

Every array in the pipeline lives on a `Grid` (shape, spacing, origin, direction in LPS mm), so a
result from a 3 mm stage-1 grid, a 1.25 mm stage-2 crop and the source slices can always be related
through physical space. The resampling deliberately mirrors the training code (models/train/ct_common):
``scipy.ndimage.zoom(order=1, mode="nearest")`` with factor = spacing / target spacing, a fixed box of
``crop_size`` starting at ``centre - size // 2`` padded with air, ``hu_window`` scaled to [0, 1]. A crop
is computed directly from the source for just the box (the same sample positions zoom would use),
so a 512x512x300 series is never resampled whole at 1.25 mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from edgescreen.appliance.modelcard import HuWindow, Normalization, Percentile, ZScore

AIR_HU = -1024.0
_AXIS_OF_LPS = {0: 2, 1: 1, 2: 0}  # LPS x -> canonical index axis 2 (x), y -> 1, z -> 0


@dataclass(frozen=True)
class Grid:
    """Where an array's voxels are: voxel (k, j, i) at origin + sum(index * spacing * direction rows)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]

    @property
    def axes(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def to_lps(self, index: np.ndarray) -> np.ndarray:
        """(..., 3) voxel indices (z, y, x) to LPS mm."""
        idx = np.asarray(index, dtype=np.float64) * np.asarray(self.spacing)
        return np.asarray(self.origin) + idx @ self.axes

    def to_index(self, lps: np.ndarray) -> np.ndarray:
        """(..., 3) LPS mm to continuous voxel indices (z, y, x)."""
        rel = np.asarray(lps, dtype=np.float64) - np.asarray(self.origin)
        return (rel @ self.axes.T) / np.asarray(self.spacing)

    def sub(self, start: Sequence[int], shape: Sequence[int]) -> Grid:
        """The grid of a box starting at voxel `start` (may lie partly outside)."""
        return Grid(tuple(int(s) for s in shape), self.spacing, tuple(float(v) for v in self.to_lps(np.asarray(start))),  # type: ignore[arg-type]
                    self.direction)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": [list(r) for r in self.direction]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Grid:
        return cls(tuple(raw["shape"]), tuple(raw["spacing"]), tuple(raw["origin"]),  # type: ignore[arg-type]
                   tuple(tuple(r) for r in raw["direction"]))

    @classmethod
    def make(cls, shape: Sequence[int], spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray) -> Grid:
        return cls(tuple(int(s) for s in shape), tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                   tuple(float(v) for v in origin), tuple(tuple(float(v) for v in row) for row in direction))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# orientation


@dataclass(frozen=True)
class Reorientation:
    """A permutation and flips taking a series' slice frame to the canonical LPS frame (no resampling).

    Canonical axis a holds source axis ``perm[a]``, reversed when ``flip[a]``: index z grows toward the
    head, y toward the back, x toward the patient's left, which is what the card's "LPS" promises and
    what displays radiologically (patient's right on the image's left, anterior at the top).
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    def apply(self, array: np.ndarray) -> np.ndarray:
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + p for p in self.perm)))
        for axis, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis=lead + axis)
        return out

    def invert(self, array: np.ndarray) -> np.ndarray:
        lead = array.ndim - 3
        out = array
        for axis, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis=lead + axis)
        inverse = tuple(int(i) for i in np.argsort(self.perm))
        return np.transpose(out, (*range(lead), *(lead + p for p in inverse)))

    @property
    def identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)


def canonical_orientation(grid: Grid) -> tuple[Reorientation, Grid, float]:
    """How to reorient `grid` to LPS, the reoriented grid and the obliquity (degrees) that was snapped."""
    axes = grid.axes
    perm = [0, 0, 0]
    flip = [False, False, False]
    seen: set[int] = set()
    worst = 1.0
    for src_axis in range(3):
        lps_axis = int(np.argmax(np.abs(axes[src_axis])))
        target = _AXIS_OF_LPS[lps_axis]
        if target in seen:
            raise ValueError(f"slice directions {axes.tolist()} are too oblique to map onto the patient axes")
        seen.add(target)
        perm[target] = src_axis
        flip[target] = bool(axes[src_axis][lps_axis] < 0)
        worst = min(worst, float(abs(axes[src_axis][lps_axis])))
    reo = Reorientation(tuple(perm), tuple(flip))  # type: ignore[arg-type]
    start = [0, 0, 0]
    for target, src_axis in enumerate(perm):
        if flip[target]:
            start[src_axis] = grid.shape[src_axis] - 1
    origin = grid.to_lps(np.asarray(start))
    direction = np.stack([axes[perm[a]] * (-1.0 if flip[a] else 1.0) for a in range(3)])
    shape = [grid.shape[perm[a]] for a in range(3)]
    spacing = [grid.spacing[perm[a]] for a in range(3)]
    return reo, Grid.make(shape, spacing, origin, direction), float(np.degrees(np.arccos(min(worst, 1.0))))


# ----------------------------------------------------------------------------------------------
# intensity


def normalize(values: np.ndarray, spec: Normalization) -> np.ndarray:
    """The card's intensity normalisation, as float32."""
    x = np.asarray(values, dtype=np.float32)
    if isinstance(spec, HuWindow):
        low, high = np.float32(spec.low), np.float32(spec.high)
        return ((np.clip(x, low, high) - low) / (high - low)).astype(np.float32, copy=False)
    if isinstance(spec, ZScore):
        if spec.clip_low is not None or spec.clip_high is not None:
            x = np.clip(x, spec.clip_low, spec.clip_high)
        return ((x - np.float32(spec.mean)) / np.float32(spec.std)).astype(np.float32, copy=False)
    if isinstance(spec, Percentile):
        lo, hi = np.percentile(x, [spec.low, spec.high])
        return np.clip((x - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)
    raise TypeError(f"unknown normalisation {spec!r}")


def normalized_air(spec: Normalization) -> float:
    """What air becomes after normalisation: the value used to pad beyond the scanned volume."""
    if isinstance(spec, Percentile):
        return 0.0
    return float(normalize(np.array([AIR_HU], dtype=np.float32), spec)[0])


# ----------------------------------------------------------------------------------------------
# resampling


def zoomed_grid(grid: Grid, target_spacing: Sequence[float]) -> Grid:
    """The grid `ndimage.zoom(order=1)` produces at `target_spacing` (its corner-aligned true spacing)."""
    shape, spacing = [], []
    for n, s, t in zip(grid.shape, grid.spacing, target_spacing, strict=True):
        m = max(int(round(n * s / t)), 1)
        shape.append(m)
        spacing.append(s * (n - 1) / (m - 1) if m > 1 and n > 1 else float(t))
    return Grid.make(shape, spacing, grid.origin, grid.axes)


def resample(volume: np.ndarray, grid: Grid, target_spacing: Sequence[float], *, labels: bool = False) -> tuple[np.ndarray, Grid]:
    """Whole-volume resampling exactly as training did it; returns the array and its grid."""
    out_grid = zoomed_grid(grid, target_spacing)
    factors = [m / n for m, n in zip(out_grid.shape, grid.shape, strict=True)]
    if out_grid.shape == grid.shape:
        return (volume if labels else volume.astype(np.float32, copy=False)), grid
    if labels:
        return ndimage.zoom(volume, factors, order=0, mode="nearest"), out_grid
    return ndimage.zoom(volume, factors, order=1, mode="nearest", output=np.float32), out_grid


def crop_box(centre: Sequence[int], size: Sequence[int]) -> tuple[int, int, int]:
    """Start of a `size` box around `centre`, as training places it (centre - size // 2)."""
    return tuple(int(c) - int(s) // 2 for c, s in zip(centre, size, strict=True))  # type: ignore[return-value]


def sample_box(source: np.ndarray, source_grid: Grid, target: Grid, start: Sequence[int], size: Sequence[int], *,
               order: int, fill: float) -> np.ndarray:
    """The box [start, start + size) of `target` (a zoomed grid of `source_grid`), sampled from `source`.

    Identical (to float rounding) to ``crop(zoom(source), ...)``: the same sample positions
    ``o * (n_in - 1) / (n_out - 1)``, voxels beyond the zoomed volume filled with `fill`.
    """
    out_dtype = np.float32 if order > 0 else source.dtype
    out = np.full(tuple(int(s) for s in size), fill, dtype=out_dtype)
    dst, scale, lo_in, hi_in, valid = [], [], [], [], True
    for a in range(3):
        n_in, n_out = source_grid.shape[a], target.shape[a]
        lo, hi = max(int(start[a]), 0), min(int(start[a]) + int(size[a]), n_out)
        if hi <= lo:
            valid = False
            break
        dst.append(slice(lo - int(start[a]), hi - int(start[a])))
        s = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        scale.append(s)
        lo_in.append(max(int(np.floor(lo * s)) - 1, 0))
        hi_in.append(min(int(np.ceil((hi - 1) * s)) + 2, n_in))
    if not valid:
        return out
    block = source[tuple(slice(a, b) for a, b in zip(lo_in, hi_in, strict=True))]
    offset = [max(int(start[a]), 0) * scale[a] - lo_in[a] for a in range(3)]
    shape = tuple(d.stop - d.start for d in dst)
    out[tuple(dst)] = ndimage.affine_transform(block, np.asarray(scale), offset=offset, output_shape=shape,
                                               order=order, mode="nearest", output=out_dtype)
    return out


def map_to_grid(values: np.ndarray, grid: Grid, target: Grid, *, order: int, fill: float = 0.0,
                out_dtype: np.dtype | type | None = None) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Resample `values` (on `grid`) onto the part of `target` it covers: (block, slices of target).

    Both grids must share their direction (everything here derives from one canonical grid), so the
    map is a per-axis scale and shift. Only the covered box is computed: a 1.25 mm crop maps back to a
    512x512x300 grid without touching the rest of it.
    """
    if not np.allclose(grid.axes, target.axes, atol=1e-6):
        raise ValueError("map_to_grid needs grids with the same direction")
    scale = np.asarray(target.spacing) / np.asarray(grid.spacing)
    shift = grid.to_index(np.asarray(target.origin))  # target voxel 0 in source index units
    lo, hi = [], []
    for a in range(3):
        first = (-0.5 - shift[a]) / scale[a]
        last = (grid.shape[a] - 0.5 - shift[a]) / scale[a]
        lo.append(max(int(np.ceil(first)), 0))
        hi.append(min(int(np.floor(last)) + 1, target.shape[a]))
    dtype = np.dtype(out_dtype) if out_dtype is not None else (np.dtype(np.float32) if order > 0 else values.dtype)
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return np.zeros((0, 0, 0), dtype=dtype), (slice(0, 0),) * 3
    offset = shift + np.asarray(lo) * scale
    shape = tuple(h - low for low, h in zip(lo, hi, strict=True))
    block = ndimage.affine_transform(values, scale, offset=offset, output_shape=shape, order=order,
                                     mode="nearest", output=dtype)
    return block, tuple(slice(low, h) for low, h in zip(lo, hi, strict=True))


def bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(min index, max index) inclusive of a non-empty mask, None when empty (axis projections: fast)."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=others))
        if hits.size == 0:
            return None
        lo.append(int(hits[0]))
        hi.append(int(hits[-1]))
    return np.asarray(lo), np.asarray(hi)


def bbox_centre(mask: np.ndarray) -> tuple[int, int, int] | None:
    """The bounding-box centre training crops around (rounded half to even, as ct_common does)."""
    box = bbox(mask)
    if box is None:
        return None
    return tuple(int(round((int(a) + int(b)) / 2)) for a, b in zip(*box, strict=True))  # type: ignore[return-value]


def margin_box(lo: np.ndarray, hi: np.ndarray, grid: Grid, margin_mm: Sequence[float]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, size) of the box spanning continuous indices [lo, hi] grown by a margin in mm, clipped to the grid."""
    grow = np.asarray(margin_mm, dtype=np.float64) / np.asarray(grid.spacing)
    start = np.clip(np.floor(np.minimum(lo, hi) - grow).astype(int), 0, None)
    stop = np.minimum(np.ceil(np.maximum(lo, hi) + grow).astype(int) + 1, np.asarray(grid.shape))
    return tuple(int(v) for v in start), tuple(int(v) for v in stop - start)
