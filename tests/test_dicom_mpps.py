"""MPPS against the real service: pynetdicom as the scanner's MPPS SCU (N-CREATE / N-SET), as in
pynetdicom's MPPS example, and the events the scheduler reads."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from edgescreen.appliance.scheduler.scanner import MppsSource
from tests.test_dicom_support import dicom_server, open_store, requires_dcmtk

pytestmark = requires_dcmtk


def _create_attrs(status: str | None = "IN PROGRESS") -> Dataset:
    ds = Dataset()
    ssa = Dataset()
    ssa.StudyInstanceUID = generate_uid()
    ssa.AccessionNumber = "ACC0001"
    ssa.ReferencedStudySequence = []
    ssa.RequestedProcedureID = "RP1"
    ssa.ScheduledProcedureStepID = "SPS1"
    ds.ScheduledStepAttributesSequence = [ssa]
    ds.PatientName = "TEST^MPPS"
    ds.PatientID = "MPPS-1"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT_ROOM_1"
    ds.PerformedProcedureStepStartDate = "20240101"
    ds.PerformedProcedureStepStartTime = "080000"
    ds.PerformedProcedureStepDescription = "CT ABDOMEN WO"
    ds.Modality = "CT"
    if status is not None:
        ds.PerformedProcedureStepStatus = status
    return ds


class MppsScu:
    """A scanner's MPPS side: one association per call, like most modalities do it."""

    def __init__(self, port: int, aet: str = "CT_ROOM_1") -> None:
        self.port = port
        self.aet = aet

    def _assoc(self):
        ae = AE(ae_title=self.aet)
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="EDGE")
        assert assoc.is_established
        return assoc

    def create(self, uid: str, attrs: Dataset) -> int:
        assoc = self._assoc()
        try:
            status, _ = assoc.send_n_create(attrs, ModalityPerformedProcedureStep, uid)
            return int(status.Status)
        finally:
            assoc.release()

    def set(self, uid: str, status_text: str) -> int:
        mods = Dataset()
        mods.PerformedProcedureStepStatus = status_text
        mods.PerformedProcedureStepEndDate = "20240101"
        mods.PerformedProcedureStepEndTime = "081500"
        assoc = self._assoc()
        try:
            status, _ = assoc.send_n_set(mods, ModalityPerformedProcedureStep, uid)
            return int(status.Status)
        finally:
            assoc.release()


def _mpps_events(data_dir: Path) -> list[tuple[str, dict]]:
    rows = open_store(data_dir).query("SELECT state, detail FROM events WHERE kind = 'scanner' AND source = 'mpps' "
                                      "ORDER BY id")
    return [(r["state"], json.loads(r["detail"])) for r in rows]


def test_mpps_marks_scanner_busy_then_idle_and_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    uid = generate_uid()
    with dicom_server(tmp_path, data_dir=data_dir) as srv:
        scu = MppsScu(srv.port)
        assert scu.create(uid, _create_attrs()) == 0x0000
        assert scu.create(uid, _create_attrs()) == 0x0111  # duplicate SOP instance
        assert scu.create(generate_uid(), _create_attrs(status=None)) == 0x0120  # missing attribute
        assert scu.create(generate_uid(), _create_attrs(status="COMPLETED")) == 0x0106  # invalid value
        assert scu.set(generate_uid(), "COMPLETED") == 0x0112  # no such object instance
        events = _mpps_events(data_dir)
        assert [e[0] for e in events] == ["busy"]
        assert events[0][1]["calling_ae"] == "CT_ROOM_1" and events[0][1]["station"] == "CT_ROOM_1"
        assert events[0][1]["mpps_uid"] == uid
        signal = MppsSource(open_store(data_dir)).read(now=time.time())
        assert signal.busy is True and "CT_ROOM_1" in signal.reason

    with dicom_server(tmp_path, data_dir=data_dir) as srv:  # the N-SET finds its N-CREATE after a restart
        scu = MppsScu(srv.port)
        assert scu.set(uid, "COMPLETED") == 0x0000
        assert scu.set(uid, "DISCONTINUED") == 0x0110  # no changes once the exam has ended
        events = _mpps_events(data_dir)
        assert [e[0] for e in events] == ["busy", "idle"]
        assert events[1][1]["status"] == "COMPLETED" and events[1][1]["open_exams"] == 0
        row = open_store(data_dir).query_one("SELECT status, station_ae, accession FROM mpps WHERE sop_uid = ?", (uid,))
        assert tuple(row) == ("COMPLETED", "CT_ROOM_1", "ACC0001")
        assert MppsSource(open_store(data_dir)).read(now=time.time()).busy is False


def test_two_scanners_the_last_event_stays_busy_while_one_exam_runs(tmp_path: Path) -> None:
    a, b = generate_uid(), generate_uid()
    with dicom_server(tmp_path) as srv:
        assert MppsScu(srv.port, "CT_ROOM_1").create(a, _create_attrs()) == 0
        assert MppsScu(srv.port, "MG_ROOM_1").create(b, _create_attrs()) == 0
        assert MppsScu(srv.port, "CT_ROOM_1").set(a, "COMPLETED") == 0
        assert [e[0] for e in _mpps_events(srv.data_dir)] == ["busy", "busy", "busy"]
        assert MppsScu(srv.port, "MG_ROOM_1").set(b, "DISCONTINUED") == 0
        assert _mpps_events(srv.data_dir)[-1][0] == "idle"
