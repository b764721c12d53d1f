"""(b) Intensity statistics of the body region (CT) or the breast (mammography) against the training data.

The statistics are cheap summaries a shifted acquisition moves: contrast raises soft-tissue HU, a sharp
kernel or a low dose raises the noise, metal adds voxels above 2500 HU, a truncated field of view puts
the body against the image edge, a child is narrower. The card holds each statistic's distribution on
the training data and the range accepted (`edgescreen models domain-calibrate` measures them).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from edgescreen.appliance.modelcard import IntensityDomain
from edgescreen.appliance.pipeline.domain.verdict import DomainReport

BODY_HU = -500.0
_STEP = (2, 4, 4)  # decimation (z, y, x): statistics of 1/32 of the voxels are stable to well under 1 HU


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The largest connected region above -500 HU: the patient (and whatever touches it)."""
    mask = hu > BODY_HU
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _noise(hu: np.ndarray) -> tuple[float, float]:
    """(noise, texture) of soft tissue on three native middle slices.

    noise: the median local SD (7x7) inside eroded soft tissue; dose and kernel set it. texture: the
    median local SD (3x3) of the image minus its Gaussian blur (sigma 1.5 px), over the noise: the share
    of the noise at the finest scale, which a sharp kernel raises whatever the dose."""
    z = hu.shape[0] // 2
    sds, fine = [], []
    for k in sorted({max(z - 5, 0), z, min(z + 5, hu.shape[0] - 1)}):
        img = hu[k].astype(np.float32)
        smooth = ndimage.gaussian_filter(img, 2.0)  # tissue chosen on the smoothed image: noise must not hide it
        tissue = ndimage.binary_erosion((smooth > 0) & (smooth < 100), iterations=4)
        if tissue.sum() <= 50:
            continue
        sds.append(_local_sd(img, 7)[tissue])
        fine.append(_local_sd(img - ndimage.gaussian_filter(img, 1.5), 3)[tissue])
    if not sds:
        return float("nan"), float("nan")
    noise = float(np.median(np.concatenate(sds)))
    return noise, float(np.median(np.concatenate(fine))) / max(noise, 1e-3)


def _local_sd(img: np.ndarray, size: int) -> np.ndarray:
    mean = ndimage.uniform_filter(img, size)
    sq = ndimage.uniform_filter(img * img, size)
    return np.sqrt(np.maximum(sq - mean * mean, 0.0))


def ct_statistics(hu: np.ndarray, spacing_zyx: tuple[float, float, float]) -> dict[str, float]:
    """The body statistics of a CT volume (z, y, x) in HU, canonical orientation, at native resolution."""
    small = hu[:: _STEP[0], :: _STEP[1], :: _STEP[2]].astype(np.float32)
    body = body_mask(small)
    values = small[body]
    if values.size == 0:
        return {"body_area_fraction": 0.0}
    p = np.percentile(values, [5, 25, 50, 75, 95])
    noise, texture = _noise(hu)
    edges = np.concatenate([body[:, 0, :], body[:, -1, :], body[:, :, 0], body[:, :, -1]], axis=1)
    mid = body[body.shape[0] // 2]
    cols = np.flatnonzero(mid.any(axis=0))
    width = (cols[-1] - cols[0] + 1) * spacing_zyx[2] * _STEP[2] if cols.size else 0.0
    return {
        "body_hu_p05": float(p[0]), "body_hu_p25": float(p[1]), "body_hu_p50": float(p[2]),
        "body_hu_p75": float(p[3]), "body_hu_p95": float(p[4]),
        "fat_fraction": float(np.mean((values >= -190) & (values <= -30))),
        "soft_tissue_fraction": float(np.mean((values >= 0) & (values <= 100))),
        "bone_fraction": float(np.mean(values > 300)),
        "metal_fraction": float(np.mean(values > 2500)),
        "noise_hu": noise, "noise_texture": texture,
        "body_area_fraction": float(body.mean()),
        "body_edge_fraction": float(edges.mean()),
        "body_width_mm": float(width),
    }


def mg_statistics(raw: np.ndarray, scaled: np.ndarray) -> dict[str, float]:
    """Breast statistics: `raw` as read (for the grey levels actually used), `scaled` percentile-scaled to [0, 1]."""
    sample = raw[:: max(1, raw.shape[0] // 512), :: max(1, raw.shape[1] // 512)]
    levels = np.unique(np.asarray(sample)).size
    breast = scaled > 0.1
    values = scaled[breast] if breast.any() else np.zeros(1, np.float32)
    p = np.percentile(values, [25, 50, 75])
    return {"breast_fraction": float(breast.mean()), "breast_p25": float(p[0]), "breast_p50": float(p[1]),
            "breast_p75": float(p[2]), "grey_levels": float(np.log2(max(levels, 1)))}


_NAMES = {"body_hu": "body HU", "fat_fraction": "fat fraction", "soft_tissue_fraction": "soft-tissue fraction",
          "bone_fraction": "bone fraction", "metal_fraction": "metal fraction (above 2500 HU)",
          "noise_hu": "image noise (HU)", "noise_texture": "fine-scale share of the noise (kernel sharpness)", "body_area_fraction": "body area fraction",
          "body_edge_fraction": "share of the image border the body touches (truncated field of view?)",
          "body_width_mm": "body width (mm)", "grey_levels": "grey levels used (log2)"}


def _label(name: str) -> str:
    for key, words in _NAMES.items():
        if name.startswith(key):
            return words + (f" {name[len(key) + 1:]}" if name != key else "")
    return name.replace("_", " ")


def check(domain: IntensityDomain, stats: dict[str, float], report: DomainReport, check: str = "intensity") -> None:
    """Flag every statistic outside its accepted range; record them all."""
    for name, value in stats.items():
        report.measure(name, value)
    for name, allowed in domain.statistics.items():
        value = stats.get(name)
        if value is None or not np.isfinite(value):
            report.skipped(f"{check}.{name}", "could not be measured on this study")
            continue
        if not allowed.low <= value <= allowed.high:
            sigmas = (value - allowed.mean) / allowed.std if allowed.std > 0 else float("inf")
            report.flag(check, f"{_label(name)} {value:.3g} is outside the training range "
                               f"[{allowed.low:.3g}, {allowed.high:.3g}] ({sigmas:+.1f} SD from the training mean)")
    report.passed(check)
