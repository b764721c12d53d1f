"""Synthetic screening mammograms: CC and MLO of both breasts, as "For Presentation" DICOM.

Why: the appliance must be exercised with real mammography objects (Digital Mammography X-Ray Image
Storage - For Presentation) end to end, with known findings to check the pipeline's overlays and
reports against. Anatomy is defined in millimetres from the chest wall (u) and from the top of the
detector (v), so the CC and MLO views of one breast show the same finding at a consistent depth.

Image model (MONOCHROME2, 12 bit, 0.1 mm pixels): fat is mid-grey, fibroglandular tissue (1/f^3
power-law texture masked to a central region) bright, the breast thins and darkens towards the skin,
the skin line is a thin bright rim, and the pectoral muscle is a bright triangle on MLO views.
Right breasts are mirrored so their chest wall is on the right edge, as mammograms are hung.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from scipy import fft, ndimage

from edgescreen.appliance import RESEARCH_USE_BANNER
from edgescreen.models.phantom import _dicom

MG_FINDINGS: tuple[str, ...] = ("benign", "malignant", "calcification")
VIEWS: tuple[str, ...] = ("CC", "MLO")
LATERALITIES: tuple[str, ...] = ("R", "L")
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
NATIVE_SIZE = (2048, 1664)  # rows, columns
NATIVE_SPACING_MM = 0.1
MAX_VALUE = 4095  # 12 bits stored

# SNOMED view codes as the standard's CID 4014 lists them, with the legacy SRT values they replace
_VIEW_CODES = {
    "CC": ("399162004", "SCT", "cranio-caudal", "R-10242"),
    "MLO": ("399368009", "SCT", "medio-lateral oblique", "R-10226"),
}
# Patient Orientation (rows, columns): the chest wall side and what lies towards the image bottom
_ORIENTATION = {("R", "CC"): ["P", "L"], ("L", "CC"): ["A", "R"], ("R", "MLO"): ["P", "FL"], ("L", "MLO"): ["A", "FR"]}


@dataclass
class MgImage:
    """One view: ``pixels`` (rows, columns) uint16 in 0..4095, y down from the top, x from the left."""

    pixels: np.ndarray
    pixel_spacing_mm: tuple[float, float]  # (row spacing, column spacing)
    finding: dict | None  # {"type", "centre_px": [x, y], "radius_px"} or None
    laterality: str = "L"
    view: str = "CC"
    breast: dict = field(default_factory=dict)  # density and size, for the record


@dataclass(frozen=True)
class _Breast:
    """One breast, in mm: depth from the chest wall, height along it, density, tissue levels."""

    depth: float  # chest wall to nipple (CC), mm
    height: float  # extent along the chest wall (CC), mm
    centre_v: float  # CC: centre along the chest wall, mm from the top
    power: float  # outline superellipse exponent
    edge_mm: float  # thinning zone at the skin
    density: float  # 0 fatty .. 1 extremely dense
    fat_level: float  # grey levels as fractions of MAX_VALUE
    dense_level: float
    pectoral: tuple[float, float]  # MLO pectoral width at the top and height along the chest wall, mm
    mlo_stretch: float  # MLO shows a little more tissue than CC

    @classmethod
    def sample(cls, seed: int, laterality: str) -> _Breast:
        rng = np.random.default_rng([int(seed) % 2**63, 0x3A3, LATERALITIES.index(laterality)])
        # both breasts of a woman are alike: shared draws first, then a small per-side change
        shared = np.random.default_rng([int(seed) % 2**63, 0x3A4])
        depth = shared.uniform(70, 130) * rng.uniform(0.95, 1.05)
        density = float(np.clip(shared.beta(2.0, 2.6) + rng.normal(0, 0.03), 0.02, 0.98))
        return cls(
            depth=float(depth),
            height=float(shared.uniform(125, 180) * rng.uniform(0.96, 1.04)),
            centre_v=float(NATIVE_SIZE[0] * NATIVE_SPACING_MM / 2 + rng.uniform(-8, 8)),
            power=float(shared.uniform(1.9, 2.5)),
            edge_mm=float(shared.uniform(7, 14)),
            density=density,
            fat_level=float(shared.uniform(0.26, 0.34)),
            dense_level=float(shared.uniform(0.62, 0.74)),
            pectoral=(float(rng.uniform(22, 45)), float(rng.uniform(90, 150))),
            mlo_stretch=float(rng.uniform(1.02, 1.14)),
        )


# ------------------------------------------------------------------------------------------ geometry


def _grid_mm(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = size
    v = (np.arange(rows, dtype=np.float32) + 0.5) * NATIVE_SPACING_MM
    u = (np.arange(cols, dtype=np.float32) + 0.5) * NATIVE_SPACING_MM
    return v[:, None], u[None, :]


def _outline(b: _Breast, view: str, v: np.ndarray) -> np.ndarray:
    """Breast extent from the chest wall (mm) for each row position ``v`` (mm from the top)."""
    if view == "CC":
        t = np.abs(v - b.centre_v) / (b.height / 2)
        return b.depth * np.clip(1 - t**b.power, 0, None) ** (1 / b.power)
    # MLO: from the axilla at the top down to the inframammary fold, widest below the middle
    total = NATIVE_SIZE[0] * NATIVE_SPACING_MM
    depth = b.depth * b.mlo_stretch
    v_max, v_fold = 0.5 * total, total * 0.97
    top = 0.3 + 0.15 * (b.pectoral[0] / 45)
    upper = top + (1 - top) * np.sin(np.clip(v / v_max, 0, 1) * np.pi / 2) ** 0.8
    lower = np.clip(1 - (np.maximum(v - v_max, 0) / (v_fold - v_max)) ** 2.2, 0, None) ** 0.5
    return depth * np.where(v < v_max, upper, lower)


def _upsample(small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float image to ``shape`` (rows, cols)."""
    img = Image.fromarray(np.ascontiguousarray(small, dtype=np.float32), mode="F")
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def _skin_distance(mask: np.ndarray) -> np.ndarray:
    """Distance to the skin line in mm (a coarse distance transform, smoothly upsampled)."""
    k = 4
    small = mask[::k, ::k]
    d = ndimage.distance_transform_edt(np.pad(small, 1, constant_values=False))[1:-1, 1:-1] * (k * NATIVE_SPACING_MM)
    return _upsample(d, mask.shape) * mask


def _power_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float, stretch: float = 1.0) -> np.ndarray:
    """Gaussian noise with a 1/f^beta power spectrum, unit standard deviation (the breast's texture).

    ``stretch`` > 1 elongates structures along the rows' direction (towards the nipple), as the
    ducts and their fibroglandular tissue run.
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    spec = fft.rfft2(white, workers=2)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :] * stretch
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spec *= (f ** (-beta / 2)).astype(np.float32)
    spec[0, 0] = 0
    out = fft.irfft2(spec, s=shape, workers=2).astype(np.float32)
    return out / max(float(out.std()), 1e-6)


# ------------------------------------------------------------------------------------------ findings


def _finding_site(seed: int, laterality: str, finding: str) -> tuple[float, float, float, np.random.Generator]:
    """Where the finding sits in the breast: depth fraction, CC and MLO positions (-1..1), and an rng."""
    rng = np.random.default_rng([int(seed) % 2**63, 0x3A5, LATERALITIES.index(laterality), MG_FINDINGS.index(finding)])
    return float(rng.uniform(0.3, 0.72)), float(rng.uniform(-0.55, 0.55)), float(rng.uniform(-0.5, 0.45)), rng


def _place_finding(b: _Breast, view: str, seed: int, laterality: str, finding: str) -> tuple[float, float, np.random.Generator]:
    """(u, v) in mm of the finding's centre in this view: same depth from the chest wall in both views."""
    frac, s_cc, s_mlo, rng = _finding_site(seed, laterality, finding)
    total = NATIVE_SIZE[0] * NATIVE_SPACING_MM
    v = np.arange(0, total, 0.5, dtype=np.float32)
    extent = _outline(b, view, v)
    u = frac * b.depth  # the same distance from the chest wall in both views (MLO is only stretched)
    inside = v[extent > u + 12]
    lo, hi = float(inside.min()), float(inside.max())
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    s = s_cc if view == "CC" else s_mlo
    return u, mid + s * half, rng


def _mass_profile(du: np.ndarray, dv: np.ndarray, radius: float, sharp: float, lobes: np.ndarray) -> np.ndarray:
    """0..1 mass opacity around its centre: an irregular (lobulated) disc with a soft edge."""
    r = np.sqrt(du**2 + dv**2)
    theta = np.arctan2(dv, du)
    k = np.arange(1, len(lobes) + 1)[:, None, None]
    wobble = (lobes[:, None, None] * np.cos(k * theta[None] + k)).sum(axis=0)
    edge = radius * (1 + wobble)
    return 1.0 / (1.0 + np.exp(np.clip((r - edge) / sharp, -50, 50)))


def _render_finding(img: np.ndarray, b: _Breast, kind: str, centre: tuple[float, float], rng: np.random.Generator) -> float:
    """Draw the finding into ``img`` (levels 0..1) and return its radius in mm."""
    u0, v0 = centre
    contrast = (b.dense_level - b.fat_level) * float(rng.uniform(0.3, 0.5))
    if kind == "calcification":
        radius = float(rng.uniform(3, 8))
        n = int(rng.integers(5, 21))
        ang, rad = rng.uniform(0, 2 * np.pi, n), radius * np.sqrt(rng.random(n))
        for a, r in zip(ang, rad, strict=True):
            size = float(rng.uniform(0.1, 0.25))  # radius: 0.2-0.5 mm dots
            _blob(img, (u0 + r * np.cos(a), v0 + r * np.sin(a)), size, float(rng.uniform(0.35, 0.55)))
        return radius
    radius = float(rng.uniform(4, 12))
    half = radius * (3.2 if kind == "malignant" else 1.8)
    v, u, patch = _patch(img, (u0, v0), half)
    if patch is None:
        return radius
    du, dv = u - u0, v - v0
    if kind == "benign":
        lobes = rng.normal(0, 0.025, 3)
        opacity = _mass_profile(du, dv, radius, 0.12, lobes)
    else:
        lobes = rng.normal(0, 0.08, 6)
        opacity = _mass_profile(du, dv, radius, 0.45, lobes)
        for _ in range(int(rng.integers(10, 24))):
            a = float(rng.uniform(0, 2 * np.pi))
            length = radius * float(rng.uniform(0.8, 2.4))
            width = float(rng.uniform(0.15, 0.4))
            along = du * np.cos(a) + dv * np.sin(a)
            across = -du * np.sin(a) + dv * np.cos(a) + float(rng.uniform(0.2, 0.8)) * np.sin(along / float(rng.uniform(1.5, 4)))
            t = np.clip((along - radius * 0.7) / length, 0, 1)
            taper = width * (1 - t) + 0.04
            fade = (along > radius * 0.5) * (1 - t) ** 0.7
            opacity = np.maximum(opacity, 0.5 * fade * np.exp(-(across / taper) ** 2))
    patch += np.float32(contrast) * opacity.astype(np.float32)
    return radius


def _patch(img: np.ndarray, centre: tuple[float, float], half: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A view of ``img`` around ``centre`` (mm), with its mm coordinates (v column, u row vectors)."""
    u0, v0 = centre
    s = NATIVE_SPACING_MM
    c0, c1 = max(int((u0 - half) / s), 0), min(int((u0 + half) / s) + 1, img.shape[1])
    r0, r1 = max(int((v0 - half) / s), 0), min(int((v0 + half) / s) + 1, img.shape[0])
    if c1 <= c0 or r1 <= r0:
        return np.zeros((0, 1)), np.zeros((1, 0)), None
    v = ((np.arange(r0, r1) + 0.5) * s)[:, None].astype(np.float32)
    u = ((np.arange(c0, c1) + 0.5) * s)[None, :].astype(np.float32)
    return v, u, img[r0:r1, c0:c1]


def _blob(img: np.ndarray, centre: tuple[float, float], radius: float, level: float) -> None:
    v, u, patch = _patch(img, centre, radius * 4 + 0.3)
    if patch is None:
        return
    d2 = (u - centre[0]) ** 2 + (v - centre[1]) ** 2
    patch += np.float32(level) * np.exp(-d2 / (2 * (radius * 0.8) ** 2)).astype(np.float32)


# ------------------------------------------------------------------------------------------ images


def generate_mg_image(
    seed: int, laterality: str, view: str, finding: str | None, size: tuple[int, int] | None = None
) -> MgImage:
    """Render one view of the seed's breast ``laterality`` ('L'/'R'), ``view`` ('CC'/'MLO').

    ``finding`` (one of ``MG_FINDINGS``) is placed in this breast at a position fixed by the seed,
    the side and the finding type, so the CC and MLO views of a breast agree. ``size`` (rows, cols)
    resamples the same detector area (default 2048 x 1664 at 0.1 mm).
    """
    if laterality not in LATERALITIES or view not in VIEWS:
        raise ValueError(f"laterality must be one of {LATERALITIES} and view one of {VIEWS}")
    if finding is not None and finding not in MG_FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; use one of {MG_FINDINGS} or None")
    b = _Breast.sample(seed, laterality)
    rng = np.random.default_rng([int(seed) % 2**63, 0x3A6, LATERALITIES.index(laterality), VIEWS.index(view)])
    img, mask = _breast_image(b, view, rng)
    info = None
    if finding is not None:
        u, v, frng = _place_finding(b, view, seed, laterality, finding)
        radius = _render_finding(img, b, finding, (u, v), frng)
        info = {"type": finding, "centre_mm": [u, v], "radius_mm": radius}
    img *= mask
    img += rng.normal(0, 0.004, img.shape).astype(np.float32) * mask  # quantum noise, in the breast only
    pixels = np.clip(np.rint(img * MAX_VALUE), 0, MAX_VALUE).astype(np.uint16)
    if laterality == "R":  # chest wall on the right edge
        pixels = pixels[:, ::-1]
    spacing = (NATIVE_SPACING_MM, NATIVE_SPACING_MM)
    if size is not None and tuple(size) != NATIVE_SIZE:
        rows, cols = int(size[0]), int(size[1])
        resized = Image.fromarray(pixels.astype(np.float32), mode="F").resize((cols, rows), Image.Resampling.BOX)
        pixels = np.clip(np.rint(np.asarray(resized)), 0, MAX_VALUE).astype(np.uint16)
        spacing = (NATIVE_SIZE[0] * NATIVE_SPACING_MM / rows, NATIVE_SIZE[1] * NATIVE_SPACING_MM / cols)
    finding_px = _finding_pixels(info, laterality, spacing, pixels.shape[1]) if info else None
    meta = {"density": round(b.density, 3), "depth_mm": round(b.depth, 1), "height_mm": round(b.height, 1)}
    return MgImage(np.ascontiguousarray(pixels), spacing, finding_px, laterality, view, meta)


def _finding_pixels(info: dict, laterality: str, spacing: tuple[float, float], cols: int) -> dict:
    u, v = info["centre_mm"]
    x = u / spacing[1] - 0.5
    if laterality == "R":
        x = cols - 1 - x
    return {
        "type": info["type"],
        "centre_px": [round(float(x), 1), round(float(v / spacing[0] - 0.5), 1)],
        "radius_px": round(float(info["radius_mm"] / spacing[1]), 1),
        "radius_mm": round(float(info["radius_mm"]), 2),
    }


def _breast_image(b: _Breast, view: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Levels 0..1 (chest wall at column 0) and the breast mask, before any finding."""
    v, u = _grid_mm(NATIVE_SIZE)
    extent = _outline(b, view, v)
    mask = u < extent
    d = _skin_distance(mask)
    thick = np.clip(d / b.edge_mm, 0, 1)
    thick = thick * thick * (3 - 2 * thick)
    # the 1/f^3 texture has almost no fine detail: draw it on a 4x coarser grid and upsample
    coarse = _upsample(_power_noise(rng, (NATIVE_SIZE[0] // 4, NATIVE_SIZE[1] // 4), 3.0, stretch=1.8), NATIVE_SIZE)
    fine = _power_noise(rng, NATIVE_SIZE, 2.0, stretch=2.5)
    depth = b.depth * (b.mlo_stretch if view == "MLO" else 1.0)
    centre_v = b.centre_v if view == "CC" else 0.55 * NATIVE_SIZE[0] * NATIVE_SPACING_MM
    half_h = b.height / 2 if view == "CC" else 0.42 * NATIVE_SIZE[0] * NATIVE_SPACING_MM
    envelope = np.exp(-(((u / depth) - 0.42) / 0.33) ** 2 - ((v - centre_v) / (0.75 * half_h)) ** 2)
    threshold = 1.6 - 3.0 * b.density
    g = np.clip((coarse + 0.5 * fine + 2.4 * envelope - 1.0 - threshold) / 3.2 + 0.5, 0, 1)
    glandular = g * g * (3 - 2 * g) * thick  # a soft, cloudy transition from fat to dense tissue
    level = b.fat_level * (0.45 + 0.55 * thick) + (b.dense_level - b.fat_level) * glandular
    level += 0.02 * fine * thick  # fine trabecular / Cooper's ligament texture
    level += 0.06 * np.exp(-d / 0.6) * mask  # skin line
    if view == "MLO":
        pw, ph = b.pectoral
        pect_edge = pw * np.clip(1 - v / ph, 0, None) ** 0.9
        pect = 1 / (1 + np.exp(np.clip((u - pect_edge) / 0.8, -50, 50)))
        level = level * (1 - pect) + pect * (b.dense_level + 0.04 + 0.02 * coarse)
    return level.astype(np.float32), mask.astype(np.float32)


# ------------------------------------------------------------------------------------------ DICOM


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _mg_dataset(image: MgImage, seed: int, exam: str, ids: tuple[str, str], number: int) -> Dataset:
    """The image as a Digital Mammography X-Ray Image (For Presentation) object."""
    lat, view = image.laterality, image.view
    study_uid, series_uid = ids
    sop = _dicom.uid("mg", seed, exam, "sop", lat, view, image.pixels.shape)
    ds = _dicom.new_file_dataset(MG_FOR_PRESENTATION, sop)
    date, time = _dicom.study_datetime("MG", seed)
    age = 40 + seed % 35
    _dicom.patient_module(ds, "MG", seed, "F", age, date)
    _dicom.study_module(ds, "MG", seed, study_uid, "MAMMOGRAPHY SCREENING BILATERAL")
    _dicom.equipment_module(ds, "PHANTOM-MG")
    ds.Modality = "MG"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Screening mammogram 4 views"
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.BodyPartExamined = "BREAST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.InstanceNumber = number
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDate, ds.AcquisitionTime = date, time
    ds.PatientOrientation = _ORIENTATION[(lat, view)]
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.ImageLaterality = lat
    ds.ViewPosition = view
    code, scheme, meaning, _legacy = _VIEW_CODES[view]
    view_item = _code_item(code, scheme, meaning)
    view_item.ViewModifierCodeSequence = Sequence([])
    ds.ViewCodeSequence = Sequence([view_item])
    ds.AnatomicRegionSequence = Sequence([_code_item("76752008", "SCT", "Breast")])
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.PositionerPrimaryAngle = 0 if view == "CC" else (45 if lat == "R" else -45)
    ds.DistanceSourceToDetector = 650
    ds.EstimatedRadiographicMagnificationFactor = 1.0
    ds.BodyPartThickness = 40 + seed % 30
    ds.CompressionForce = 80 + seed % 60
    ds.KVP = 28 + seed % 4
    ds.ExposureTime = 900
    ds.XRayTubeCurrent = 100
    ds.Exposure = 90
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = "RHODIUM"
    ds.DetectorType = "DIRECT"
    ds.DetectorConfiguration = "AREA"
    ds.Grid = "RECIPROCATING"
    ds.FocalSpots = 0.3
    ds.AcquisitionContextSequence = Sequence([])
    rs, cs = image.pixel_spacing_mm
    ds.ImagerPixelSpacing = [round(rs, 6), round(cs, 6)]
    ds.PixelSpacing = [round(rs, 6), round(cs, 6)]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "phantom geometry, no magnification"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.VOILUTFunction = "LINEAR"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.QualityControlImage = "NO"
    ds.ImageComments = RESEARCH_USE_BANNER
    ds.PixelData = image.pixels.astype("<u2").tobytes()
    return ds


def write_mg_exam(out_dir: Path, seed: int, finding: str | None = None) -> dict:
    """Write the four views (RCC, LCC, RMLO, LMLO) and ``truth.json`` into ``out_dir``; return the truth.

    A finding goes in one breast, chosen by the seed, and appears in both of its views.
    """
    if finding is not None and finding not in MG_FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; use one of {MG_FINDINGS} or None")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    side = LATERALITIES[int(np.random.default_rng([int(seed) % 2**63, 0x3A7]).integers(0, 2))]
    study_uid = _dicom.uid("mg", seed, finding or "none", "study")
    series_uid = _dicom.uid("mg", seed, finding or "none", "series")
    truth: dict = {
        "seed": int(seed),
        "finding": finding,
        "finding_laterality": side if finding else None,
        "pixel_spacing_mm": [NATIVE_SPACING_MM, NATIVE_SPACING_MM],
        "images": {},
        "notes": "centre_px is [x, y]: x from the left edge, y from the top. " + RESEARCH_USE_BANNER,
    }
    for number, (lat, view) in enumerate((("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")), start=1):
        image = generate_mg_image(seed, lat, view, finding if lat == side else None)
        name = f"MG_{lat}{view}.dcm"
        ds = _mg_dataset(image, seed, finding or "none", (study_uid, series_uid), number)
        _dicom.save(ds, out_dir / name)
        truth["images"][f"{lat}{view}"] = {
            "file": name,
            "laterality": lat,
            "view": view,
            "rows": int(image.pixels.shape[0]),
            "columns": int(image.pixels.shape[1]),
            "finding": image.finding,
            "breast": image.breast,
        }
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return truth
