"""The fonts the PDF report embeds, found on the box at run time (nothing is downloaded).

DejaVu Sans covers Latin, Greek, Cyrillic and most symbols; patient names in Chinese, Japanese or
Korean need a CJK font and names in Amharic or Tigrinya an Ethiopic one. The Debian packages below
provide them (the Makefile installs them; a technician installs them on a box with `apt-get install`).
A font directory can be added with EDGESCREEN_FONT_DIRS (colon-separated) for boxes with fonts
elsewhere. A script that no installed font covers is refused with the package to install, rather than
printed as empty boxes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_SYSTEM_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")


class FontMissing(RuntimeError):
    """A font the report needs is not installed; the message names the Debian package to install."""


@dataclass(frozen=True)
class FontSpec:
    family: str
    files: tuple[str, ...]  # candidate file names, first found wins
    package: str
    covers: str  # what it is for, in words
    ranges: tuple[tuple[int, int], ...] = ()  # code points it is needed for (fallback fonts)
    collection_index: int = 0  # the face inside a .ttc


MAIN = FontSpec("DejaVu", ("DejaVuSans.ttf",), "fonts-dejavu-core", "Latin, Greek and Cyrillic text")
MAIN_BOLD = FontSpec("DejaVu", ("DejaVuSans-Bold.ttf",), "fonts-dejavu-core", "bold headings")
FALLBACKS = (
    FontSpec("WenQuanYi", ("wqy-microhei.ttc", "wqy-zenhei.ttc", "NotoSansCJK-Regular.ttc"), "fonts-wqy-microhei",
             "Chinese, Japanese and Korean names",
             ((0x2E80, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF), (0x20000, 0x2FA1F))),
    FontSpec("AbyssinicaSIL", ("AbyssinicaSIL-Regular.ttf", "NotoSansEthiopic-Regular.ttf"), "fonts-sil-abyssinica",
             "Ethiopic (Amharic, Tigrinya) names", ((0x1200, 0x139F), (0x2D80, 0x2DDF), (0xAB00, 0xAB2F))),
)


def _dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("EDGESCREEN_FONT_DIRS", "").split(":") if p]
    return [*extra, *(Path(d) for d in _SYSTEM_DIRS)]


_FOUND: dict[str, Path | None] = {}


def find(spec: FontSpec) -> Path | None:
    """The first installed file of the spec, searched under the font directories (cached per process)."""
    key = "|".join(spec.files)
    if key not in _FOUND:
        _FOUND[key] = None
        for name in spec.files:
            for root in _dirs():
                hits = sorted(root.rglob(name)) if root.is_dir() else []
                if hits:
                    _FOUND[key] = hits[0]
                    break
            if _FOUND[key] is not None:
                break
    return _FOUND[key]


def require(spec: FontSpec) -> Path:
    path = find(spec)
    if path is None:
        raise FontMissing(f"the PDF report needs the font {spec.files[0]} for {spec.covers}; it is not installed "
                          f"under {', '.join(str(d) for d in _dirs())}: install it with "
                          f"`apt-get install {spec.package}` (or set EDGESCREEN_FONT_DIRS)")
    return path


def needed_fallbacks(text: str) -> list[FontSpec]:
    """The fallback fonts the text needs; FontMissing when one of them is not installed."""
    points = {ord(c) for c in text}
    needed = [spec for spec in FALLBACKS if any(lo <= p <= hi for p in points for lo, hi in spec.ranges)]
    for spec in needed:
        require(spec)
    return needed
