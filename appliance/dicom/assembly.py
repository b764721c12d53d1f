"""Series assembly: when a series is complete, which pipeline reads it, and series consistency on receipt.

A series is complete when no instance has arrived for `stable_after_s` (Orthanc's StableAge idea:
DICOM has no "end of series" message). Then the selection rules below decide:

* CT: at least 20 axial (within 30 degrees: gantry tilt) non-localizer slices of 5 mm or less, from a
  body part that is not clearly outside the abdomen -> "pancreas". Otherwise "not_analysed" with the
  reason in words ("CT series of 12 slices; the pancreas pipeline needs ...").
* MG For Presentation -> "mammo", ONE job per study: a 4-view exam may arrive as one series or as
  four, and the model reads an exam. The job waits until every MG series of the study is stable, is
  anchored on the study's first MG series, and the other MG series are marked queued with it
  (`store.instances.job_files` gives the worker all of the exam's files).
* MG For Processing, Secondary Capture, other modalities: stored, "not_analysed", with the reason.

The header pass reads files with pixels deferred; it runs in the service's background thread, never
on the receive path.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import SecondaryCaptureImageStorage

from appliance.dicom import sop
from appliance.dicom.header import Header, Refusal, parse_file
from appliance.logs import get_logger
from appliance.store import Store, jobs
from appliance.store.instances import set_series_state

log = get_logger(__name__)

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


# -- receive-time consistency -----------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesKey:
    study_uid: str
    modality: str | None
    sop_class_uid: str | None
    rows: int | None
    columns: int | None


class SeriesGuard:
    """Refuses an instance that contradicts the series it claims to join (0xC001, quarantined).

    The first instance of a series defines it: its study, modality and SOP class; for CT also the
    image size (a volume needs one grid; mammography views may legitimately differ in size). Kept in
    memory; after a restart a series' key is read back from one of its stored files.
    """

    def __init__(self, store: Store, capacity: int = 4096) -> None:
        self.store = store
        self.capacity = capacity
        self._keys: dict[str, SeriesKey] = {}
        self._lock = threading.Lock()

    def _load(self, series_uid: str) -> SeriesKey | None:
        row = self.store.query_one(
            "SELECT s.study_uid, s.modality, i.sop_class_uid, i.path FROM series s "
            "JOIN instances i ON i.series_uid = s.series_uid WHERE s.series_uid = ? LIMIT 1", (series_uid,))
        if row is None:
            return None
        try:
            h = parse_file(self.store.data_dir / row["path"])
            return SeriesKey(row["study_uid"], row["modality"], row["sop_class_uid"], h.rows, h.columns)
        except (OSError, ValueError):
            return SeriesKey(row["study_uid"], row["modality"], row["sop_class_uid"], None, None)

    def check(self, h: Header) -> None:
        if not (h.series_uid and h.study_uid):
            raise Refusal(sop.DATASET_DOES_NOT_MATCH_SOP_CLASS, "missing Study or Series Instance UID")
        with self._lock:
            key = self._keys.get(h.series_uid)
        if key is None:
            key = self._load(h.series_uid) or SeriesKey(h.study_uid, h.modality, h.sop_class_uid, h.rows, h.columns)
            with self._lock:
                if len(self._keys) >= self.capacity:
                    self._keys.pop(next(iter(self._keys)))
                key = self._keys.setdefault(h.series_uid, key)
        conflict = sop.CANNOT_UNDERSTAND_SERIES_CONFLICT
        if key.study_uid != h.study_uid:
            raise Refusal(conflict, f"series {h.series_uid} belongs to study {key.study_uid}; this instance says "
                          f"study {h.study_uid}")
        if key.modality and h.modality != key.modality:
            raise Refusal(conflict, f"an instance of modality {h.modality or '(none)'} joining a {key.modality} series")
        if key.sop_class_uid and h.sop_class_uid != key.sop_class_uid:
            raise Refusal(conflict, f"SOP class {_sop_name(h.sop_class_uid)} joining a series of "
                          f"{_sop_name(key.sop_class_uid)}")
        if (h.modality == "CT" and key.rows and key.columns
                and (h.rows, h.columns) != (key.rows, key.columns)):
            raise Refusal(conflict, f"a {h.rows} x {h.columns} image joining a CT series of "
                          f"{key.rows} x {key.columns} images")

    def forget(self, series_uid: str) -> None:
        with self._lock:
            self._keys.pop(series_uid, None)


def _sop_name(uid: str | None) -> str:
    return pydicom.uid.UID(uid).name if uid else "none"


# -- selection rules --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    pipeline: str | None  # "pancreas" | "mammo" | None (not analysed)
    reason: str | None


@dataclass
class _Slice:
    localizer: bool
    axial: bool | None  # None: orientation unknown
    plane: str
    thickness: float | None
    position: float | None  # along the slice normal, for spacing when thickness is missing
    frames: int


def _plane(iop: list[float] | None) -> tuple[bool | None, str, list[float] | None]:
    if not iop or len(iop) != 6:
        return None, "unknown", None
    r, c = iop[:3], iop[3:]
    n = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]]
    norm = math.sqrt(sum(v * v for v in n)) or 1.0
    n = [v / norm for v in n]
    axis = max(range(3), key=lambda i: abs(n[i]))
    name = ("sagittal", "coronal", "axial")[axis]
    axial = abs(n[2]) >= math.cos(math.radians(MAX_TILT_DEG))
    return axial, "axial" if axial else name, n


def _floats(value: object) -> list[float] | None:
    try:
        return [float(v) for v in value] if value is not None else None  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None


def _first(seq: object, keyword: str) -> object | None:
    """`keyword` from the first item of a functional-group sequence (Enhanced CT)."""
    try:
        return getattr(seq[0], keyword, None)  # type: ignore[index]
    except (IndexError, TypeError):
        return None


def _slices(path: Path) -> _Slice:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    localizer = "LOCALIZER" in image_type
    frames = int(ds.get("NumberOfFrames") or 1)
    iop, thickness, position = ds.get("ImageOrientationPatient"), ds.get("SliceThickness"), ds.get("ImagePositionPatient")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:  # Enhanced / legacy-converted CT keep geometry in functional groups
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
    return _Slice(localizer, axial, plane, thick, along, frames)


def _spacing(positions: list[float]) -> float | None:
    if len(positions) < 2:
        return None
    ordered = sorted(positions)
    gaps = sorted(b - a for a, b in zip(ordered, ordered[1:], strict=False) if b - a > 1e-3)
    return gaps[len(gaps) // 2] if gaps else None


def decide_ct(slices: list[_Slice], body_part: str | None) -> Decision:
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


def decide(store: Store, series: dict) -> Decision:
    """The selection rules for one complete series (module docstring)."""
    rows = store.query("SELECT path, sop_class_uid FROM instances WHERE series_uid = ?", (series["series_uid"],))
    classes = {r["sop_class_uid"] for r in rows}
    modality = (series["modality"] or "").upper()
    if not rows:
        return Decision(None, "series has no stored instances")
    if classes <= {sop.MG_FOR_PRESENTATION} and modality == "MG":
        return Decision("mammo", None)
    if classes & sop.MG_SOP_CLASSES:
        if sop.MG_FOR_PROCESSING in classes:
            return Decision(None, "MG For Processing (raw detector) images are stored but not analysed; the "
                            "mammography pipeline reads For Presentation images")
        return Decision(None, f"mammography images with modality {modality or 'missing'}; the mammography "
                        "pipeline needs modality MG")
    if classes == {SecondaryCaptureImageStorage}:
        return Decision(None, "Secondary Capture images (screenshots, dose pages) are stored but not analysed")
    if classes <= sop.CT_SOP_CLASSES:
        if modality != "CT":
            return Decision(None, f"CT image storage with modality {modality or 'missing'}; the pancreas "
                            "pipeline reads CT")
        slices = []
        for r in rows:
            try:
                slices.append(_slices(store.data_dir / r["path"]))
            except Exception as exc:  # an unreadable file must not stop the assessment of the others
                log.warning("header unreadable during assembly", series=series["series_uid"], path=r["path"],
                            error=str(exc))
        return decide_ct(slices, series["body_part"])
    names = ", ".join(sorted(_sop_name(c) for c in classes))
    return Decision(None, f"series mixes SOP classes ({names}); each pipeline reads one kind of image")


# -- the periodic pass ------------------------------------------------------------------------------
def _mammo_study(store: Store, study_uid: str, stable_before: float) -> list[str] | None:
    """The study's MG For Presentation series if all are complete, or None if one is still arriving."""
    rows = store.query(
        "SELECT series_uid, state, last_received_at, number, first_received_at FROM series "
        "WHERE study_uid = ? AND modality = 'MG' ORDER BY number, first_received_at", (study_uid,))
    if any(r["state"] == "receiving" and r["last_received_at"] > stable_before for r in rows):
        return None
    return [r["series_uid"] for r in rows]


def _queue(store: Store, study_uid: str, series_uid: str, pipeline: str, slog) -> int:
    job = jobs.enqueue(store, study_uid, series_uid, pipeline)
    state = (jobs.get(store, job) or {}).get("state")
    if state in ("done", "failed", "quarantined"):
        slog.warning("new images arrived after this series was analysed; the result does not include them",
                     job=job, job_state=state)
    return job


def complete_stable_series(store: Store, stable_after_s: float, *, now: float | None = None,
                           series_uids: set[str] | None = None) -> list[dict]:
    """Assess every series quiet for `stable_after_s` (or only `series_uids`: an upload that just ended);
    queue jobs; return what was decided (for logs/tests)."""
    now = time.time() if now is None else now
    stable_before = now - stable_after_s
    outcomes: list[dict] = []
    due = store.query("SELECT * FROM series WHERE state = 'receiving' AND last_received_at <= ? "
                      "ORDER BY last_received_at", (stable_before,))
    if series_uids is not None:
        due = [row for row in due if row["series_uid"] in series_uids]
    done_studies: set[str] = set()
    for series in due:
        slog = log.bind(study=series["study_uid"], series=series["series_uid"])
        try:
            decision = decide(store, dict(series))
        except Exception as exc:  # one broken series must not block the others
            slog.exception("series assessment failed")
            decision = Decision(None, f"series could not be assessed ({type(exc).__name__}: {exc})")
        if decision.pipeline == "mammo":
            if series["study_uid"] in done_studies:
                continue
            members = _mammo_study(store, series["study_uid"], stable_before)
            if members is None:
                continue  # another MG series of this exam is still arriving
            outcomes += _queue_mammo(store, series["study_uid"], members, slog)
            done_studies.add(series["study_uid"])
            continue
        if decision.pipeline:
            if not set_series_state(store, series["series_uid"], "queued", pipeline=decision.pipeline,
                                    only_if=("receiving",)):
                continue  # a new instance re-opened it meanwhile: assess it when it is quiet again
            job = _queue(store, series["study_uid"], series["series_uid"], decision.pipeline, slog)
            slog.info("series complete: queued", pipeline=decision.pipeline, job=job)
            outcomes.append({"series_uid": series["series_uid"], "state": "queued", "pipeline": decision.pipeline,
                             "job": job})
        else:
            if set_series_state(store, series["series_uid"], "not_analysed", reason=decision.reason,
                                only_if=("receiving",)):
                slog.info("series complete: not analysed", reason=decision.reason)
                outcomes.append({"series_uid": series["series_uid"], "state": "not_analysed",
                                 "reason": decision.reason})
    return outcomes


def _queue_mammo(store: Store, study_uid: str, members: Iterable[str], slog) -> list[dict]:
    """One job for the exam, anchored on an existing mammo job's series or the study's first MG series."""
    members = list(members)
    eligible = [uid for uid in members
                if decide(store, {"series_uid": uid, "modality": "MG", "body_part": None}).pipeline == "mammo"]
    if not eligible:
        return []
    existing = store.query_one("SELECT series_uid FROM jobs WHERE study_uid = ? AND pipeline = 'mammo'", (study_uid,))
    anchor = existing["series_uid"] if existing else eligible[0]
    anchor_no = store.query_one("SELECT number FROM series WHERE series_uid = ?", (anchor,))
    label = f"series {anchor_no['number']}" if anchor_no and anchor_no["number"] is not None else anchor
    for uid in eligible:
        reason = None if uid == anchor else f"analysed with {label} as one mammography exam"
        set_series_state(store, uid, "queued", pipeline="mammo", reason=reason, only_if=("receiving", "queued"))
    job = _queue(store, study_uid, anchor, "mammo", slog)
    slog.info("mammography exam complete: queued", job=job, series_count=len(eligible))
    return [{"series_uid": uid, "state": "queued", "pipeline": "mammo", "job": job} for uid in eligible]
