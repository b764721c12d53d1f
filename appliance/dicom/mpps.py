"""MPPS SCP: the scanner tells us when an exam starts (N-CREATE IN PROGRESS) and ends (N-SET COMPLETED
or DISCONTINUED). That is the best "scanner busy" signal there is, so each change is recorded as an
event (kind "scanner", source "mpps", state "busy"/"idle", detail JSON) that the scheduler and the
dashboard timeline read.

MPPS instances are kept in the `mpps` table, committed before the response, so an N-SET after a
restart of the service still finds its N-CREATE. Status codes follow pynetdicom's MPPS example
(PS3.4 F.7.2): 0x0106 invalid attribute value, 0x0110 processing failure, 0x0111 duplicate SOP
instance, 0x0112 no such object instance, 0x0120 missing attribute.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

from edgescreen.appliance.dicom import sop
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.store import Store

log = get_logger(__name__)

MPPS_SOP_CLASS = UID("1.2.840.10008.3.1.2.3.3")  # Modality Performed Procedure Step SOP Class
IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
FINAL_STATES = (COMPLETED, DISCONTINUED)
# an IN PROGRESS exam older than this (a scanner that never sent its N-SET) no longer keeps others busy
STALE_IN_PROGRESS_S = 4 * 3600.0


def _who(event: Any) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), str(requestor.address)


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _summary(ds: Dataset) -> dict[str, Any]:
    """The fields the timeline shows: station, modality, study, accession, procedure."""
    ssa = _first_item(ds, "ScheduledStepAttributesSequence")
    return {
        "station": str(ds.get("PerformedStationAETitle") or "").strip() or None,
        "modality": str(ds.get("Modality") or "") or None,
        "study_uid": str(ssa.get("StudyInstanceUID") or "") or None if ssa else None,
        "accession": str(ssa.get("AccessionNumber") or "") or None if ssa else None,
        "procedure": str(ds.get("PerformedProcedureStepDescription") or "") or None,
    }


class MppsService:
    """EVT_N_CREATE and EVT_N_SET handlers for the MPPS SOP class."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _record(self, conn: Any, state: str, detail: dict[str, Any], now: float) -> None:
        conn.execute("INSERT INTO events (ts, kind, source, state, detail) VALUES (?, 'scanner', 'mpps', ?, ?)",
                     (now, state, json.dumps(detail)))

    def on_n_create(self, event: Any) -> tuple[int, Dataset | None]:
        req = event.request
        calling_ae, peer = _who(event)
        uid = req.AffectedSOPInstanceUID
        if uid is None:  # the SCU must supply it here (we never create MPPS UIDs)
            log.warning("MPPS N-CREATE without Affected SOP Instance UID", calling_ae=calling_ae, peer=peer)
            return sop.INVALID_ATTRIBUTE_VALUE, None
        try:
            attrs = event.attribute_list
        except Exception as exc:
            log.warning("MPPS N-CREATE attribute list unreadable", calling_ae=calling_ae, mpps=str(uid), error=str(exc))
            return sop.PROCESSING_FAILURE, None
        if "PerformedProcedureStepStatus" not in attrs:
            log.warning("MPPS N-CREATE without Performed Procedure Step Status", calling_ae=calling_ae, mpps=str(uid))
            return sop.MISSING_ATTRIBUTE, None
        status = str(attrs.PerformedProcedureStepStatus or "").upper()
        if status != IN_PROGRESS:  # PS3.4 F.7.2.1: an MPPS is created IN PROGRESS
            log.warning("MPPS N-CREATE not IN PROGRESS", calling_ae=calling_ae, mpps=str(uid), status=status)
            return sop.INVALID_ATTRIBUTE_VALUE, None
        ds = Dataset()
        ds.SOPClassUID = MPPS_SOP_CLASS
        ds.SOPInstanceUID = uid
        ds.update(attrs)
        info = _summary(ds)
        now = time.time()
        try:
            with self.store.transaction() as conn:
                if conn.execute("SELECT 1 FROM mpps WHERE sop_uid = ?", (str(uid),)).fetchone():
                    return sop.DUPLICATE_SOP_INSTANCE, None
                conn.execute(
                    """INSERT INTO mpps (sop_uid, status, calling_ae, peer, station_ae, modality, study_uid, accession,
                                         procedure, attributes, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (str(uid), status, calling_ae, peer, info["station"], info["modality"], info["study_uid"],
                     info["accession"], info["procedure"], ds.to_json(), now, now))
                self._record(conn, "busy", {"mpps_uid": str(uid), "status": status, "calling_ae": calling_ae,
                                            "peer": peer, **info}, now)
        except Exception:
            log.exception("MPPS N-CREATE could not be stored", calling_ae=calling_ae, mpps=str(uid))
            return sop.PROCESSING_FAILURE, None
        log.info("MPPS exam started: scanner busy", calling_ae=calling_ae, mpps=str(uid), study=info["study_uid"],
                 station=info["station"])
        return sop.SUCCESS, ds

    def on_n_set(self, event: Any) -> tuple[int, Dataset | None]:
        req = event.request
        calling_ae, peer = _who(event)
        uid = str(req.RequestedSOPInstanceUID or "")
        row = self.store.query_one("SELECT * FROM mpps WHERE sop_uid = ?", (uid,))
        if row is None:
            log.warning("MPPS N-SET for an unknown instance", calling_ae=calling_ae, mpps=uid)
            return sop.NO_SUCH_OBJECT_INSTANCE, None
        if row["status"] in FINAL_STATES:  # PS3.4 F.7.2.2: no changes once completed or discontinued
            log.warning("MPPS N-SET after the exam ended", calling_ae=calling_ae, mpps=uid, status=row["status"])
            return sop.PROCESSING_FAILURE, None
        try:
            mods = event.attribute_list
        except Exception as exc:
            log.warning("MPPS N-SET modification list unreadable", calling_ae=calling_ae, mpps=uid, error=str(exc))
            return sop.PROCESSING_FAILURE, None
        ds = Dataset.from_json(row["attributes"])
        ds.update(mods)
        status = str(ds.get("PerformedProcedureStepStatus", "") or "").upper()
        if status not in (IN_PROGRESS, *FINAL_STATES):
            return sop.INVALID_ATTRIBUTE_VALUE, None
        info = _summary(ds)
        now = time.time()
        try:
            with self.store.transaction() as conn:
                updated = conn.execute(
                    "UPDATE mpps SET status = ?, attributes = ?, updated_at = ?, study_uid = COALESCE(?, study_uid) "
                    "WHERE sop_uid = ? AND status = ?", (status, ds.to_json(), now, info["study_uid"], uid, row["status"]))
                if updated.rowcount != 1:  # a concurrent N-SET won; answer as if it came first
                    return sop.PROCESSING_FAILURE, None
                if status in FINAL_STATES:
                    # with two scanners, the last event must still say busy while the other's exam runs
                    open_exams = conn.execute(
                        "SELECT COUNT(*) FROM mpps WHERE status = ? AND updated_at > ?",
                        (IN_PROGRESS, now - STALE_IN_PROGRESS_S)).fetchone()[0]
                    self._record(conn, "busy" if open_exams else "idle",
                                 {"mpps_uid": uid, "status": status, "calling_ae": calling_ae, "peer": peer,
                                  "busy_s": round(now - row["created_at"], 1), "open_exams": open_exams, **info}, now)
        except Exception:
            log.exception("MPPS N-SET could not be stored", calling_ae=calling_ae, mpps=uid)
            return sop.PROCESSING_FAILURE, None
        if status in FINAL_STATES:
            log.info(f"MPPS exam {status.lower()}: scanner idle", calling_ae=calling_ae, mpps=uid,
                     study=info["study_uid"])
        return sop.SUCCESS, ds
