"""PNG key images: the slices a clinician looks at first, with the findings drawn on them.

Each image carries its own caption and the research-use banner burned into the pixels, so a key image
that is forwarded, printed or screenshotted on its own can never be mistaken for a clinical result.
CT images are shown in the abdomen window (W400 L40) in radiological orientation (patient's right
on the image's left, anterior at the top), with square pixels; mammograms with the heatmap overlaid.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from edgescreen.appliance import RESEARCH_USE_BANNER
from edgescreen.appliance.pipeline.checkpoint import atomic_write_bytes

ABDOMEN_WINDOW = (40.0, 400.0)  # level, width
PANCREAS_RGB = (0, 220, 255)
LESION_RGBA = (255, 40, 40, 110)
_MIN_SIDE = 512
_MAX_SIDE = 1024


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Display window to uint8: below the window black, above white."""
    low = level - width / 2.0
    scaled = (np.asarray(values, dtype=np.float32) - low) / width
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def display_size(shape: Sequence[int], spacing_yx: Sequence[float] = (1.0, 1.0)) -> tuple[int, int]:
    """(width, height) with square pixels, scaled into [_MIN_SIDE, _MAX_SIDE] for legibility."""
    height_mm, width_mm = shape[0] * spacing_yx[0], shape[1] * spacing_yx[1]
    scale = max(_MIN_SIDE / min(height_mm, width_mm), 1e-6)
    scale = min(scale, _MAX_SIDE / max(height_mm, width_mm)) if max(height_mm, width_mm) * scale > _MAX_SIDE else scale
    return max(int(round(width_mm * scale)), 1), max(int(round(height_mm * scale)), 1)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, iterations=2)


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap by rendered pixel width (character counts overflow with proportional fonts)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _compose_text(image: Image.Image, caption: str) -> Image.Image:
    """Caption above, the research-use banner below, both part of the pixels."""
    font, small = _font(16), _font(12)
    width = image.width
    head = _wrap(caption, font, width - 12)
    foot = _wrap(RESEARCH_USE_BANNER, small, width - 12)
    head_h, foot_h = 8 + 20 * len(head), 8 + 15 * len(foot)
    canvas = Image.new("RGB", (width, image.height + head_h + foot_h), (0, 0, 0))
    canvas.paste(image, (0, head_h))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(head):
        draw.text((6, 4 + 20 * i), line, fill=(255, 255, 255), font=font)
    draw.rectangle([0, image.height + head_h, width, canvas.height], fill=(90, 0, 0))
    for i, line in enumerate(foot):
        draw.text((6, image.height + head_h + 4 + 15 * i), line, fill=(255, 235, 120), font=small)
    return canvas


def _save_png(image: Image.Image, path: Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def ct_key_image(hu: np.ndarray, spacing_yx: Sequence[float], pancreas: np.ndarray | None, lesion: np.ndarray | None,
                 caption: str, path: Path) -> Path:
    """One axial slice: abdomen window, pancreas contour, lesion filled semi-transparent, caption, banner."""
    size = display_size(hu.shape, spacing_yx)
    grey = Image.fromarray(window(hu, *ABDOMEN_WINDOW)).resize(size, Image.BILINEAR).convert("RGBA")
    overlay = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    if lesion is not None and lesion.any():
        overlay[_resize_mask(lesion, size)] = LESION_RGBA
    if pancreas is not None and pancreas.any():
        overlay[_outline(_resize_mask(pancreas, size))] = (*PANCREAS_RGB, 255)
    image = Image.alpha_composite(grey, Image.fromarray(overlay, "RGBA")).convert("RGB")
    return _save_png(_compose_text(image, caption), path)


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """A small blue-yellow-red ramp for a [0, 1] heatmap (RGB uint8), without a plotting library."""
    h = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    r = np.clip(2.0 * h, 0, 1)
    g = np.clip(2.0 - 2.0 * np.abs(2.0 * h - 1.0) - 0.3, 0, 1)
    b = np.clip(1.0 - 2.0 * h, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def heat_rgba(heatmap: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The heatmap resized to `size` (width, height), coloured, opaque only where it is high (alpha 0 below
    0.2, rising to 160 at 1.0): the one look of the heatmap, in key images and in the viewer's overlay."""
    heat = np.asarray(Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize(size, Image.BILINEAR))
    alpha = (np.clip((heat - 0.2) / 0.8, 0, 1) * 160).astype(np.uint8)
    return Image.fromarray(np.dstack([heat_colours(heat), alpha]), "RGBA")


def mammo_key_image(pixels: np.ndarray, heatmap: np.ndarray, caption: str, path: Path) -> Path:
    """A mammogram (percentile-scaled grey) with its suspicion heatmap blended where it is high."""
    lo, hi = np.percentile(pixels, [1, 99])
    grey = (np.clip((pixels - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255).astype(np.uint8)
    size = display_size(grey.shape)
    base = Image.fromarray(grey).resize(size, Image.BILINEAR).convert("RGB")
    image = Image.alpha_composite(base.convert("RGBA"), heat_rgba(heatmap, size)).convert("RGB")
    return _save_png(_compose_text(image, caption), path)


HEATMAP_MAX_SIDE = 1024  # the web viewer shows a view at most this size (appliance.web.render.MAX_SIDE)


def mammo_heatmap_overlay(heatmap: np.ndarray, path: Path) -> Path:
    """The heatmap alone as a transparent PNG with the view's geometry (its rows x columns, orientation and
    field of view; a view larger than HEATMAP_MAX_SIDE is scaled down whole, as the viewer shows it), for a
    viewer to lay over the plain image and toggle. No caption: it is never shown without its image."""
    rows, cols = np.asarray(heatmap).shape[-2:]
    scale = min(1.0, HEATMAP_MAX_SIDE / max(rows, cols))
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    return _save_png(heat_rgba(heatmap, size), path)
