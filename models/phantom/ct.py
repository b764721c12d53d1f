"""Synthetic non-contrast abdominal CT: a seeded patient, optional pancreatic lesion, real DICOM.

Why it is built this way: the appliance needs realistic CT series (512x512 axial slices with correct
geometry) to exercise its pipeline end to end, and the pancreas models need unlimited labelled
training data. Both come from one analytic patient (``_ct_anatomy.Abdomen``) defined in millimetres
by the seed; ``generate_ct_volume`` samples it on any grid (coarse for training, the seed's own
512x512 series for DICOM), ``write_ct_series`` turns a sampled volume into a DICOM series.

Noise is spatially correlated (blurred like a reconstruction kernel, never per-voxel white noise) and
the scanner's blur is applied in the same pass, so organ edges are soft as on a real scanner.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from scipy import ndimage

from edgescreen.appliance import RESEARCH_USE_BANNER
from edgescreen.models.phantom import _dicom
from edgescreen.models.phantom._canvas import Canvas, Painter
from edgescreen.models.phantom._ct_acquisition import (
    CONTRAST_PHASES,
    KERNEL_NOISE,
    KERNELS,
    SCAN_RANGES,
    Acquisition,
    enhance,
)
from edgescreen.models.phantom._ct_anatomy import Abdomen
from edgescreen.models.phantom._ct_artefacts import metal_painter, post_process
from edgescreen.models.phantom._ct_lesions import LESION_CLASSES, LesionModel, sample_lesion

ORGAN_LABELS: dict[str, int] = {
    "pancreas": 1,
    "liver": 2,
    "spleen": 3,
    "right_kidney": 4,
    "left_kidney": 5,
    "aorta": 6,
    "vertebrae": 7,
}
__all__ = [
    "CONTRAST_PHASES", "KERNELS", "LESION_CLASSES", "ORGAN_LABELS", "SCAN_RANGES", "Acquisition", "CtPhantom",
    "generate_ct_volume", "write_ct_series", "write_ct_study",
]

HU_MIN, HU_MAX = -1024, 3071  # 12-bit storage with RescaleIntercept -1024
CHUNK_VOXELS = 1 << 22  # ~4 M voxels per rendering chunk: bounded memory, cache-friendly
BLUR_TRUNCATE = 2.0  # Gaussian kernel radius in sigmas (7 taps at the usual 1.5 px)


@dataclass
class CtPhantom:
    """A sampled phantom: arrays are (z, y, x); slice 0 is the most caudal (z ascends with index)."""

    hu: np.ndarray  # int16 Hounsfield units
    labels: np.ndarray  # uint8, ORGAN_LABELS ids (the pancreas label includes any lesion)
    lesion: np.ndarray  # uint8 0/1
    spacing_mm: tuple[float, float, float]  # (dz, dy, dx)
    origin_mm: tuple[float, float, float]  # patient (x, y, z) of voxel [0, 0, 0] (its centre)
    lesion_class: str | None
    truth: dict


@dataclass(frozen=True)
class _Grid:
    """Where the patient is sampled: anatomical mm per axis and the patient-coordinate origin."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    native_pixel_mm: float
    offset: tuple[float, float, float]
    scale: float = 1.0  # patient mm per anatomical mm (a child is a scaled adult)

    def patient_of(self, anat_xyz: tuple[float, float, float]) -> tuple[float, float, float]:
        return tuple(a * self.scale + o for a, o in zip(anat_xyz, self.offset, strict=True))  # type: ignore[return-value]

    def voxel_of(self, anat_xyz: tuple[float, float, float]) -> list[float]:
        x, y, z = self.patient_of(anat_xyz)
        dz, dy, dx = self.spacing
        return [(z - self.origin[2]) / dz, (y - self.origin[1]) / dy, (x - self.origin[0]) / dx]


def _grid(ab: Abdomen, matrix: int, slices: int | None, z_range_mm: tuple[float, float] | None,
          scale: float = 1.0) -> _Grid:
    """The sampling grid over the scan's field of view and z extent (never the anatomy).

    ``ab.fov`` and ``ab.thickness`` are patient mm; ``ab.extent`` and ``ab.z_top`` anatomical mm, which
    ``scale`` turns into patient mm (a child is the seed's adult, scaled).
    """
    if matrix < 8:
        raise ValueError(f"matrix must be at least 8, got {matrix}")
    n = max(1, int(round(ab.extent * scale / ab.thickness))) if slices is None else int(slices)
    if n < 1:
        raise ValueError(f"slices must be positive, got {slices}")
    ox, oy, oz = ab.body_offset
    px = ab.fov / matrix
    centres = -ab.fov / 2 + (np.arange(matrix) + 0.5) * px  # patient x/y of pixel centres (FOV at 0,0)
    dz = ab.extent / n  # anatomical mm
    z_bottom = ab.z_top - ab.extent
    z = z_bottom + (np.arange(n) + 0.5) * dz
    if z_range_mm is not None:
        lo, hi = sorted(float(v) for v in z_range_mm)
        zp = z * scale + oz
        keep = (zp >= lo - 1e-6) & (zp <= hi + 1e-6)
        if not keep.any():
            raise ValueError(f"z_range_mm {z_range_mm} misses the scan ({zp[0]:.1f} to {zp[-1]:.1f} mm)")
        z = z[keep]
    origin = (float(centres[0]), float(centres[0]), float(z[0] * scale + oz))
    return _Grid(
        x=(centres - ox) / scale, y=(centres - oy) / scale, z=z, spacing=(float(dz * scale), float(px), float(px)),
        origin=origin, native_pixel_mm=ab.fov / 512, offset=(ox, oy, oz), scale=scale,
    )


def _noise_plan(ab: Abdomen, grid: _Grid) -> tuple[float, float]:
    """(blur sigma in pixels, white-noise scale) giving the scan's noise sigma after the blur.

    Coarser grids than the native 512 matrix mimic block-averaging: the noise shrinks with the pixel.
    """
    px = grid.spacing[1]
    sigma_hu = ab.noise_sigma * min(1.0, grid.native_pixel_mm / px)
    blur = ab.noise_corr_mm / px
    if blur < 0.35:
        return 0.0, sigma_hu
    delta = np.zeros((33, 33), dtype=np.float64)
    delta[16, 16] = 1.0
    kernel = ndimage.gaussian_filter(delta, blur, mode="constant", truncate=BLUR_TRUNCATE)
    return blur, sigma_hu / float(np.sqrt((kernel**2).sum()))


def _z_blur_sigma(thickness_mm: float, dz_mm: float) -> float:
    """Partial volume along z: a slice of ``thickness`` sampled every ``dz`` averages a box of that width.

    A box's standard deviation is width / sqrt(12); below 0.3 voxels it changes nothing worth a pass
    (the seed's own grid, where dz equals the thickness).
    """
    sigma = thickness_mm / np.sqrt(12.0) / dz_mm
    return float(sigma) if sigma >= 0.3 else 0.0


def _render_chunk(
    painters: list[Painter],
    grid: _Grid,
    zsl: slice,
    noise_seed: list[int],
    plan: tuple[float, float],
    shared: dict | None = None,
    acq: Acquisition | None = None,
    z_sigma: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint one z-chunk, apply the acquisition's effects, add correlated noise and the scanner blur.

    With partial volume along z (``z_sigma`` voxels) the chunk is painted with a margin of slices on
    both sides, blurred along z, and the margin dropped, so chunk seams never show.
    """
    dz = grid.z[1] - grid.z[0] if len(grid.z) > 1 else 1.0
    margin = int(np.ceil(3 * z_sigma)) if z_sigma else 0
    idx = np.arange(zsl.start - margin, zsl.stop + margin)
    cv = Canvas(grid.x, grid.y, grid.z[0] + idx * dz, shared)
    for paint in painters:
        paint(cv)
    acq = acq or Acquisition()
    post_process(cv, acq, grid.spacing[1], len(grid.x) * grid.spacing[1], grid.scale, grid.offset)
    hu, labels, lesion = cv.hu, cv.labels, cv.lesion
    if margin:
        hu = ndimage.gaussian_filter1d(hu, z_sigma, axis=0, mode="nearest", truncate=3.0)[margin:-margin]
        labels, lesion = labels[margin:-margin], lesion[margin:-margin]
    hu = np.ascontiguousarray(hu)
    blur, scale = plan
    rng = np.random.default_rng(noise_seed)
    if blur >= 1.0:
        # uniform noise: 4x cheaper to draw than normal, and a blur over >= 9x9 pixels makes it
        # Gaussian (central limit); the blur is also the scanner's resolution, applied to the image
        noise = rng.random(hu.shape, dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= np.float32(scale * np.sqrt(12.0))
    else:
        noise = rng.standard_normal(hu.shape, dtype=np.float32)
        noise *= np.float32(scale)
    hu += noise
    if blur:
        ndimage.gaussian_filter(hu, (0, blur, blur), output=noise, mode="nearest", truncate=BLUR_TRUNCATE)
        hu = noise
    np.rint(hu, out=hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu.astype(np.int16), np.ascontiguousarray(labels), np.ascontiguousarray(lesion)


_BLAS_LOCK = threading.Lock()
_BLAS_OWNER: list = []  # [limiter] while one render holds BLAS at one thread


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Keep BLAS single-threaded while we render: the chunks are already spread over the cores, and
    OpenBLAS threads spinning on the small texture matrix products cost ~20x their work on 2 cores.

    Only one render at a time owns the limit and restores it, from its own thread, when it ends
    (renders running alongside it merely lose the speed-up afterwards), so the process's BLAS
    setting always comes back. threadpoolctl is optional: without it renders are only slower.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - depends on the environment
        yield
        return
    with _BLAS_LOCK:
        owner = not _BLAS_OWNER
        if owner:
            _BLAS_OWNER.append(threadpool_limits(limits=1, user_api="blas"))
    try:
        yield
    finally:
        if owner:
            with _BLAS_LOCK:
                _BLAS_OWNER.pop().restore_original_limits()


def generate_ct_volume(
    seed: int,
    lesion: str | None = None,
    *,
    slices: int | None = None,
    matrix: int = 512,
    z_range_mm: tuple[float, float] | None = None,
    acquisition: Acquisition | None = None,
    **knobs: object,
) -> CtPhantom:
    """Render the seed's patient (optionally with one lesion of ``LESION_CLASSES``) on a grid.

    The seed fixes the patient in mm (body, organs, slice thickness, FOV, lesion size and place);
    ``matrix`` and ``slices`` only resample the same FOV and z extent (``slices=None``: the seed's own
    slice count), and ``z_range_mm`` (patient z, mm) keeps only the grid's slices inside it. The same
    seed with and without a lesion is the same patient, which makes paired training data.

    ``acquisition`` (or its fields as keywords: ``contrast_phase``, ``kernel``, ``slice_thickness_mm``,
    ``metal``, ``fov_mm``, ``body_scale``, ``scan_range``, ``noise_scale``, ``hu_offset``) says how the
    patient is scanned; the default is the validated domain (see ``_ct_acquisition.Acquisition``).
    """
    if lesion is not None and lesion not in LESION_CLASSES:
        raise ValueError(f"unknown lesion class {lesion!r}; use one of {LESION_CLASSES} or None")
    if acquisition is not None and knobs:
        raise ValueError("pass either acquisition or its fields as keywords, not both")
    acq = acquisition if acquisition is not None else Acquisition(**knobs)  # type: ignore[arg-type]
    ab = scanned(Abdomen.sample(seed), acq, seed)
    model: LesionModel | None = sample_lesion(seed, lesion, ab) if lesion else None
    scene = model.abdomen if model else ab
    extra = [metal_painter(scene, seed)] if acq.metal else []
    painters = scene.painters(model.painters if model else ()) + extra
    grid = _grid(ab, matrix, slices, z_range_mm, acq.body_scale)
    nz, ny, nx = len(grid.z), len(grid.y), len(grid.x)
    hu = np.empty((nz, ny, nx), dtype=np.int16)
    labels = np.empty((nz, ny, nx), dtype=np.uint8)
    les = np.empty((nz, ny, nx), dtype=np.uint8)
    step = max(1, CHUNK_VOXELS // (ny * nx))
    plan = _noise_plan(ab, grid)
    z_sigma = _z_blur_sigma(ab.thickness, grid.spacing[0])
    chunks = [slice(s, min(s + step, nz)) for s in range(0, nz, step)]
    shared: dict = {}  # in-plane terms (texture fields, body outline) reused by every chunk

    def work(zsl: slice) -> None:
        noise_seed = [int(seed) % 2**63, 0x4E01, nz, nx, zsl.start]
        hu[zsl], labels[zsl], les[zsl] = _render_chunk(painters, grid, zsl, noise_seed, plan, shared, acq, z_sigma)

    with _one_blas_thread():
        if len(chunks) > 1:
            with ThreadPoolExecutor(max_workers=2) as pool:
                list(pool.map(work, chunks))
        else:
            work(chunks[0])
    truth = _truth(seed, ab, scene, model, grid, labels, les, acq)
    return CtPhantom(hu, labels, les, grid.spacing, grid.origin, lesion, truth)


def scanned(ab: Abdomen, acq: Acquisition, seed: int) -> Abdomen:
    """The patient as this acquisition sees it: enhanced tissues, slice thickness, noise, FOV, z range."""
    if acq == Acquisition():
        return ab
    t, pancreas_hu = enhance(ab.t, ab.pancreas.hu, acq.contrast_phase, seed)
    thickness = float(acq.slice_thickness_mm) if acq.slice_thickness_mm is not None else ab.thickness
    corr_f, sigma_f, _ = KERNEL_NOISE[acq.kernel]
    sigma = ab.noise_sigma * (ab.thickness / thickness) ** 0.35 * sigma_f * acq.noise_scale * acq.body_scale ** 0.5
    z_top, extent = ab.z_top, ab.extent
    rng = np.random.default_rng([int(seed) % 2**63, 0x5CA])
    if acq.scan_range != "abdomen":
        bottom = ab.pelvis.z_floor - float(rng.uniform(0, 20))
        if acq.scan_range == "chest_abdomen_pelvis":
            z_top = ab.z_dome + float(rng.uniform(190, 250))
        extent = z_top - bottom
    fov = float(acq.fov_mm) if acq.fov_mm is not None else ab.fov * acq.body_scale
    return replace(
        ab, t=t, pancreas=replace(ab.pancreas, hu=pancreas_hu), thickness=thickness, noise_sigma=float(np.clip(sigma, 4, 60)),
        noise_corr_mm=ab.noise_corr_mm * corr_f, z_top=z_top, extent=extent, fov=fov,
    )


def _truth(
    seed: int, ab: Abdomen, scene: Abdomen, model: LesionModel | None, grid: _Grid, labels: np.ndarray, les: np.ndarray,
    acq: Acquisition,
) -> dict:
    """Ground truth: what a reader should find, in patient mm and in voxels of this grid."""
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    _, _, _, _, z0, z1 = scene.pancreas.bbox()
    truth: dict = {
        "seed": int(seed),
        "lesion_class": model.cls if model else None,
        "lesion_location": model.location if model else None,
        "lesion_diameter_mm": round(model.diameter, 2) if model else None,
        "lesion_centre_mm": [round(c, 2) for c in grid.patient_of(model.centre)] if model else None,
        "lesion_centre_voxel": [round(v, 2) for v in grid.voxel_of(model.centre)] if model else None,
        "lesion_volume_ml": round(np.count_nonzero(les) * voxel_ml, 3),
        "pancreas_volume_ml": round(np.count_nonzero(labels == ORGAN_LABELS["pancreas"]) * voxel_ml, 2),
        "pancreas_z_range_mm": [round(z0 * grid.scale + grid.offset[2], 1), round(z1 * grid.scale + grid.offset[2], 1)],
        "labels": {"0": "background", **{str(v): k for k, v in ORGAN_LABELS.items()}},
        "shape_zyx": [int(s) for s in labels.shape],
        "spacing_mm_zyx": [round(s, 6) for s in grid.spacing],
        "origin_mm_xyz": [round(o, 4) for o in grid.origin],
        "slice_thickness_mm": ab.thickness,
        "patient": {"age": ab.age if acq.body_scale >= 0.9 else child_age(acq.body_scale), "sex": ab.sex},
        "noise_sigma_hu": round(ab.noise_sigma, 2),
        "acquisition": acq.describe(),
        "notes": "labels: pancreas (1) includes the lesion; lesion marks lesion voxels. " + RESEARCH_USE_BANNER,
    }
    return truth


def child_age(body_scale: float) -> int:
    """A plausible age (years) for a child whose body is ``body_scale`` of the seed's adult."""
    return int(np.clip(round(2 + (body_scale - 0.3) * 25), 1, 17))


# --------------------------------------------------------------------------------------------- DICOM


def _series_identity(phantom: CtPhantom, seed: int) -> dict[str, str]:
    lesion = phantom.lesion_class or "none"
    grid_key: tuple = (phantom.hu.shape, phantom.spacing_mm, phantom.origin_mm)
    acq = _acquisition_of(phantom)
    if acq != Acquisition():  # another series of the same study: its own UIDs (the default keeps its old ones)
        grid_key = (*grid_key, tuple(sorted(acq.describe().items())))
    return {
        "study": _dicom.uid("ct", seed, lesion, "study"),
        "frame": _dicom.uid("ct", seed, lesion, "frame"),
        "series": _dicom.uid("ct", seed, lesion, "series", grid_key),
        "grid": repr(grid_key),
    }


def _slice_template(phantom: CtPhantom, seed: int, ids: dict[str, str]) -> Dataset:
    """Everything the slices share, built once (each slice copies these elements)."""
    template = Dataset()
    truth = phantom.truth
    date, _ = _dicom.study_datetime("CT", seed)
    _dicom.patient_module(template, "CT", seed, truth["patient"]["sex"], truth["patient"]["age"], date)
    contrast = _acquisition_of(phantom).contrast_phase != "non_contrast"
    _dicom.study_module(template, "CT", seed, ids["study"], "CT ABDOMEN W CONTRAST" if contrast else "CT ABDOMEN WO CONTRAST")
    _dicom.equipment_module(template, "PHANTOM-CT")
    for key, value in _shared_attributes(phantom, seed, ids).items():
        setattr(template, key, value)
    return template


def _acquisition_of(phantom: CtPhantom) -> Acquisition:
    return Acquisition(**phantom.truth.get("acquisition", {}))


BODY_PART = {"abdomen": "ABDOMEN", "abdomen_pelvis": "ABDOMENPELVIS", "chest_abdomen_pelvis": "CHESTABDPELVIS"}
PHASE_DESCRIPTION = {"non_contrast": "WO CONTRAST", "arterial": "W CONTRAST ARTERIAL", "portal_venous": "W CONTRAST PORTAL VENOUS",
                     "delayed": "W CONTRAST DELAYED"}


def _shared_attributes(phantom: CtPhantom, seed: int, ids: dict[str, str]) -> dict[str, object]:
    dz, dy, dx = phantom.spacing_mm
    acq = _acquisition_of(phantom)
    protocol = f"{BODY_PART[acq.scan_range]} {PHASE_DESCRIPTION[acq.contrast_phase]}"
    # the seed's reconstruction thickness; a coarser resampling reads as thicker slices
    thickness = max(float(phantom.truth.get("slice_thickness_mm", dz)), round(dz, 4))
    date, time = _dicom.study_datetime("CT", seed)
    kvp = (100, 120, 120, 140)[seed % 4]
    return {
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "Modality": "CT",
        "SeriesInstanceUID": ids["series"],
        "SeriesNumber": 2,
        "SeriesDate": date,
        "SeriesTime": time,
        "SeriesDescription": f"Axial {thickness:.1f}mm",
        "BodyPartExamined": BODY_PART[acq.scan_range],
        "PatientPosition": "FFS" if seed % 3 == 0 else "HFS",
        "ProtocolName": protocol,
        "FrameOfReferenceUID": ids["frame"],
        "PositionReferenceIndicator": "",
        "AcquisitionNumber": 1,
        "ContentDate": date,
        "ContentTime": time,
        "AcquisitionDate": date,
        "AcquisitionTime": time,
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        "PixelSpacing": [round(dy, 6), round(dx, 6)],
        "SliceThickness": round(thickness, 4),
        "SpacingBetweenSlices": round(dz, 6),
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": phantom.hu.shape[1],
        "Columns": phantom.hu.shape[2],
        "BitsAllocated": 16,
        "BitsStored": 12,
        "HighBit": 11,
        "PixelRepresentation": 0,
        "RescaleIntercept": HU_MIN,
        "RescaleSlope": 1,
        "RescaleType": "HU",
        "WindowCenter": [40, 50],
        "WindowWidth": [400, 350],
        "WindowCenterWidthExplanation": ["ABDOMEN", "PANCREAS"],
        "KVP": kvp,
        "XRayTubeCurrent": 150 + (seed % 7) * 25,
        "ExposureTime": 500,
        "ConvolutionKernel": acq.kernel.upper(),
        "ReconstructionDiameter": round(dx * phantom.hu.shape[2], 3),
        "GantryDetectorTilt": 0,
        "RotationDirection": "CW",
        "ScanOptions": "HELICAL",
        "ContrastBolusAgent": "" if acq.contrast_phase == "non_contrast" else "IODINATED CONTRAST",
        "LossyImageCompression": "00",
        "ImageComments": RESEARCH_USE_BANNER,
    }


def _slice_dataset(phantom: CtPhantom, seed: int, k: int, ids: dict[str, str], template: Dataset) -> Dataset:
    sop = _dicom.uid("ct", seed, phantom.lesion_class or "none", "sop", ids["grid"], k)
    ds = _dicom.new_file_dataset(CTImageStorage, sop)
    ds.update(template)  # shares the template's (never modified) elements
    dz = phantom.spacing_mm[0]
    x0, y0, z0 = phantom.origin_mm
    z = z0 + k * dz
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(z, 4)]
    ds.SliceLocation = round(z, 4)
    pixels = (phantom.hu[k].astype(np.int32) - HU_MIN).astype("<u2")
    ds.PixelData = pixels.tobytes()
    return ds


def write_ct_series(phantom: CtPhantom, out_dir: Path, seed: int) -> list[Path]:
    """Write one CT Image Storage file per slice (``CT0001.dcm`` ...) into ``out_dir``.

    ``seed`` must be the phantom's seed: it fixes the synthetic patient's identity and the UIDs.
    """
    if int(phantom.truth.get("seed", seed)) != int(seed):
        raise ValueError(f"seed {seed} does not match the phantom's seed {phantom.truth['seed']}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = _series_identity(phantom, seed)
    template = _slice_template(phantom, seed, ids)
    paths = [out_dir / f"CT{k + 1:04d}.dcm" for k in range(phantom.hu.shape[0])]

    def write(k: int) -> None:
        _dicom.save(_slice_dataset(phantom, seed, k, ids, template), paths[k])

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, range(len(paths))))
    return paths


def write_ct_study(out_dir: Path, seed: int, lesion: str | None = None, slices: int | None = None,
                   acquisition: Acquisition | None = None, **knobs: object) -> CtPhantom:
    """Render the seed's full 512x512 series, write it as DICOM, and put the truth beside it.

    ``acquisition`` / ``knobs`` as for ``generate_ct_volume`` (a shifted acquisition for the domain gate).

    ``out_dir`` gets ``CT0001.dcm`` ... plus ``truth.json`` and ``truth.npz`` (``labels``, ``lesion``,
    uint8 on the slices' grid); non-DICOM names, so DICOM readers that filter by content skip them.
    """
    out_dir = Path(out_dir)
    phantom = generate_ct_volume(seed, lesion, slices=slices, acquisition=acquisition, **knobs)
    write_ct_series(phantom, out_dir, seed)
    (out_dir / "truth.json").write_text(json.dumps(phantom.truth, indent=2) + "\n")
    np.savez_compressed(out_dir / "truth.npz", labels=phantom.labels, lesion=phantom.lesion)
    return phantom
