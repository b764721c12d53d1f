"""Analytic shapes in millimetres and the canvas they are painted on.

Why this module exists: the CT phantom's anatomy must be the same patient at any sampling grid (a
512x512 series for the appliance, a 3 mm grid for training), so every organ is an implicit function
of patient millimetres, evaluated only on the part of the grid inside its bounding box. Painting is
in order (later tissue overwrites earlier), like a painter's algorithm, which keeps each organ simple.

Conventions: anatomical frame in mm, x towards the patient's left, y towards the back (posterior),
z towards the head, matching DICOM LPS directions. Arrays are (z, y, x).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Bbox = tuple[float, float, float, float, float, float]  # x0, x1, y0, y1, z0, z1 (mm)
F32 = np.float32


@dataclass
class Block:
    """The part of the canvas inside a bounding box: index slices and broadcastable mm coordinates.

    ``shared`` is a cache that lives for one whole render (in-plane terms repeat in every z-chunk).
    """

    sl: tuple[slice, slice, slice]
    z: np.ndarray  # (nz, 1, 1)
    y: np.ndarray  # (1, ny, 1)
    x: np.ndarray  # (1, 1, nx)
    shared: dict | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.shape[0], self.y.shape[1], self.x.shape[2])


class Canvas:
    """HU, organ labels and lesion flags for one z-chunk of the sampling grid, in anatomical mm."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, shared: dict | None = None) -> None:
        self.x, self.y, self.z = (np.asarray(a, dtype=F32) for a in (x, y, z))
        shape = (self.z.size, self.y.size, self.x.size)
        self.hu = np.full(shape, -1000.0, dtype=F32)
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.lesion = np.zeros(shape, dtype=np.uint8)
        self.layers = np.zeros(shape, dtype=np.uint8)  # body layer code (set by the body painter)
        self.shared = {} if shared is None else shared
        self.body_keys: list[tuple] = []
        self._labelled = False
        self._lesioned = False

    def block(self, bbox: Bbox) -> Block | None:
        """The grid points inside ``bbox`` (None when it misses this chunk: the organ costs nothing)."""
        x0, x1, y0, y1, z0, z1 = bbox
        sx = _span(self.x, x0, x1)
        sy = _span(self.y, y0, y1)
        sz = _span(self.z, z0, z1)
        if sx is None or sy is None or sz is None:
            return None
        return Block((sz, sy, sx), self.z[sz][:, None, None], self.y[sy][None, :, None], self.x[sx][None, None, :], self.shared)

    def paint(
        self,
        blk: Block,
        mask: np.ndarray,
        hu: float | np.ndarray,
        label: int = 0,
        *,
        protect: np.ndarray | None = None,
        lesion: bool = False,
    ) -> np.ndarray:
        """Overwrite ``mask`` voxels with ``hu`` and ``label``; ``protect`` (a label lookup) keeps organs.

        Returns the mask actually painted, so callers can paint detail inside what they drew.
        """
        mask = np.broadcast_to(mask, blk.shape)
        if protect is not None and self._labelled:
            mask = mask & ~protect[self.labels[blk.sl]]
        np.copyto(self.hu[blk.sl], np.asarray(hu, dtype=F32), where=mask)
        if label or self._labelled:  # nothing to overwrite until the first organ is painted
            np.copyto(self.labels[blk.sl], np.uint8(label), where=mask)
            self._labelled = self._labelled or bool(label)
        if lesion or self._lesioned:
            np.copyto(self.lesion[blk.sl], np.uint8(lesion), where=mask)
            self._lesioned = self._lesioned or lesion
        return mask


def protect_lut(*labels: int) -> np.ndarray:
    """A 256-entry lookup: True for labels that a painter must not overwrite."""
    lut = np.zeros(256, dtype=bool)
    lut[list(labels)] = True
    return lut


def _span(coords: np.ndarray, lo: float, hi: float) -> slice | None:
    i0 = int(np.searchsorted(coords, lo, side="left"))
    i1 = int(np.searchsorted(coords, hi, side="right"))
    return slice(i0, i1) if i1 > i0 else None


# ---------------------------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class WaveField:
    """A smooth random field: a sum of plane waves, with unit standard deviation.

    Why plane waves: the field is an exact function of millimetres (same texture at any grid), and
    cos(a + b) = cos a cos b - sin a sin b turns a 3D block into one small matrix product.
    """

    k: np.ndarray  # (n, 3) angular wave vectors (kx, ky, kz) in rad/mm
    phase: np.ndarray  # (n,)

    @classmethod
    def random(
        cls, rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float], z_stretch: float = 1.0
    ) -> WaveField:
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        direction[:, 2] /= z_stretch
        lam = rng.uniform(*wavelength_mm, size=n)
        k = direction * (2 * np.pi / lam)[:, None]
        return cls(k.astype(np.float64), rng.uniform(0, 2 * np.pi, size=n))

    def __call__(self, blk: Block) -> np.ndarray:
        nz, ny, nx = blk.shape
        n = len(self.phase)
        zz = self.k[:, 2, None] * blk.z[:, 0, 0][None, :]  # (n, nz)
        amp = np.sqrt(2.0 / n)
        # C order matters: numpy's matmul with a transposed float32 operand is ~20x slower here
        lhs = np.ascontiguousarray((np.concatenate([np.cos(zz), -np.sin(zz)], axis=0).T * amp).astype(F32))
        key = (id(self), blk.sl[1].start, blk.sl[1].stop, blk.sl[2].start, blk.sl[2].stop, ny, nx)
        rhs = None if blk.shared is None else blk.shared.get(key)
        if rhs is None:
            k = self.k.astype(F32)
            xy = k[:, 0, None, None] * blk.x[0] + k[:, 1, None, None] * blk.y[0] + self.phase.astype(F32)[:, None, None]
            rhs = np.concatenate([np.cos(xy), np.sin(xy)], axis=0).reshape(2 * n, ny * nx)
            if blk.shared is not None:
                blk.shared[key] = rhs
        return (lhs @ rhs).reshape(nz, ny, nx)

    def at(self, points: np.ndarray) -> np.ndarray:
        """The field at (n, 3) points (x, y, z) in mm."""
        amp = np.sqrt(2.0 / len(self.phase))
        return amp * np.cos(points @ self.k.T + self.phase).sum(axis=1)


def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


# ---------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid, optionally turned about z by ``angle`` (radians); q < 1 inside."""

    c: tuple[float, float, float]
    r: tuple[float, float, float]
    angle: float = 0.0
    bumps: WaveField | None = None
    bump_amp: float = 0.0

    def bbox(self, pad: float = 0.0) -> Bbox:
        cx, cy, cz = self.c
        rx, ry, rz = self.r
        if self.angle:
            ca, sa = abs(np.cos(self.angle)), abs(np.sin(self.angle))
            rx, ry = np.hypot(rx * ca, ry * sa), np.hypot(rx * sa, ry * ca)
        g = 1.0 + self.bump_amp
        rx, ry, rz = rx * g + pad, ry * g + pad, rz * g + pad
        return (cx - rx, cx + rx, cy - ry, cy + ry, cz - rz, cz + rz)

    def q(self, blk: Block, bumps: np.ndarray | None = None) -> np.ndarray:
        """Normalised radius squared; ``bumps`` is this shape's field on ``blk`` if already computed."""
        cx, cy, cz = self.c
        rx, ry, rz = self.r
        dx, dy = blk.x - F32(cx), blk.y - F32(cy)
        if self.angle:
            ca, sa = F32(np.cos(self.angle)), F32(np.sin(self.angle))
            u, v = dx * ca + dy * sa, dy * ca - dx * sa
            qxy = (u / F32(rx)) ** 2 + (v / F32(ry)) ** 2
        else:
            qxy = (dx / F32(rx)) ** 2 + (dy / F32(ry)) ** 2
        q = qxy + ((blk.z - F32(cz)) / F32(rz)) ** 2
        if self.bumps is not None and self.bump_amp:
            q = q + F32(self.bump_amp) * (self.bumps(blk) if bumps is None else bumps)
        return q

    @property
    def rmin(self) -> float:
        return float(min(self.r))


@dataclass(frozen=True)
class Capsule:
    """A round tube between two points (exact signed distance, mm)."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    r: float

    def bbox(self, pad: float = 0.0) -> Bbox:
        lo = np.minimum(self.a, self.b) - self.r - pad
        hi = np.maximum(self.a, self.b) + self.r + pad
        return (lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])

    def split(self, max_len: float | None = None) -> tuple[Capsule, ...]:
        """Shorter pieces of the same tube: tight bounding boxes, so long oblique tubes stay cheap."""
        a, b = np.asarray(self.a, dtype=np.float64), np.asarray(self.b, dtype=np.float64)
        max_len = max(16.0, 1.6 * self.r) if max_len is None else max_len
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / max_len)))
        pts = [tuple(float(v) for v in a + (b - a) * i / n) for i in range(n + 1)]
        return tuple(Capsule(pts[i], pts[i + 1], self.r) for i in range(n))

    def dist2(self, blk: Block) -> np.ndarray:
        """Squared distance (mm^2) to the axis segment: |p-a|^2 - t (2 s - t |d|^2), s = (p-a).d."""
        a = np.asarray(self.a, dtype=F32)
        d = np.asarray(self.b, dtype=F32) - a
        dd = F32(max(float(d @ d), 1e-6))
        px, py, pz = blk.x - a[0], blk.y - a[1], blk.z - a[2]
        s = (px * d[0] + py * d[1]) + pz * d[2]
        pa2 = (px * px + py * py) + pz * pz
        t = np.clip(s * (1 / dd), 0, 1)
        return pa2 - t * (s + s - t * dd)

    def sdf(self, blk: Block) -> np.ndarray:
        return np.sqrt(np.maximum(self.dist2(blk), 0)) - F32(self.r)

    def inside(self, blk: Block, inset: float = 0.0) -> np.ndarray:
        r = max(self.r - inset, 0.0)
        return self.dist2(blk) < F32(r * r)


@dataclass(frozen=True)
class Tube:
    """An elliptical tube whose centreline is a function of one axis ('x' or 'z').

    Knots give the centre (two coordinates) and the two semi-axes along the axis; between knots they
    are interpolated linearly, which is smooth enough once the knots are dense. Outside the knot range
    the tube does not exist. q < 1 inside.
    """

    axis: str  # "x": centre (y, z) and radii (ry, rz) vary with x; "z": centre (x, y), radii (rx, ry)
    t: np.ndarray  # knot positions along the axis (ascending)
    c1: np.ndarray
    c2: np.ndarray
    r1: np.ndarray
    r2: np.ndarray

    def bbox(self, pad: float = 0.0) -> Bbox:
        lo1, hi1 = float(np.min(self.c1 - self.r1)) - pad, float(np.max(self.c1 + self.r1)) + pad
        lo2, hi2 = float(np.min(self.c2 - self.r2)) - pad, float(np.max(self.c2 + self.r2)) + pad
        t0, t1 = float(self.t[0]), float(self.t[-1])
        if self.axis == "x":
            return (t0, t1, lo1, hi1, lo2, hi2)
        return (lo1, hi1, lo2, hi2, t0, t1)

    def profile(self, along: np.ndarray) -> tuple[np.ndarray, ...]:
        out = [np.interp(along, self.t, v).astype(F32) for v in (self.c1, self.c2, self.r1, self.r2)]
        valid = (along >= self.t[0]) & (along <= self.t[-1])
        out[2] = np.where(valid, np.maximum(out[2], 1e-3), np.float32(1e-3)).astype(F32)
        out[3] = np.where(valid, np.maximum(out[3], 1e-3), np.float32(1e-3)).astype(F32)
        return tuple(out) + (valid,)

    def q(self, blk: Block, scale: np.ndarray | float = 1.0) -> np.ndarray:
        if self.axis == "x":
            c1, c2, r1, r2, valid = self.profile(blk.x[0, 0])
            q = ((blk.y - c1) / (r1 * scale)) ** 2 + ((blk.z - c2) / (r2 * scale)) ** 2
            return np.where(valid, q, np.float32(9.0))
        c1, c2, r1, r2, valid = self.profile(blk.z[:, 0, 0])
        c1, c2, r1, r2, valid = (a[:, None, None] for a in (c1, c2, r1, r2, valid))
        q = ((blk.x - c1) / (r1 * scale)) ** 2 + ((blk.y - c2) / (r2 * scale)) ** 2
        return np.where(valid, q, np.float32(9.0))


def knots(points: Sequence[Sequence[float]], step: float = 4.0) -> np.ndarray:
    """Densify control points (rows: t, values...) with a smooth (Catmull-Rom-like) interpolation."""
    p = np.asarray(points, dtype=np.float64)
    t = p[:, 0]
    dense = np.arange(t[0], t[-1] + 1e-9, step)
    if dense[-1] < t[-1]:
        dense = np.append(dense, t[-1])
    from scipy.interpolate import PchipInterpolator

    cols = [PchipInterpolator(t, p[:, i])(dense) for i in range(1, p.shape[1])]
    return np.column_stack([dense, *cols])


def tube_from(axis: str, points: Sequence[Sequence[float]], step: float = 4.0) -> Tube:
    """A Tube through control rows (t, c1, c2, r1, r2), smoothly densified."""
    k = knots(points, step)
    return Tube(axis, k[:, 0], k[:, 1], k[:, 2], k[:, 3], k[:, 4])


Painter = Callable[[Canvas], None]
