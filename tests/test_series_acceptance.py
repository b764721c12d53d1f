"""Which series a pipeline accepts is stated once (appliance.pipeline.accepts, issue 17 item 3): series
assembly (what the DICOM service queues, and the reason the UI shows) and `analyze` must decide exactly
as the rules do, on series no scanner in the tests normally sends: gantry tilt, irregular spacing without
SliceThickness, localisers inside the axial series, mixed thickness, orientation only in per-frame
functional groups, MG views, For Processing, wrong modalities, Secondary Capture.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from edgescreen.appliance.dicom.assembly import complete_stable_series
from edgescreen.appliance.pipeline import accepts
from edgescreen.appliance.pipeline.analyze import InputError, choose_pipeline, group_series
from edgescreen.appliance.store import Store
from tests.test_dicom_assembly import ingest
from tests.test_dicom_support import _file_dataset, write_ct_series, write_mg_series

AXIAL = (1, 0, 0, 0, 1, 0)


def _tilted(degrees: float) -> tuple[float, ...]:
    a = np.radians(degrees)
    return (1, 0, 0, 0, float(np.cos(a)), float(-np.sin(a)))


def _ct(out: Path, positions: Sequence[float], *, thickness: Sequence[float | None] | float | None = 2.5,
        orientation: Sequence[float] | None = AXIAL, localizer: Callable[[int], bool] = lambda k: False,
        modality: str = "CT", body_part: str | None = "ABDOMEN", sop_class: str = CTImageStorage) -> list[Path]:
    """One CT series: a slice per position (mm along z), each with its own thickness (None: absent)."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    thick = list(thickness) if isinstance(thickness, Sequence) else [thickness] * len(positions)
    paths = []
    for k, z in enumerate(positions):
        attrs = {"Modality": modality, "SeriesNumber": 2, "InstanceNumber": k + 1,
                 "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER" if localizer(k) else "AXIAL"],
                 "ImagePositionPatient": [0, 0, float(z)], "PixelSpacing": [0.8, 0.8], "Rows": 16, "Columns": 16,
                 "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 16,
                 "BitsStored": 12, "HighBit": 11, "PixelRepresentation": 0}
        if body_part is not None:
            attrs["BodyPartExamined"] = body_part
        if orientation is not None:
            attrs["ImageOrientationPatient"] = list(orientation)
        if thick[k] is not None:
            attrs["SliceThickness"] = thick[k]
        ds = _file_dataset(sop_class, study, series, **attrs)
        ds.PixelData = np.zeros((16, 16), np.uint16).tobytes()
        paths.append(out / f"{k:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _enhanced_per_frame_orientation(out: Path) -> list[Path]:
    """A legacy-converted enhanced CT of 24 frames whose orientation is only in the per-frame groups (as
    some converters write it): the rules must look there, so the quick header pass must read them too."""
    import highdicom

    legacy = []
    for p in write_ct_series(out / "src", 24, size=16):
        ds = pydicom.dcmread(p)
        ds.update({"Manufacturer": "X", "FrameOfReferenceUID": "1.2.3.4", "StudyTime": "120000",
                   "AccessionNumber": "A1", "ReferringPhysicianName": "", "StudyID": "1", "PatientSex": "O",
                   "PatientBirthDate": "", "ContentDate": "20240101", "ContentTime": "120000",
                   "AcquisitionNumber": 1, "KVP": 120, "PositionReferenceIndicator": ""})
        legacy.append(ds)
    enhanced = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=generate_uid(), series_number=9, sop_instance_uid=generate_uid(), instance_number=1)
    shared = enhanced.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence
    del shared.PlaneOrientationSequence
    for frame in enhanced.PerFrameFunctionalGroupsSequence:
        frame.PlaneOrientationSequence = orientation
    if "ImageOrientationPatient" in enhanced:
        del enhanced.ImageOrientationPatient
    path = out / "enhanced.dcm"
    enhanced.save_as(path)
    return [path]


def _secondary_capture(out: Path) -> list[Path]:
    out.mkdir(parents=True)
    ds = _file_dataset(SecondaryCaptureImageStorage, generate_uid(), generate_uid(), Modality="OT", SeriesNumber=99,
                       InstanceNumber=1, Rows=8, Columns=8, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
                       BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0)
    ds.PixelData = bytes(64)
    ds.save_as(out / "sc.dcm", enforce_file_format=True)
    return [out / "sc.dcm"]


def _mg_with_modality(out: Path, modality: str) -> list[Path]:
    paths = write_mg_series(out, [("R", "CC"), ("L", "CC")], study=generate_uid(), series_number=5)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.Modality = modality
        ds.save_as(p)
    return paths


def _ct_and_sc(out: Path) -> list[Path]:
    ct = _ct(out / "ct", [2.5 * k for k in range(24)])
    sc = pydicom.dcmread(_secondary_capture(out / "sc")[0])
    first = pydicom.dcmread(ct[0])
    sc.StudyInstanceUID, sc.SeriesInstanceUID, sc.Modality = first.StudyInstanceUID, first.SeriesInstanceUID, "CT"
    sc.save_as(out / "sc" / "sc.dcm")
    return [*ct, out / "sc" / "sc.dcm"]


def _irregular(n: int, gaps: Sequence[float]) -> list[float]:
    return [float(v) for v in np.cumsum([0.0] + [gaps[k % len(gaps)] for k in range(n - 1)])]


# name -> (writer, the pipeline the rules are expected to choose: a check that the cases are the odd ones)
SERIES: dict[str, tuple[Callable[[Path], list[Path]], str | None]] = {
    "axial": (lambda o: _ct(o, [2.5 * k for k in range(24)]), "pancreas"),
    "tilt 20 degrees": (lambda o: _ct(o, [2.5 * k for k in range(22)], orientation=_tilted(20)), "pancreas"),
    "tilt 40 degrees": (lambda o: _ct(o, [2.5 * k for k in range(22)], orientation=_tilted(40)), None),
    "coronal": (lambda o: _ct(o, [2.0 * k for k in range(30)], orientation=(1, 0, 0, 0, 0, -1)), None),
    "no orientation": (lambda o: _ct(o, [2.5 * k for k in range(24)], orientation=None), None),
    "irregular spacing, no thickness": (
        lambda o: _ct(o, _irregular(24, [2.0, 3.5, 2.5, 4.0]), thickness=None), "pancreas"),
    "wide irregular spacing, no thickness": (
        lambda o: _ct(o, _irregular(24, [6.0, 7.5]), thickness=None), None),
    "one slice without thickness": (
        lambda o: _ct(o, [2.5 * k for k in range(21)], thickness=[2.5] * 10 + [None] + [2.5] * 10), "pancreas"),
    "localisers inside 24 axial": (
        lambda o: _ct(o, [2.5 * k for k in range(26)], localizer=lambda k: k < 2), "pancreas"),
    "localisers inside 18 axial": (
        lambda o: _ct(o, [2.5 * k for k in range(21)], localizer=lambda k: k in (0, 10, 20)), None),
    "localisers only": (lambda o: _ct(o, [0.0, 1.0], localizer=lambda k: True), None),
    "mixed thickness": (
        lambda o: _ct(o, [2.5 * k for k in range(25)], thickness=[2.5] * 10 + [7.5] * 15), None),
    "thick": (lambda o: _ct(o, [7.5 * k for k in range(30)], thickness=7.5), None),
    "body part HEAD": (lambda o: _ct(o, [2.5 * k for k in range(24)], body_part="HEAD"), None),
    "body part lower case pelvis": (lambda o: _ct(o, [2.5 * k for k in range(24)], body_part="pelvis"), None),
    "body part missing": (lambda o: _ct(o, [2.5 * k for k in range(24)], body_part=None), "pancreas"),
    "CT images of modality OT": (lambda o: _ct(o, [2.5 * k for k in range(24)], modality="OT"), None),
    "enhanced CT, per-frame orientation": (_enhanced_per_frame_orientation, "pancreas"),
    "CT and SC in one series": (_ct_and_sc, None),
    "MG four views": (lambda o: write_mg_series(o, [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")],
                                                study=generate_uid(), series_number=3), "mammo"),
    "MG For Processing": (lambda o: write_mg_series(o, [("R", "CC"), ("R", "MLO")], study=generate_uid(),
                                                    series_number=4, for_processing=True), None),
    "MG images of modality DX": (lambda o: _mg_with_modality(o, "DX"), None),
    "Secondary Capture": (_secondary_capture, None),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("series")
    return {name: writer(root / f"s{i:02d}") for i, (name, (writer, _)) in enumerate(SERIES.items())}


@pytest.fixture(scope="module")
def assembled(written: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every series received into one store and assessed by series assembly: its row, by series UID."""
    store = Store(tmp_path_factory.mktemp("store") / "data")
    for paths in written.values():
        ingest(store, paths)
    complete_stable_series(store, 1.0, now=time.time() + 2)
    return {r["series_uid"]: dict(r) for r in store.query("SELECT series_uid, state, pipeline, reason FROM series")}


def _rules(paths: list[Path]) -> accepts.Decision:
    return accepts.decide(accepts.series_facts(pydicom.dcmread(p, stop_before_pixels=True) for p in paths))


@pytest.mark.parametrize("name", list(SERIES))
def test_series_assembly_decides_as_the_rules(name: str, written: dict, assembled: dict) -> None:
    paths = written[name]
    decision = _rules(paths)
    assert decision.pipeline == SERIES[name][1], f"{name}: the case is not the one meant ({decision})"
    row = assembled[str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)]
    if decision.pipeline is None:
        assert (row["state"], row["pipeline"], row["reason"]) == ("not_analysed", None, decision.reason), name
    else:
        assert (row["state"], row["pipeline"]) == ("queued", decision.pipeline), name


@pytest.mark.parametrize("name", list(SERIES))
def test_analyze_decides_as_the_rules(name: str, written: dict) -> None:
    paths = written[name]
    decision = _rules(paths)
    series, skipped = group_series(paths)
    assert not skipped
    if decision.pipeline is None:
        with pytest.raises(InputError) as refused:
            choose_pipeline(series, skipped)
        modalities = {s.modality for s in series.values()}
        if modalities & {"CT", "MG"}:  # analyze quotes the rules' reason for image series it cannot read
            assert decision.reason in str(refused.value), name
    else:
        pipeline, chosen, _ = choose_pipeline(series, skipped)
        assert pipeline == decision.pipeline and len(chosen) == 1, name


def test_the_sop_class_lists_are_the_dicom_services() -> None:
    """One list of CT / MG SOP classes: the rules use what the DICOM service accepts."""
    from edgescreen.appliance.dicom import sop

    assert accepts.CT_SOP_CLASSES is sop.CT_SOP_CLASSES and accepts.MG_SOP_CLASSES is sop.MG_SOP_CLASSES
    assert set(sop.STORAGE_SOP_CLASSES) >= accepts.CT_SOP_CLASSES | accepts.MG_SOP_CLASSES
    assert str(DigitalMammographyXRayImageStorageForPresentation) == accepts.MG_FOR_PRESENTATION
