"""Series assembly: when a series is complete, which pipeline reads it, and series consistency on receipt.

A series is complete when no instance has arrived for `stable_after_s` (Orthanc's StableAge idea:
DICOM has no "end of series" message). Then the pipelines' acceptance rules decide, the same ones
`analyze` applies (appliance.pipeline.accepts: stated once): a pipeline, or "not_analysed" with the
reason in words staff read ("CT series of 12 slices; the pancreas pipeline needs ...").

Mammography is read as an exam: ONE job per study, since a 4-view exam may arrive as one series or as
four. The job waits until every MG series of the study is stable, is anchored on the study's first MG
series, and the other MG series are marked queued with it (`store.instances.job_files` gives the worker
all of the exam's files).

The header pass reads files with pixels deferred; it runs in the service's background thread, never
on the receive path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom

from edgescreen.appliance.dicom import sop
from edgescreen.appliance.dicom.header import Header, Refusal, parse_file
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.pipeline import accepts
from edgescreen.appliance.store import Store, jobs
from edgescreen.appliance.store.instances import set_series_state

log = get_logger(__name__)


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


# -- selection rules: appliance.pipeline.accepts, fed from the index ------------------------------------
Decision = accepts.Decision


def _slice_facts(path: Path) -> accepts.SliceFacts:
    return accepts.slice_facts(pydicom.dcmread(path, stop_before_pixels=True))


def decide(store: Store, series: dict) -> Decision:
    """The pipeline that reads one complete series (appliance.pipeline.accepts), from the index: modality and
    body part from the series row, SOP classes from its instances; image headers are read only when the
    rules need the geometry (CT)."""
    rows = store.query("SELECT path, sop_class_uid FROM instances WHERE series_uid = ?", (series["series_uid"],))
    classes = frozenset(r["sop_class_uid"] for r in rows)
    modality = (series["modality"] or "").upper()
    slices = []
    if accepts.reads_slices(modality, classes):
        for r in rows:
            try:
                slices.append(_slice_facts(store.data_dir / r["path"]))
            except Exception as exc:  # an unreadable file must not stop the assessment of the others
                log.warning("header unreadable during assembly", series=series["series_uid"], path=r["path"],
                            error=str(exc))
    return accepts.decide(accepts.SeriesFacts(modality, classes, series["body_part"] or None, tuple(slices)))


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
