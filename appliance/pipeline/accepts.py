"""Which series each pipeline accepts, stated once: used by `analyze` (appliance/pipeline/analyze.py) and
by series assembly (appliance/dicom/assembly.py), whose reason is what the UI shows for a series that was
not analysed (series.reason). tests/test_series_acceptance.py fails if the two ever decide differently.

A series is described by `SeriesFacts` (modality, SOP classes, body part, per-image `SliceFacts` read
from headers only); `decide(facts)` returns the pipeline that reads it ("pancreas" | "mammo") or None
with the reason in words a technician can act on. Pipeline names live here, not in a schema CHECK.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID, SecondaryCaptureImageStorage

# The SOP class lists are the DICOM service's (appliance.dicom.sop: what it accepts); named here too for
# the callers of this module. One list, two names.
from edgescreen.appliance.dicom.sop import (
    CT_SOP_CLASSES,
    MG_FOR_PRESENTATION,
    MG_FOR_PROCESSING,
    MG_SOP_CLASSES,
)

PIPELINES = ("pancreas", "mammo")
# The header elements the rules read (slice_facts, series_facts): a reader that loads only some tags
# (analyze's quick pass) must load these, or it decides on less than series assembly sees.
HEADER_TAGS = ("SOPClassUID", "Modality", "BodyPartExamined", "ImageType", "NumberOfFrames", "ImageOrientationPatient",
               "ImagePositionPatient", "SliceThickness", "SharedFunctionalGroupsSequence",
               "PerFrameFunctionalGroupsSequence")
MIN_SLICES = 20
MAX_THICKNESS_MM = 5.0
MAX_TILT_DEG = 30.0
PANCREAS_NEEDS = f"the pancreas pipeline needs at least {MIN_SLICES} axial slices of {MAX_THICKNESS_MM:g} mm or less"
# BodyPartExamined values (PS3.16 CID 4031 and what scanners really write) that cannot hold a pancreas
NON_ABDOMINAL = frozenset({
    "HEAD", "BRAIN", "SKULL", "NECK", "CSPINE", "HEADNECK", "EXTREMITY", "ARM", "LEG", "HAND", "FOOT", "KNEE",
    "ANKLE", "ELBOW", "WRIST", "SHOULDER", "FINGER", "TOE", "FEMUR", "TIBIA", "HUMERUS", "FOREARM", "LOWER LEG",
    "BREAST", "ORBIT", "SINUS", "IAC", "EAR", "JAW", "TMJ", "PELVIS",
})


@dataclass(frozen=True)
class Decision:
    pipeline: str | None  # "pancreas" | "mammo" | None (not analysed)
    reason: str | None


@dataclass(frozen=True)
class SliceFacts:
    localizer: bool
    axial: bool | None  # None: orientation unknown
    plane: str
    thickness: float | None
    position: float | None  # along the slice normal, for spacing when thickness is missing
    frames: int


@dataclass(frozen=True)
class SeriesFacts:
    modality: str
    sop_classes: frozenset[str]
    body_part: str | None
    slices: tuple[SliceFacts, ...]


def _plane(iop: list[float] | None) -> tuple[bool | None, str, list[float] | None]:
    if not iop or len(iop) != 6:
        return None, "unknown", None
    r, c = iop[:3], iop[3:]
    n = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]]
    norm = math.sqrt(sum(v * v for v in n)) or 1.0
    n = [v / norm for v in n]
    axis = max(range(3), key=lambda i: abs(n[i]))
    axial = abs(n[2]) >= math.cos(math.radians(MAX_TILT_DEG))
    return axial, "axial" if axial else ("sagittal", "coronal", "axial")[axis], n


def _floats(value: object) -> list[float] | None:
    try:
        return [float(v) for v in value] if value is not None else None  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None


def _first(seq: object, keyword: str) -> object | None:
    try:
        return getattr(seq[0], keyword, None)  # type: ignore[index]
    except (IndexError, TypeError):
        return None


def slice_facts(ds: Any) -> SliceFacts:
    """What the rules need from one image header (classic or Enhanced CT functional groups)."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    localizer = "LOCALIZER" in image_type
    frames = int(ds.get("NumberOfFrames") or 1)
    iop, thickness, position = ds.get("ImageOrientationPatient"), ds.get("SliceThickness"), ds.get("ImagePositionPatient")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        group = shared[0]
        iop = iop or _first(group.get("PlaneOrientationSequence"), "ImageOrientationPatient")
        thickness = thickness or _first(group.get("PixelMeasuresSequence"), "SliceThickness")
        frame_type = _first(group.get("CTImageFrameTypeSequence"), "FrameType")
        localizer = localizer or "LOCALIZER" in [str(v).upper() for v in (frame_type or [])]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and not iop:
        iop = _first(per_frame[0].get("PlaneOrientationSequence"), "ImageOrientationPatient")
    if per_frame and thickness is None:
        thickness = _first(per_frame[0].get("PixelMeasuresSequence"), "SliceThickness")
    axial, plane, normal = _plane(_floats(iop))
    pos = _floats(position)
    along = sum(p * n for p, n in zip(pos, normal, strict=True)) if pos and normal and len(pos) == 3 else None
    try:
        thick = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thick = None
    return SliceFacts(localizer, axial, plane, thick, along, frames)


def series_facts(headers: Iterable[Any]) -> SeriesFacts:
    headers = list(headers)
    first = headers[0] if headers else {}
    slices = []
    for ds in headers:
        try:
            slices.append(slice_facts(ds))
        except (TypeError, ValueError, AttributeError, KeyError):  # one odd header must not hide the others
            continue
    return SeriesFacts(str(first.get("Modality", "") or "").upper(),
                       frozenset(str(ds.get("SOPClassUID", "")) for ds in headers),
                       str(first.get("BodyPartExamined", "") or "") or None, tuple(slices))


def _spacing(positions: list[float]) -> float | None:
    if len(positions) < 2:
        return None
    ordered = sorted(positions)
    gaps = sorted(b - a for a, b in zip(ordered, ordered[1:], strict=False) if b - a > 1e-3)
    return gaps[len(gaps) // 2] if gaps else None


def decide_ct(slices: Iterable[SliceFacts], body_part: str | None) -> Decision:
    slices = list(slices)
    if not slices:
        return Decision(None, f"CT series with no readable images; {PANCREAS_NEEDS}")
    part = (body_part or "").upper().replace("_", " ").strip()
    if part in NON_ABDOMINAL:
        return Decision(None, f"CT series of body part {body_part}; the pancreas pipeline reads abdominal CT")
    images = [s for s in slices if not s.localizer]
    if not images:
        return Decision(None, f"CT localizer (scout) images only; {PANCREAS_NEEDS}")
    axial = [s for s in images if s.axial]
    total = sum(s.frames for s in images)
    if not axial:
        planes = sorted({s.plane for s in images})
        return Decision(None, f"CT series of {total} {'/'.join(planes)} slices; {PANCREAS_NEEDS}")
    spacing = _spacing([s.position for s in axial if s.position is not None])
    thin = [s for s in axial if (s.thickness if s.thickness is not None else spacing or math.inf)
            <= MAX_THICKNESS_MM + 0.01]
    count = sum(s.frames for s in thin)
    if count >= MIN_SLICES:
        return Decision("pancreas", None)
    n_axial = sum(s.frames for s in axial)
    if not thin:
        thick = sorted({s.thickness for s in axial if s.thickness is not None})
        what = f"{thick[0]:g} mm thick" if len(thick) == 1 else "of unknown thickness" if not thick else \
            f"{thick[0]:g}-{thick[-1]:g} mm thick"
        return Decision(None, f"CT series of {n_axial} axial slices {what}; {PANCREAS_NEEDS}")
    return Decision(None, f"CT series of {count} slices; {PANCREAS_NEEDS}")


def _sop_name(uid: str) -> str:
    return UID(uid).name if uid else "unknown SOP class"


def reads_slices(modality: str, sop_classes: Iterable[str]) -> bool:
    """Whether `decide` looks at the images' geometry (`SeriesFacts.slices`): only for CT images of modality
    CT. Series assembly knows the modality and SOP classes from its index and reads headers only then."""
    classes = frozenset(sop_classes)
    return bool(classes) and classes <= CT_SOP_CLASSES and modality.upper() == "CT"


def decide(facts: SeriesFacts) -> Decision:
    """The pipeline that reads this series, or None and why."""
    classes, modality = facts.sop_classes, facts.modality
    if not classes:
        return Decision(None, "series has no stored instances")
    if classes <= {MG_FOR_PRESENTATION} and modality == "MG":
        return Decision("mammo", None)
    if classes & MG_SOP_CLASSES:
        if MG_FOR_PROCESSING in classes:
            return Decision(None, "MG For Processing (raw detector) images are stored but not analysed; the "
                            "mammography pipeline reads For Presentation images")
        return Decision(None, f"mammography images with modality {modality or 'missing'}; the mammography "
                        "pipeline needs modality MG")
    if classes == {str(SecondaryCaptureImageStorage)}:
        return Decision(None, "Secondary Capture images (screenshots, dose pages) are stored but not analysed")
    if reads_slices(modality, classes):
        return decide_ct(facts.slices, facts.body_part)
    if classes <= CT_SOP_CLASSES:
        return Decision(None, f"CT image storage with modality {modality or 'missing'}; the pancreas "
                        "pipeline reads CT")
    names = ", ".join(sorted(_sop_name(c) for c in classes))
    return Decision(None, f"series mixes SOP classes ({names}); each pipeline reads one kind of image")
