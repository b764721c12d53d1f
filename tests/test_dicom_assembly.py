"""Series completion and selection rules, in-process on a real store (no network: fast)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgescreen.appliance.dicom.assembly import complete_stable_series
from edgescreen.appliance.dicom.header import parse_file
from edgescreen.appliance.store import Store
from edgescreen.appliance.store.instances import IncomingInstance, job_files, store_instance
from edgescreen.appliance.store.worklist import list_studies
from tests.test_dicom_support import write_ct_series, write_mg_series


def ingest(store: Store, paths: list[Path], calling_ae: str = "SCANNER") -> None:
    for p in paths:
        h = parse_file(p)
        inst = IncomingInstance(h.sop_uid, h.sop_class_uid, h.study_uid, h.series_uid, instance_number=h.instance_number,
                                calling_ae=calling_ae, study=h.study_fields(), series=h.series_fields())
        store_instance(store, inst, p.read_bytes(), durable_index=False)


def states(store: Store) -> dict[str, tuple[str, str | None, str | None]]:
    """series description-ish key (number) -> (state, pipeline, reason)."""
    return {r["number"]: (r["state"], r["pipeline"], r["reason"])
            for r in store.query("SELECT number, state, pipeline, reason FROM series")}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "data")


def test_nothing_is_assessed_before_the_series_is_stable(store: Store, tmp_path: Path) -> None:
    ingest(store, write_ct_series(tmp_path / "a", 24))
    assert complete_stable_series(store, 30.0) == []
    assert states(store)[2][0] == "receiving"
    assert complete_stable_series(store, 30.0, now=time.time() + 31)[0]["state"] == "queued"


def test_ct_selection_rules(store: Store, tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.10.543.1"
    ingest(store, write_ct_series(tmp_path / "axial", 24, thickness=2.5, study=study, series_number=2))
    ingest(store, write_ct_series(tmp_path / "short", 12, thickness=2.5, study=study, series_number=3))
    ingest(store, write_ct_series(tmp_path / "scout", 2, study=study, localizer=True, series_number=1))
    ingest(store, write_ct_series(tmp_path / "thick", 30, thickness=7.5, study=study, series_number=4))
    ingest(store, write_ct_series(tmp_path / "coronal", 40, orientation=(1, 0, 0, 0, 0, -1), study=study,
                                  series_number=5))
    ingest(store, write_ct_series(tmp_path / "head", 40, body_part="HEAD", study=study, series_number=6))
    ingest(store, write_ct_series(tmp_path / "tilted", 22, orientation=(1, 0, 0, 0, 0.94, -0.342), study=study,
                                  series_number=7))  # 20 degrees of gantry tilt is still axial
    complete_stable_series(store, 1.0, now=time.time() + 2)
    s = states(store)
    assert s[2] == ("queued", "pancreas", None)
    assert s[7] == ("queued", "pancreas", None)
    assert s[3] == ("not_analysed", None, "CT series of 12 slices; the pancreas pipeline needs at least 20 axial "
                    "slices of 5 mm or less")
    assert s[1][0] == "not_analysed" and "localizer" in s[1][2]
    assert s[4][0] == "not_analysed" and "30 axial slices 7.5 mm thick" in s[4][2]
    assert s[5][0] == "not_analysed" and "40 coronal slices" in s[5][2]
    assert s[6][0] == "not_analysed" and "body part HEAD" in s[6][2]
    jobs = store.query("SELECT pipeline, series_uid FROM jobs")
    assert len(jobs) == 2 and {j["pipeline"] for j in jobs} == {"pancreas"}
    listed = list_studies(store)[0]["series"]
    assert {se["number"]: se["job_state"] for se in listed}[2] == "queued"


def test_mammography_exam_in_four_series_is_one_job(store: Store, tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.10.543.2"
    views = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
    paths = []
    for i, view in enumerate(views):
        paths += write_mg_series(tmp_path / f"mg{i}", [view], study=study, series_number=71 + i)
    ingest(store, paths)
    raw = write_mg_series(tmp_path / "raw", views, study=study, series_number=90, for_processing=True)
    ingest(store, raw)
    now = time.time()
    # the last view is still arriving (its last instance is newer): nothing may be queued for the exam yet
    with store.transaction() as conn:
        conn.execute("UPDATE series SET last_received_at = ? WHERE number = 74", (now + 5,))
    complete_stable_series(store, 1.0, now=now + 2)
    assert store.query("SELECT * FROM jobs") == []
    complete_stable_series(store, 1.0, now=now + 7)
    jobs = store.query("SELECT * FROM jobs")
    assert len(jobs) == 1 and jobs[0]["pipeline"] == "mammo"
    s = states(store)
    assert all(s[n][:2] == ("queued", "mammo") for n in (71, 72, 73, 74))
    assert s[71][2] is None and "analysed with series 71 as one mammography exam" in s[74][2]
    assert s[90][0] == "not_analysed" and "For Processing" in s[90][2]
    assert len(job_files(store, dict(jobs[0]))) == 4, "the worker must get all four views"
    assert {se["number"]: se["job_state"] for se in list_studies(store)[0]["series"]} == \
        {71: "queued", 72: "queued", 73: "queued", 74: "queued", 90: None}
    # a view sent again later joins the same job
    ingest(store, write_mg_series(tmp_path / "extra", [("R", "XCCL")], study=study, series_number=75))
    complete_stable_series(store, 1.0, now=time.time() + 10)
    assert len(store.query("SELECT * FROM jobs")) == 1 and states(store)[75][:2] == ("queued", "mammo")
    assert len(job_files(store, dict(jobs[0]))) == 5


def test_a_late_instance_reopens_an_assessed_series(store: Store, tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "a", 21)
    ingest(store, paths[:12])
    complete_stable_series(store, 1.0, now=time.time() + 2)
    assert states(store)[2][0] == "not_analysed"
    ingest(store, paths[12:])  # the rest of the series after a pause longer than stable_after_s
    assert states(store)[2][0] == "receiving"
    complete_stable_series(store, 1.0, now=time.time() + 2)
    assert states(store)[2] == ("queued", "pancreas", None)


def test_enhanced_ct_counts_frames(store: Store, tmp_path: Path) -> None:
    """One legacy-converted enhanced CT object of 24 frames is a 24-slice axial volume."""
    import highdicom
    import pydicom
    from pydicom.uid import generate_uid

    legacy = []
    for p in write_ct_series(tmp_path / "s", 24, size=32):
        ds = pydicom.dcmread(p)
        ds.update({"Manufacturer": "X", "FrameOfReferenceUID": generate_uid(), "StudyTime": "120000",
                   "AccessionNumber": "A1", "ReferringPhysicianName": "", "StudyID": "1", "PatientSex": "O",
                   "PatientBirthDate": "", "ContentDate": "20240101", "ContentTime": "120000",
                   "AcquisitionNumber": 1, "KVP": 120, "PositionReferenceIndicator": ""})
        legacy.append(ds)
    for ds in legacy[1:]:
        ds.FrameOfReferenceUID = legacy[0].FrameOfReferenceUID
    enhanced = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=generate_uid(), series_number=9, sop_instance_uid=generate_uid(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    ingest(store, [tmp_path / "enhanced.dcm"])
    complete_stable_series(store, 1.0, now=time.time() + 2)
    assert states(store)[9] == ("queued", "pancreas", None)
