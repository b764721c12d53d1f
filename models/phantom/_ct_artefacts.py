"""Scanner effects on the painted patient: metal and its streaks, kernel edges, truncation, calibration.

Why here and not in the anatomy: these belong to the acquisition (``_ct_acquisition.Acquisition``),
not to the patient; the same seed scanned twice differs only by them. Each effect is applied to one
z-chunk of the canvas in anatomical mm, like every painter, so a render at any grid agrees with itself.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from edgescreen.models.phantom._canvas import F32, Canvas, Capsule, Painter
from edgescreen.models.phantom._ct_acquisition import KERNEL_NOISE, Acquisition

METAL_HU = 3071.0


def metal_painter(ab, seed: int) -> Painter:  # noqa: ANN001 - Abdomen
    """Posterior spinal fixation (two rods, pedicle screws) over 2-4 levels and its streak artefacts.

    Streaks on real CT come from photon starvation and beam hardening between dense objects: a dark
    band along the line joining them and alternating bright and dark rays around them, fading with
    distance. They are drawn per slice where the metal is, over the body only.
    """
    rng = np.random.default_rng([int(seed) % 2**63, 0x3E7A])
    vb_rx, vb_ry = ab.vb_r
    yc = ab.y_vb + vb_ry + 10
    levels = int(rng.integers(2, 5))
    z0 = float(rng.uniform(-90, -10))
    z1 = z0 + levels * ab.vb_pitch
    gap = float(rng.uniform(14, 20))
    rods = [Capsule((side * gap, yc + 4, z0), (side * gap, yc + 6, z1), 3.0) for side in (-1, 1)]
    screws = []
    for k in range(levels + 1):
        z = z0 + k * ab.vb_pitch
        for side in (-1, 1):
            screws.append(Capsule((side * gap, yc + 4, z), (side * 6.0, ab.y_vb - vb_ry * 0.3, z), 2.6))
    amp = float(rng.uniform(90, 260))
    rays = int(rng.integers(8, 18))
    phase = float(rng.uniform(0, 2 * np.pi))

    def paint(cv: Canvas) -> None:
        for cap in (*rods, *screws):
            blk = cv.block(cap.bbox())
            if blk is not None:
                cv.paint(blk, cap.sdf(blk) < 0, METAL_HU)
        blk = cv.block((-400, 400, -400, 400, z0 - 3, z1 + 3))
        if blk is None:
            return
        dx, dy = blk.x - F32(0.0), blk.y - F32(yc)
        r = np.sqrt(dx * dx + dy * dy) + F32(1.0)
        theta = np.arctan2(dy, dx)
        streak = F32(amp) * np.cos(F32(rays) * theta + F32(phase)) * np.exp(-r / F32(55.0)) * np.minimum(r / F32(12.0), 1)
        band = F32(-0.9 * amp) * np.exp(-((dy - F32(4.0)) / F32(4.0)) ** 2) * (np.abs(dx) < F32(gap + 40))
        body = cv.layers[blk.sl] > 0
        hu = cv.hu[blk.sl]
        delta = np.broadcast_to(streak + band, hu.shape)
        np.copyto(hu, np.where(body & (hu < METAL_HU), hu + delta, hu))

    return paint


def post_process(cv: Canvas, acq: Acquisition, px_mm: float, fov_mm: float, scale: float,
                 offset: tuple[float, float, float]) -> None:
    """Kernel edge enhancement, truncation (circular field of view with a bright rim) and HU offset, in place."""
    hu = cv.hu
    amount = KERNEL_NOISE[acq.kernel][2]
    if amount:
        # a sharp kernel overshoots at edges: unsharp masking with a ~1 mm Gaussian
        sigma = max(0.5, 1.0 / px_mm)
        hu += F32(amount) * (hu - ndimage.gaussian_filter(hu, (0, sigma, sigma), mode="nearest"))
    if acq.fov_mm is not None:
        # patient coordinates of the pixels: the reconstruction circle is centred on the FOV
        px = cv.x[None, :] * F32(scale) + F32(offset[0])
        py = cv.y[:, None] * F32(scale) + F32(offset[1])
        rr = np.sqrt(px * px + py * py)
        edge = F32(fov_mm / 2) - rr
        rim = (edge < 5) & (edge >= 0)
        hu[:, rim] = np.where(hu[:, rim] > -500, hu[:, rim] + 180.0, hu[:, rim])
        hu[:, edge < 0] = -1000.0
    if acq.hu_offset:
        hu += F32(acq.hu_offset)
