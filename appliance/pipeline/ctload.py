"""Load one stored CT series into a Hounsfield-unit volume, refusing what cannot be trusted.

Real scanners send series in any file order, with gaps, duplicates, localizers mixed in, per-slice
rescale values, padding pixels, gantry tilt, enhanced multi-frame objects and compressed transfer
syntaxes. Every one of those is handled here, once, so the models downstream always see a volume on a
uniform grid in HU; whatever cannot be handled raises `SeriesError` with a message that says what is
wrong and what is needed (it ends up on the clinic's screen and in the quarantine entry).

Speed: the header pass walks each file's elements with the DICOM service's element walker
(appliance.dicom.header: the tags the loader needs, the pixel data's offset, every other element
skipped by its length) instead of building a pydicom Dataset per file: pydicom spends ~1.5 ms of pure
Python (GIL-bound, so threads do not help) on each 512x512 CT header, the walk ~0.1 ms. Anything the walk does not handle (compressed,
big endian or deflated transfer syntaxes, enhanced multi-frame objects, a file without the preamble, a
value it cannot read) goes through pydicom as before, so the walk only ever makes a series faster. The
pixel pass reads uncompressed little endian pixels straight from their file offset into the output
volume in a thread pool (file I/O and numpy release the GIL); compressed pixels go through pydicom's
decoders (pylibjpeg, RLE). The full pydicom headers that the DICOM outputs need are parsed later, on
first use, and only for the slices used (`CtVolume.datasets` is lazy; `sop_instance_uids` come from
the walk).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from edgescreen.appliance.logs import get_logger

log = get_logger("edgescreen.appliance.pipeline.ctload")

AIR_HU = -1024
_RAW_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_PIXEL_DATA = 0x7FE00010
_DEFER = "64 KB"  # pixel data is deferred; even a 256x256 8-bit slice is larger
_SAME_POSITION_MM = 0.01
_SAME_DIRECTION_COS = 0.9999  # about 0.8 degrees
_UNIFORM_TOLERANCE = 0.10  # a spacing within 10 % of the typical one counts as uniform


class SeriesError(ValueError):
    """A series that cannot be made into a trustworthy volume; the message says what and what is needed."""


@dataclass(frozen=True)
class SliceRef:
    """One source image of the volume, in sorted order: which dataset, which frame, where along the normal."""

    dataset_index: int
    frame: int | None  # 0-based frame of a multi-frame object, None for a single-frame image
    position_mm: float  # projection of ImagePositionPatient on the slice normal


@dataclass
class CtVolume:
    """A CT series on a uniform grid, with what is needed to map results back onto the source images.

    Voxel (k, j, i) lies at ``origin + k*dz*direction[0] + j*dy*direction[1] + i*dx*direction[2]``
    (LPS patient coordinates, mm): direction rows are the unit vectors of the z, y, x index axes.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    datasets: Sequence[Dataset]  # full headers (no pixel data), parsed on first use: see LazyDatasets
    slices: list[SliceRef]
    study_uid: str
    series_uid: str
    modality: str
    sop_class_uid: str
    warnings: list[str] = field(default_factory=list)
    resampled: bool = False  # True when slices were interpolated onto a uniform z grid
    sop_instance_uids: list[str] = field(default_factory=list)  # per dataset, without parsing the full headers

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    def source_slice_indices(self) -> np.ndarray:
        """For each source slice (sorted order), the nearest volume slice: maps masks back for DICOM SEG."""
        if not self.resampled:
            return np.arange(len(self.slices))
        first = self.slices[0].position_mm
        z = np.array([(s.position_mm - first) / self.spacing_mm[0] for s in self.slices])
        return np.clip(np.rint(z).astype(int), 0, self.hu.shape[0] - 1)

    def to_source_grid(self, mask: np.ndarray) -> np.ndarray:
        """A (z, y, x) array on this volume's grid, resliced onto the source slices (nearest slice)."""
        return mask if not self.resampled else mask[self.source_slice_indices()]


@dataclass
class _Frame:
    """One 2D image before sorting: its file, frame, geometry and value transform."""

    dataset_index: int
    frame: int | None
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int
    slope: float
    intercept: float
    sop_uid: str


# ----------------------------------------------------------------------------------------------
# header pass

# The loader's tags: tag -> (keyword, VR to decode the value with; 'xs' is US or SS by PixelRepresentation).
_WALKED: dict[int, tuple[str, str]] = {
    0x00080016: ("SOPClassUID", "UI"), 0x00080018: ("SOPInstanceUID", "UI"), 0x00080060: ("Modality", "CS"),
    0x00181120: ("GantryDetectorTilt", "DS"), 0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"), 0x00200032: ("ImagePositionPatient", "DS"),
    0x00200037: ("ImageOrientationPatient", "DS"), 0x00280002: ("SamplesPerPixel", "US"),
    0x00280004: ("PhotometricInterpretation", "CS"), 0x00280008: ("NumberOfFrames", "IS"),
    0x00280010: ("Rows", "US"), 0x00280011: ("Columns", "US"), 0x00280030: ("PixelSpacing", "DS"),
    0x00280100: ("BitsAllocated", "US"), 0x00280101: ("BitsStored", "US"), 0x00280103: ("PixelRepresentation", "US"),
    0x00280120: ("PixelPaddingValue", "xs"), 0x00280121: ("PixelPaddingRangeLimit", "xs"),
    0x00281052: ("RescaleIntercept", "DS"), 0x00281053: ("RescaleSlope", "DS"),
}
_FUNCTIONAL_GROUPS = (0x52009229, 0x52009230)  # enhanced multi-frame: pydicom reads those
_WALKED_TAGS = frozenset({*_WALKED, *_FUNCTIONAL_GROUPS})
_FIRST_READ = 16384  # a CT header is 1-3 kB; a longer one is read whole


class _Walked:
    """A header read by `_walk`: the loader's tags only, valued as pydicom would value them, and where the
    pixel data starts. Quacks like the few Dataset methods the loader uses (`get`, `in`, attributes)."""

    def __init__(self, values: dict[str, Any], syntax: str, pixel_offset: int, pixel_length: int) -> None:
        self._values = values
        self.file_meta = {"TransferSyntaxUID": syntax}
        self.pixel_offset = pixel_offset
        self.pixel_length = pixel_length

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key == _PIXEL_DATA or key in self._values

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip("\x00 ")


def _number_strings(raw: bytes, kind: type) -> Any:
    """DS / IS values as pydicom gives them: one number, a list for several, '' when empty. A value that is
    not a number stays a string, so the loader's own conversion reports the file as malformed."""
    parts = [p.strip("\x00 ") for p in raw.decode("ascii", "replace").split("\\")]
    if parts == [""]:
        return ""
    values: list[Any] = []
    for part in parts:
        try:
            values.append(kind(float(part)) if kind is int else float(part))
        except ValueError:
            values.append(part)
    return values[0] if len(values) == 1 else values


def _decode(raw: bytes, vr: str, signed: bool) -> Any:
    if vr == "UI":
        return UID(_text(raw))
    if vr == "CS":
        return _text(raw)
    if vr == "DS":
        return _number_strings(raw, float)
    if vr == "IS":
        return _number_strings(raw, int)
    if len(raw) < 2:
        return None
    return struct.unpack_from("<h" if vr == "SS" or (vr == "xs" and signed) else "<H", raw)[0]


def _walk_bytes(buf: bytes, complete: bool) -> _Walked | None:
    """The loader's tags and the pixel data's place from a Part 10 file's first bytes (all of them when
    `complete`), with the DICOM service's element walker (appliance.dicom.header: one walker in the box).
    None: a file the walk leaves to pydicom. Raises dicom_header._Truncated when the bytes end first."""
    from edgescreen.appliance.dicom import header as dicom_header

    try:
        meta, data = dicom_header.split_file_meta(buf)
    except ValueError:
        if not complete:
            raise dicom_header._Truncated("file meta beyond the first read") from None
        return None
    if meta.transfer_syntax not in _RAW_SYNTAXES:
        return None
    implicit = meta.transfer_syntax == ImplicitVRLittleEndian
    found, pos = dicom_header._walk(data, implicit, _WALKED_TAGS)
    if pos >= len(data):  # the walk ran out of bytes before any pixel data
        if not complete:
            raise dicom_header._Truncated("pixel data beyond the first read")
        return None
    if any(tag in found for tag in _FUNCTIONAL_GROUPS):
        return None
    tag, _, length, start = dicom_header._element_header(data, pos, implicit)
    if length == 0xFFFFFFFF:  # encapsulated pixels are never a raw syntax's; be safe
        return None
    values: dict[str, Any] = {}
    for tag in sorted(found):  # PixelRepresentation (0028,0103) decodes before the padding values after it
        if tag in _WALKED:
            keyword, vr = _WALKED[tag]
            values[keyword] = _decode(found[tag], vr, values.get("PixelRepresentation") == 1)
    return _Walked(values, meta.transfer_syntax, len(buf) - len(data) + start, length)


def _walk(path: Path) -> _Walked | None:
    """`_walk_bytes` on the file's first bytes, then on all of it if the header is longer; None: use pydicom."""
    from edgescreen.appliance.dicom.header import _Truncated

    try:
        with open(path, "rb") as fh:
            buf = fh.read(_FIRST_READ)
            complete = len(buf) < _FIRST_READ
            try:
                return _walk_bytes(buf, complete)
            except _Truncated:
                if complete:
                    return None
            return _walk_bytes(buf + fh.read(), True)
    except (OSError, ValueError, struct.error, UnicodeError, _Truncated):
        return None  # pydicom reads it and reports what is wrong in its own words


def _read_header(path: Path) -> Dataset | _Walked:
    walked = _walk(path)
    if walked is not None:
        return walked
    try:
        return pydicom.dcmread(path, defer_size=_DEFER)
    except (InvalidDicomError, EOFError) as exc:
        raise SeriesError(f"{path}: not a DICOM file ({exc}); pass only the files of one CT series") from exc
    except OSError as exc:
        raise SeriesError(f"{path}: cannot be read ({exc})") from exc


def _fg_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The functional-group item for one frame: per-frame first, then shared (the enhanced IOD rule)."""
    for groups_kw, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_kw)
        if groups and len(groups) > index:
            seq = groups[index].get(sequence)
            if seq:
                return seq[0]
    return None


def _fg_value(ds: Dataset, frame: int, sequence: str, keyword: str, default: object = None) -> object:
    item = _fg_item(ds, frame, sequence)
    if item is not None and keyword in item:
        return item.get(keyword)
    return ds.get(keyword, default)


def _required(value: object, what: str, where: str) -> object:
    if value is None or (hasattr(value, "__len__") and len(value) == 0):  # type: ignore[arg-type]
        raise SeriesError(f"{where}: no {what}; a CT series needs patient geometry on every image")
    return value


def _frames_of(index: int, ds: Dataset, path: Path) -> list[_Frame]:
    """Every 2D image of one file with its geometry (single-frame tags or enhanced functional groups)."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    frames = []
    for f in range(n_frames):
        where = f"{path.name} frame {f + 1}" if enhanced else path.name
        if enhanced:
            ipp = _fg_value(ds, f, "PlanePositionSequence", "ImagePositionPatient")
            iop = _fg_value(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
            spacing = _fg_value(ds, f, "PixelMeasuresSequence", "PixelSpacing")
            slope = _fg_value(ds, f, "PixelValueTransformationSequence", "RescaleSlope", 1.0)
            intercept = _fg_value(ds, f, "PixelValueTransformationSequence", "RescaleIntercept", 0.0)
        else:
            ipp, iop, spacing = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing")
            slope, intercept = ds.get("RescaleSlope", 1.0), ds.get("RescaleIntercept", 0.0)
        ipp = _required(ipp, "ImagePositionPatient", where)
        iop = _required(iop, "ImageOrientationPatient", where)
        spacing = _required(spacing, "PixelSpacing", where)
        frames.append(_Frame(
            dataset_index=index,
            frame=f if n_frames > 1 or enhanced else None,
            position=np.asarray([float(v) for v in ipp], dtype=np.float64),  # type: ignore[union-attr]
            orientation=np.asarray([float(v) for v in iop], dtype=np.float64),  # type: ignore[union-attr]
            pixel_spacing=(float(spacing[0]), float(spacing[1])),  # type: ignore[index]
            rows=int(ds.Rows), cols=int(ds.Columns),
            slope=float(slope if slope not in (None, "") else 1.0),  # type: ignore[arg-type]
            intercept=float(intercept if intercept not in (None, "") else 0.0),  # type: ignore[arg-type]
            sop_uid=str(ds.get("SOPInstanceUID", "")),
        ))
    return frames


def _guarded_frames(index: int, ds: Dataset, path: Path) -> list[_Frame]:
    """`_frames_of`, with malformed values (a DS of 'abc', an IS of '1A') reported as the file's fault."""
    try:
        return _frames_of(index, ds, path)
    except SeriesError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise SeriesError(f"{path.name}: malformed image header ({type(exc).__name__}: {exc})") from exc


def _check_series(datasets: list[Dataset], paths: Sequence[Path], modalities: Sequence[str]) -> None:
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    if len(series) > 1:
        raise SeriesError(f"{len(paths)} files belong to {len(series)} different series ({', '.join(series[:3])}"
                          f"{', ...' if len(series) > 3 else ''}); load one series at a time")
    for ds, path in zip(datasets, paths, strict=True):
        modality = str(ds.get("Modality", "") or "")
        if modalities and modality not in modalities:
            sop = ds.get("SOPClassUID")
            name = getattr(sop, "name", str(sop))
            raise SeriesError(f"{path.name}: modality {modality or 'missing'} ({name}); this pipeline needs "
                              f"{' or '.join(modalities)} images")
        if _PIXEL_DATA not in ds:
            raise SeriesError(f"{path.name}: no pixel data (not an image); a CT series holds image slices")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise SeriesError(f"{path.name}: colour image ({ds.get('PhotometricInterpretation')}); CT slices are greyscale")


# ----------------------------------------------------------------------------------------------
# geometry: orientation, sorting, duplicates, spacing


def _normal(orientation: np.ndarray) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise SeriesError(f"ImageOrientationPatient {list(orientation)} has parallel row and column directions")
    return n / norm


def _orientation_groups(frames: list[_Frame]) -> list[list[_Frame]]:
    groups: list[list[_Frame]] = []
    for fr in frames:
        for group in groups:
            ref = group[0].orientation
            if (np.dot(ref[:3], fr.orientation[:3]) > _SAME_DIRECTION_COS
                    and np.dot(ref[3:], fr.orientation[3:]) > _SAME_DIRECTION_COS):
                group.append(fr)
                break
        else:
            groups.append([fr])
    return sorted(groups, key=len, reverse=True)


def _one_orientation(frames: list[_Frame], min_slices: int, warnings: list[str]) -> list[_Frame]:
    """The slices of the one orientation; a few stray localizers are dropped, anything else refused."""
    groups = _orientation_groups(frames)
    if len(groups) == 1:
        return groups[0]
    main, rest = groups[0], [f for g in groups[1:] for f in g]
    if len(main) >= min_slices and len(rest) < len(main) // 2:
        warnings.append(f"dropped {len(rest)} image(s) with another orientation than the {len(main)} main slices "
                        "(localizers?)")
        return main
    raise SeriesError(f"{len(frames)} slices with {len(groups)} different orientations (largest group {len(main)}); "
                      f"need at least {min_slices} parallel slices of one orientation, e.g. one axial series")


def _check_matrix(frames: list[_Frame]) -> None:
    sizes = sorted({(f.rows, f.cols) for f in frames})
    if len(sizes) > 1:
        raise SeriesError(f"slices have {len(sizes)} different sizes {sizes}; one series must have one matrix size")
    spacings = sorted({f.pixel_spacing for f in frames})
    lo, hi = np.min(spacings, axis=0), np.max(spacings, axis=0)
    if np.any(hi - lo > 1e-3 * hi):
        raise SeriesError(f"slices have different pixel spacings {spacings[:4]}; one series must have one pixel spacing")


def _dedupe(frames: list[_Frame], positions: np.ndarray, warnings: list[str]) -> tuple[list[_Frame], np.ndarray]:
    """Drop repeats of the same image (same SOP and frame) at one position; refuse different images there."""
    keep_frames, keep_pos, dropped = [frames[0]], [positions[0]], 0
    for fr, pos in zip(frames[1:], positions[1:], strict=True):
        if abs(pos - keep_pos[-1]) > _SAME_POSITION_MM:
            keep_frames.append(fr)
            keep_pos.append(pos)
            continue
        prev = keep_frames[-1]
        if (fr.sop_uid, fr.frame) == (prev.sop_uid, prev.frame):
            dropped += 1
            continue
        raise SeriesError(
            f"two different images at the same position {pos:.2f} mm along the slice normal "
            f"(SOP {prev.sop_uid} and {fr.sop_uid}); the series holds overlapping stacks or acquisitions: "
            "send a single stack (one acquisition) per series")
    if dropped:
        warnings.append(f"ignored {dropped} duplicate copies of the same image")
    return keep_frames, np.asarray(keep_pos)


@dataclass(frozen=True)
class _ZPlan:
    """How source slices become the volume's uniform z grid."""

    spacing: float
    resample: bool
    n_out: int


def _plan_z(positions: np.ndarray, max_gap_factor: float, max_gap_mm: float, warnings: list[str]) -> _ZPlan:
    n = len(positions)
    if n == 1:
        return _ZPlan(spacing=1.0, resample=False, n_out=1)
    steps = np.diff(positions)
    extent = float(positions[-1] - positions[0])
    if np.all(np.abs(steps - extent / (n - 1)) <= _UNIFORM_TOLERANCE * extent / (n - 1)):
        return _ZPlan(spacing=extent / (n - 1), resample=False, n_out=n)
    typical = float(np.median(steps))  # robust to a gap, which would inflate the mean
    worst = int(np.argmax(steps))
    if steps[worst] > max_gap_factor * typical or steps[worst] > max_gap_mm:
        missing = max(int(round(steps[worst] / typical)) - 1, 1)
        raise SeriesError(
            f"slices are missing: a {steps[worst]:.1f} mm gap between slices {worst + 1} and {worst + 2} "
            f"(at {positions[worst]:.1f} and {positions[worst + 1]:.1f} mm along the normal, sorted by position) "
            f"where the series spacing is {typical:.2f} mm; about {missing} slice(s) missing; "
            f"resend the complete series (at most a {min(max_gap_factor * typical, max_gap_mm):.1f} mm gap is interpolated)")
    n_out = int(round(extent / typical)) + 1
    gaps = [i for i in range(n - 1) if steps[i] > (1 + _UNIFORM_TOLERANCE) * typical]
    if gaps and all(abs(steps[i] / typical - round(steps[i] / typical)) < _UNIFORM_TOLERANCE for i in gaps):
        where = ", ".join(f"{positions[i]:.1f}-{positions[i + 1]:.1f} mm" for i in gaps[:5])
        warnings.append(f"{len(gaps)} gap(s) in the slice positions ({where}); missing slices were interpolated "
                        f"linearly onto a uniform {extent / (n_out - 1):.3f} mm grid")
    else:
        warnings.append(f"slice spacing varies from {steps.min():.2f} to {steps.max():.2f} mm; resampled linearly onto "
                        f"a uniform {extent / (n_out - 1):.3f} mm grid")
    return _ZPlan(spacing=extent / (n_out - 1), resample=True, n_out=n_out)


def _check_tilt(datasets: list[Dataset], frames: list[_Frame], normal: np.ndarray, warnings: list[str]) -> None:
    tilts = {float(ds.get("GantryDetectorTilt", 0) or 0) for ds in datasets}
    nonzero = sorted(t for t in tilts if abs(t) > 1e-3)
    shear = 0.0
    if len(frames) > 1:
        step = frames[-1].position - frames[0].position
        cosang = abs(float(np.dot(step, normal))) / max(float(np.linalg.norm(step)), 1e-9)
        shear = float(np.degrees(np.arccos(min(cosang, 1.0))))
    if nonzero or shear > 1.0:
        what = f"gantry tilt {nonzero[0]:g} degrees" if nonzero else "slice positions sheared"
        warnings.append(f"{what}: slice positions are offset {shear:.1f} degrees from the slice normal; the volume "
                        "is built along the normal without de-shearing, so anatomy is slightly skewed")


# ----------------------------------------------------------------------------------------------
# pixel pass


def _out_dtype(datasets: list[Dataset], frames: list[_Frame], resample: bool) -> np.dtype:
    """int16 when the HU values are exactly integers that fit; float32 otherwise (halves memory for most CT)."""
    if resample or any(f.slope != 1.0 or f.intercept != int(f.intercept) for f in frames):
        return np.dtype(np.float32)
    intercepts: dict[int, list[float]] = {}
    for f in frames:
        intercepts.setdefault(f.dataset_index, []).append(f.intercept)
    for index, values in intercepts.items():
        ds = datasets[index]
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if lo + min(values) < -32768 or hi + max(values) > 32767:
            return np.dtype(np.float32)
    return np.dtype(np.int16)


def _raw_dtype(ds: Dataset) -> np.dtype | None:
    bits = int(ds.get("BitsAllocated", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    kinds = {8: ("i1", "u1"), 16: ("<i2", "<u2"), 32: ("<i4", "<u4")}
    if bits not in kinds:
        return None
    return np.dtype(kinds[bits][0 if signed else 1])


@dataclass(frozen=True)
class _PixelInfo:
    """What the pixel pass needs from one file, read once in the main thread (workers never touch pydicom)."""

    path: Path
    shape: tuple[int, int]
    offset: int | None  # file offset of uncompressed little-endian pixels; None: decode through pydicom
    dtype: np.dtype | None
    bits_stored: int
    padding: tuple[int, int] | None  # stored-value range that means "no patient here"
    clamp_air: bool  # CT: nothing is below air (outside-FOV values such as -2000 or -3024 become -1024)


def _pixel_info(path: Path, ds: Dataset | _Walked) -> _PixelInfo:
    dtype = _raw_dtype(ds)
    shape = (int(ds.Rows), int(ds.Columns))
    offset = None
    if ds.file_meta.get("TransferSyntaxUID") in _RAW_SYNTAXES and dtype is not None:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = shape[0] * shape[1] * dtype.itemsize * n_frames
        if isinstance(ds, _Walked):
            offset = ds.pixel_offset if ds.pixel_length == expected else None
        else:
            elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
            tell = getattr(elem, "value_tell", None)
            if tell is not None and getattr(elem, "value", None) is None and elem.length == expected:
                offset = int(tell)
    allocated = int(ds.get("BitsAllocated", 16) or 16)
    padding = None
    if ds.get("PixelPaddingValue") is not None:
        value = int(ds.PixelPaddingValue)
        limit = int(ds.get("PixelPaddingRangeLimit", value))
        padding = (min(value, limit), max(value, limit))
    return _PixelInfo(path, shape, offset, dtype, int(ds.get("BitsStored", allocated) or allocated), padding,
                      str(ds.get("Modality", "")) == "CT")


def _fix_bits(raw: np.ndarray, info: _PixelInfo) -> np.ndarray:
    """Mask unused high bits (overlays, garbage) and sign-extend BitsStored < BitsAllocated."""
    allocated = raw.dtype.itemsize * 8
    if info.bits_stored >= allocated:
        return raw
    if raw.dtype.kind == "u":
        return raw & np.array((1 << info.bits_stored) - 1, dtype=raw.dtype)
    shift = allocated - info.bits_stored
    return (raw << shift) >> shift


def _as_int16(raw: np.ndarray, info: _PixelInfo) -> np.ndarray | None:
    """The stored values as int16 without a copy where that is exact (the common 12-bit CT case)."""
    if raw.dtype.itemsize == 1:
        return raw.astype(np.int16)
    if raw.dtype.itemsize != 2:
        return None
    if raw.dtype.kind == "i" or info.bits_stored <= 15 or int(raw.max(initial=0)) <= 32767:
        return raw.view(np.int16)
    return None


def _store(out: np.ndarray, raw: np.ndarray, frame: _Frame, info: _PixelInfo) -> None:
    """Rescale stored values to HU into one output slice; padding and anything below air becomes air."""
    raw = _fix_bits(raw, info)
    small = _as_int16(raw, info) if out.dtype == np.int16 else None
    if small is not None:
        np.add(small, np.int16(frame.intercept), out=out)
    elif out.dtype == np.int16:
        out[...] = raw.astype(np.int32) + int(frame.intercept)
    else:
        np.multiply(raw, np.float32(frame.slope), out=out, casting="unsafe")
        out += np.float32(frame.intercept)
    if info.padding is not None:
        pad = (raw >= info.padding[0]) & (raw <= info.padding[1])
        out[pad] = AIR_HU
    if info.clamp_air:
        np.maximum(out, AIR_HU, out=out)


def _read_raw(info: _PixelInfo, frame: int | None) -> np.ndarray:
    raw = np.empty(info.shape, dtype=info.dtype)
    try:
        with open(info.path, "rb", buffering=0) as fh:
            fh.seek(int(info.offset or 0) + (frame or 0) * raw.nbytes)
            got = fh.readinto(memoryview(raw).cast("B"))
    except OSError as exc:  # removed or unreadable since the header pass
        raise SeriesError(f"{info.path.name}: cannot be read ({exc})") from exc
    if got != raw.nbytes:
        raise SeriesError(f"{info.path.name}: pixel data is truncated ({got} of {raw.nbytes} bytes)")
    return raw


def _decode_all(path: Path) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        arr = pixel_array(path)
    except OSError as exc:
        raise SeriesError(f"{path.name}: cannot be read ({exc})") from exc
    except Exception as exc:  # decoders raise many types for unsupported or damaged pixel data
        raise SeriesError(f"{path.name}: pixel data cannot be decoded ({type(exc).__name__}: {exc}); "
                          "re-send it uncompressed or in a standard transfer syntax") from exc
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)  # big endian files decode to '>i2'


def _raw_task(info: _PixelInfo, jobs: list[tuple[int, _Frame]], stack: np.ndarray) -> None:
    for slot, fr in jobs:
        _store(stack[slot], _read_raw(info, fr.frame), fr, info)


def _decode_task(info: _PixelInfo, jobs: list[tuple[int, _Frame]], stack: np.ndarray) -> None:
    arr = _decode_all(info.path)
    if arr.ndim == 2:
        arr = arr[None]
    for slot, fr in jobs:
        _store(stack[slot], arr[fr.frame or 0], fr, info)


def _read_pixels(paths: Sequence[Path], datasets: list[Dataset | _Walked], frames: list[_Frame], dtype: np.dtype,
                 pool: ThreadPoolExecutor) -> np.ndarray:
    """Decode every kept frame into a (n, rows, cols) stack in sorted order."""
    stack = np.empty((len(frames), frames[0].rows, frames[0].cols), dtype=dtype)
    by_file: dict[int, list[tuple[int, _Frame]]] = {}
    for slot, fr in enumerate(frames):
        by_file.setdefault(fr.dataset_index, []).append((slot, fr))
    futures = []
    for index, jobs in by_file.items():
        try:
            info = _pixel_info(paths[index], datasets[index])
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise SeriesError(f"{paths[index].name}: malformed pixel description ({exc})") from exc
        if info.offset is None:
            futures.append(pool.submit(_decode_task, info, jobs, stack))
            continue
        chunk = max(1, len(jobs) // 8)  # an uncompressed multi-frame object is read in parallel chunks
        futures += [pool.submit(_raw_task, info, jobs[i:i + chunk], stack) for i in range(0, len(jobs), chunk)]
    for fut in futures:
        fut.result()
    return stack


def _interpolate_z(stack: np.ndarray, positions: np.ndarray, plan: _ZPlan) -> np.ndarray:
    """Linear interpolation of the sorted source slices onto the uniform z grid."""
    targets = positions[0] + np.arange(plan.n_out) * plan.spacing
    out = np.empty((plan.n_out, *stack.shape[1:]), dtype=np.float32)
    upper = np.clip(np.searchsorted(positions, targets, side="left"), 1, len(positions) - 1)
    for k, (t, j) in enumerate(zip(targets, upper, strict=True)):
        z0, z1 = positions[j - 1], positions[j]
        w = float(np.clip((t - z0) / (z1 - z0), 0.0, 1.0))
        out[k] = stack[j - 1] * np.float32(1 - w) + stack[j] * np.float32(w)
    return out


# ----------------------------------------------------------------------------------------------
# entry


def _strip_pixels(ds: Dataset) -> Dataset:
    if _PIXEL_DATA in ds:
        del ds[_PIXEL_DATA]
    return ds


class LazyDatasets(Sequence[Dataset]):
    """The kept files' full headers (pixel data stripped), parsed by pydicom on first use of each.

    The DICOM outputs need complete headers, but only of the first image and of the slices a segment
    touches: parsing all 300 up front would cost the whole fast walk's gain. Thread-safe; a header read
    once is kept.
    """

    def __init__(self, paths: Sequence[Path], parsed: Sequence[Dataset | None]) -> None:
        self._paths = list(paths)
        self._items: list[Dataset | None] = list(parsed)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._paths)

    def _get(self, index: int) -> Dataset:
        item = self._items[index]
        if item is None:
            with self._lock:
                item = self._items[index]
                if item is None:
                    try:
                        item = pydicom.dcmread(self._paths[index], stop_before_pixels=True)
                    except (InvalidDicomError, EOFError, OSError) as exc:
                        raise SeriesError(f"{self._paths[index].name}: header cannot be read again ({exc}); the "
                                          "file changed after loading") from exc
                    self._items[index] = item
        return item

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._get(i) for i in range(*index.indices(len(self)))]
        return self._get(range(len(self))[index])

    def __iter__(self) -> Iterator[Dataset]:
        return (self._get(i) for i in range(len(self)))


def default_workers() -> int:
    return min(8, 2 * (os.cpu_count() or 1))


def load_ct_series(
    paths: Sequence[Path | str],
    *,
    min_slices: int = 20,
    max_gap_factor: float = 3.0,
    max_gap_mm: float = 15.0,
    modalities: Sequence[str] = ("CT",),
    workers: int | None = None,
    progress: Callable[[float], None] | None = None,
) -> CtVolume:
    """Read the files of one series into a `CtVolume`; raise `SeriesError` with the reason when unusable.

    ``max_gap_factor``/``max_gap_mm``: a gap up to this many typical spacings (and mm) is interpolated,
    a larger one means lost slices and is refused. ``modalities`` empty accepts any modality (tests).
    """
    files = [Path(p) for p in paths]
    if not files:
        raise SeriesError("no files given; need the DICOM files of one CT series")
    warnings: list[str] = []
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        datasets = list(pool.map(_read_header, files))
        if progress:
            progress(0.3)
        _check_series(datasets, files, modalities)
        frames = [fr for i, (ds, p) in enumerate(zip(datasets, files, strict=True)) for fr in _guarded_frames(i, ds, p)]
        frames = _one_orientation(frames, min_slices, warnings)
        _check_matrix(frames)
        normal = _normal(frames[0].orientation)
        order = np.argsort([float(np.dot(f.position, normal)) for f in frames], kind="stable")
        frames = [frames[i] for i in order]
        positions = np.array([float(np.dot(f.position, normal)) for f in frames])
        frames, positions = _dedupe(frames, positions, warnings)
        if len(frames) < min_slices:
            raise SeriesError(f"only {len(frames)} distinct slice position(s); need at least {min_slices} parallel "
                              "slices of one orientation to analyse a CT volume")
        plan = _plan_z(positions, max_gap_factor, max_gap_mm, warnings)
        _check_tilt(datasets, frames, normal, warnings)
        stack = _read_pixels(files, datasets, frames, _out_dtype(datasets, frames, plan.resample), pool)
    if progress:
        progress(0.9)
    hu = _interpolate_z(stack, positions, plan) if plan.resample else stack
    return _assemble(hu, frames, positions, plan, normal, datasets, files, warnings)


def _assemble(hu: np.ndarray, frames: list[_Frame], positions: np.ndarray, plan: _ZPlan, normal: np.ndarray,
              datasets: list[Dataset | _Walked], files: Sequence[Path], warnings: list[str]) -> CtVolume:
    first = frames[0]
    used = list(dict.fromkeys(f.dataset_index for f in frames))  # in sorted slice order
    remap = {old: new for new, old in enumerate(used)}
    kept = LazyDatasets([files[i] for i in used],
                        [None if isinstance(datasets[i], _Walked) else _strip_pixels(datasets[i]) for i in used])
    slices = [SliceRef(remap[f.dataset_index], f.frame, float(p)) for f, p in zip(frames, positions, strict=True)]
    direction = np.stack([normal, first.orientation[3:], first.orientation[:3]])
    head = datasets[used[0]]
    volume = CtVolume(
        hu=hu,
        spacing_mm=(float(plan.spacing), first.pixel_spacing[0], first.pixel_spacing[1]),
        origin=tuple(float(v) for v in first.position),  # type: ignore[arg-type]
        direction=direction,
        datasets=kept,
        slices=slices,
        study_uid=str(head.get("StudyInstanceUID", "")),
        series_uid=str(head.get("SeriesInstanceUID", "")),
        modality=str(head.get("Modality", "")),
        sop_class_uid=str(head.get("SOPClassUID", "")),
        warnings=warnings,
        resampled=plan.resample,
        sop_instance_uids=[str(datasets[i].get("SOPInstanceUID", "") or "") for i in used],
    )
    log.info("ct series loaded", study=volume.study_uid, series=volume.series_uid, shape="x".join(map(str, hu.shape)),
             spacing="x".join(f"{s:.3g}" for s in volume.spacing_mm), warnings=len(warnings))
    return volume
