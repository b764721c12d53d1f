"""DICOM outputs: SEG, TID 1500 SR and Encapsulated PDF, checked by the tools a site would use.

- dciodvfy (dicom3tools) must report no "Error" line for any file we write.
- pydicom and highdicom must read them back, with the right segments, frames and measurements.
- A real Orthanc (the PACS) must accept every file over its REST API.

The source CT is the project phantom (models/phantom/ct.py) when it is importable, otherwise a small
CT series built here with pydicom; either way the outputs are made from header-only datasets
(``stop_before_pixels=True``), as the worker reads them from the store.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edgescreen.appliance import RESEARCH_USE_BANNER
from edgescreen.appliance.pipeline.findings import validate_findings
from edgescreen.appliance.pipeline.outputs import DicomOutputError, write_dicom_outputs
from edgescreen.appliance.pipeline.outputs.codes import ENCAPSULATED_PDF_STORAGE, PANCREAS_PARTS
from edgescreen.appliance.pipeline.outputs.pdf import render_pdf
from edgescreen.appliance.pipeline.outputs.text import patient_rows
from tests.orthanc_server import orthanc, requires_orthanc

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
DCIODVFY = shutil.which("dciodvfy")
PDFTOTEXT = shutil.which("pdftotext")
requires_pdftotext = pytest.mark.skipif(PDFTOTEXT is None, reason="pdftotext not installed (apt install poppler-utils)")

MODELS = [
    {"role": "pancreas.stage1", "name": "pancreas-seg-ref", "version": "1.0.0", "sha256": "a" * 64,
     "backend": "openvino", "precision": "int8", "device": "CPU"},
    {"role": "pancreas.stage2", "name": "lesion-detect-ref", "version": "1.0.0", "sha256": "b" * 64,
     "backend": "openvino", "precision": "int8", "device": "CPU"},
    {"role": "pancreas.stage3", "name": "lesion-subtype-ref", "version": "1.0.0", "sha256": "c" * 64,
     "backend": "onnxruntime", "precision": "fp32", "device": "CPU"},
]


# ------------------------------------------------------------------------------------ source images


def _base(ds: Dataset, study_uid: str, sop_class: str, modality: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Müller^Anna"  # a Latin-1 name: the PDF and SR must carry it without mojibake
    ds.PatientID = "ES-TEST-0001"
    ds.PatientBirthDate = "19600214"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20250301"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC42"
    ds.Modality = modality
    ds.Manufacturer = "PhantomScanner"
    ds.InstitutionName = "Test Clinic"


def _file(ds: Dataset) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def make_ct_series(out_dir: Path, slices: int = 12, size: int = 48) -> list[Path]:
    """A small but complete CT series (CT Image IOD) on a 0.8 mm x 0.8 mm x 2.5 mm grid."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    paths = []
    for z in range(slices):
        ds = Dataset()
        _base(ds, study, CT_IMAGE_STORAGE, "CT")
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 2
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = z + 1
        ds.ImagePositionPatient = [-19.2, -19.2, -100.0 + 2.5 * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 2.5
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = rng.normal(40, 15, (size, size)).astype(np.int16).tobytes()
        path = out_dir / f"ct{z:03d}.dcm"
        _file(ds).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_mg_exam(out_dir: Path) -> list[Path]:
    """Two For-Presentation mammograms (L CC, R MLO) of one study."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i, (side, view) in enumerate([("L", "CC"), ("R", "MLO")]):
        ds = Dataset()
        _base(ds, study, MG_FOR_PRESENTATION, "MG")
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImageLaterality = side
        ds.ViewPosition = view
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = 64, 48
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.full((64, 48), 800, dtype=np.uint16).tobytes()
        path = out_dir / f"mg{i}.dcm"
        _file(ds).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _headers(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def _phantom_series(out_dir: Path) -> tuple[list[Path], dict[str, np.ndarray]] | None:
    """The project's CT phantom (few slices) and its truth as masks, when it exists; else None."""
    try:
        from edgescreen.models.phantom.ct import write_ct_study
    except ImportError:
        return None
    phantom = write_ct_study(out_dir, seed=3, lesion="pdac", slices=16)
    masks = {"pancreas": (phantom.labels == 1).astype(np.uint8), "lesion_1": phantom.lesion.astype(np.uint8)}
    return sorted(out_dir.glob("*.dcm")), masks


# ------------------------------------------------------------------------------------ fixtures


def _sorted_by_z(datasets: list[Dataset]) -> list[Dataset]:
    return sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))


def _masks(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cz, cy, cx = shape[0] // 2, shape[1] // 2, shape[2] // 2
    pancreas = ((z - cz) / 4.0) ** 2 + ((y - cy) / 6.0) ** 2 + ((x - cx) / 14.0) ** 2 <= 1.0
    lesion = ((z - cz) / 1.5) ** 2 + ((y - cy) / 3.0) ** 2 + ((x - cx + 6) / 3.0) ** 2 <= 1.0
    return {"pancreas": pancreas.astype(np.uint8), "lesion_1": (lesion & pancreas).astype(np.uint8)}


def pancreas_findings(sources: list[Dataset], lesion: bool = True) -> dict[str, Any]:
    """Findings as the pipeline writes them, validated against the real schema (findings.py)."""
    lesions = [{
        "id": "lesion_1",
        "location": "head",
        "centre_lps_mm": [10.0, 20.0, -90.0],
        "longest_diameter_mm": 18.5,
        "volume_ml": 2.1,
        "abnormal_probability": 0.93,
        "subtype_probabilities": {"pdac": 0.71, "pnet": 0.12, "ipmn": 0.09, "cp": 0.08},
        "top_subtype": "pdac",
        "top_subtype_probability": 0.71,
    }] if lesion else []
    return validate_findings({
        "pipeline": "pancreas",
        "triage": "suspicious" if lesion else "not_suspicious",
        "abnormal_probability": 0.93 if lesion else 0.04,
        "threshold": 0.5,
        "lesions": lesions,
        "pancreas_volume_ml": 72.4,
        "organs": {"liver": 1510.0, "spleen": 180.0},
        "timings_s": {"load": 1.2, "stage1": 3.4},
        "models": MODELS,
        "bundle": "x86-cpu-20250301",
        "study_uid": str(sources[0].StudyInstanceUID),
        "series_uid": str(sources[0].SeriesInstanceUID),
        "warnings": ["slice spacing varies by 0.1 mm"],
        "domain": {"in_domain": True, "reasons": []},
        "operating_point": {"name": "spec99", "target": "specificity", "target_value": 0.99, "threshold": 0.5,
                            "calibration_set": "phantom seeds 100000-100079", "source": "card"},
        "created_at": "2025-03-01T10:30:00Z",
    })


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Dataset], dict[str, np.ndarray]]:
    """(files, header-only datasets in z order, masks on that grid): the phantom, or our own series."""
    directory = tmp_path_factory.mktemp("ct")
    phantom = _phantom_series(directory / "phantom")
    if phantom is not None:
        paths, masks = phantom
        sources = _sorted_by_z(_headers(paths))
        # the phantom's arrays have slice 0 most caudal, as does sorting by ascending z
        assert masks["pancreas"].shape == (len(sources), int(sources[0].Rows), int(sources[0].Columns))
        return paths, sources, masks
    paths = make_ct_series(directory / "own")
    sources = _sorted_by_z(_headers(paths))
    return paths, sources, _masks((len(sources), int(sources[0].Rows), int(sources[0].Columns)))


@pytest.fixture(scope="module")
def pancreas_outputs(ct, tmp_path_factory) -> tuple[list[Path], dict[str, np.ndarray], dict[str, Any]]:
    _, sources, masks = ct
    findings = pancreas_findings(sources)
    paths = write_dicom_outputs(findings, sources, masks, tmp_path_factory.mktemp("out"))
    return paths, masks, findings


def mammo_findings(sources: list[Dataset]) -> dict[str, Any]:
    """Mammography findings as the pipeline writes them: images named by file, not by UID."""
    images = [
        {"path": Path(sources[0].filename).name, "laterality": "L", "view": "CC",
         "abnormal_probability": 0.81, "malignant_probability": 0.64},
        {"path": Path(sources[1].filename).name, "laterality": "R", "view": "MLO",
         "abnormal_probability": 0.12, "malignant_probability": 0.03, "notes": ["laterality from image"]},
    ]
    return validate_findings({
        "pipeline": "mammo",
        "triage": "suspicious",
        "abnormal_probability": 0.81,
        "threshold": 0.5,
        "mammo": {"images": images, "breasts": {"L": 0.81, "R": 0.12}, "exam_score": 0.81},
        "timings_s": {"mammo": 0.4},
        "models": [{"role": "mammo", "name": "mammo-ref", "version": "0.3.0", "sha256": "e" * 64,
                    "backend": "onnxruntime", "precision": "fp32", "device": "CPU"}],
        "bundle": None,
        "study_uid": str(sources[0].StudyInstanceUID),
        "series_uid": str(sources[0].SeriesInstanceUID),
        "created_at": "2025-03-02T09:00:00Z",
    })


@pytest.fixture(scope="module")
def mammo_outputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    directory = tmp_path_factory.mktemp("mg")
    mg_paths = make_mg_exam(directory / "src")
    sources = _headers(mg_paths)
    return write_dicom_outputs(mammo_findings(sources), sources, {}, directory / "out"), mg_paths


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) from dicom3tools' IOD verifier."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, errors="replace", timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


# ------------------------------------------------------------------------------------ validity


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (apt install dicom3tools)")
def test_every_output_passes_dciodvfy(pancreas_outputs, mammo_outputs) -> None:
    paths = [*pancreas_outputs[0], *mammo_outputs[0]]
    assert [p.name for p in pancreas_outputs[0]] == ["seg.dcm", "sr.dcm", "report.dcm"]
    assert [p.name for p in mammo_outputs[0]] == ["sr.dcm", "report.dcm"]
    report = {}
    for path in paths:
        errors, warnings = _dciodvfy(path)
        report[f"{path.parent.name}/{path.name}"] = (errors, warnings)
    failures = {name: errors for name, (errors, _) in report.items() if errors}
    assert not failures, failures


def test_outputs_share_the_study_and_identify_themselves(ct, pancreas_outputs) -> None:
    _, sources, _ = ct
    paths, _, _ = pancreas_outputs
    datasets = [pydicom.dcmread(p) for p in paths]
    series = {str(d.SeriesInstanceUID) for d in datasets}
    assert len(series) == 3 and str(sources[0].SeriesInstanceUID) not in series
    for ds in datasets:
        assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate"):
            assert ds.get(keyword) == sources[0].get(keyword), keyword
        assert ds.Manufacturer == "edgescreen"
        assert "RESEARCH USE ONLY" in ds.SeriesDescription
        models = {
            (item.ManufacturerModelName, item.SoftwareVersions)
            for item in ds.ContributingEquipmentSequence
            if item.Manufacturer == "edgescreen"
        }
        assert models == {(m["name"], m["version"]) for m in MODELS}
        purposes = {
            item.PurposeOfReferenceCodeSequence[0].CodeValue
            for item in ds.ContributingEquipmentSequence
            if item.Manufacturer == "edgescreen"
        }
        assert purposes == {"109102"}  # Processing Equipment


def test_uids_are_deterministic_per_findings(ct, pancreas_outputs, tmp_path) -> None:
    """A retried job must re-create the same instances, so a PACS replaces rather than duplicates."""
    _, sources, _ = ct
    paths, masks, findings = pancreas_outputs
    again = write_dicom_outputs(findings, sources, masks, tmp_path)
    first = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    second = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in again]
    assert first == second
    assert len(set(first)) == 3


# ------------------------------------------------------------------------------------ SEG


def test_seg_has_one_segment_per_mask_and_the_exact_voxels(ct, pancreas_outputs) -> None:
    _, sources, _ = ct
    paths, masks, _ = pancreas_outputs
    seg = hd.seg.segread(paths[0])
    assert seg.SegmentationType == "BINARY"
    assert seg.ImageComments == RESEARCH_USE_BANNER and seg.ContentQualification == "RESEARCH"
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["Pancreas", "Lesion 1"]
    pancreas, lesion = seg.SegmentSequence
    assert pancreas.SegmentedPropertyTypeCodeSequence[0].CodeValue == "15776009"
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert lesion.AnatomicRegionSequence[0].CodeValue == PANCREAS_PARTS["head"].value
    for segment, role in ((pancreas, "pancreas-seg-ref"), (lesion, "lesion-detect-ref")):
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == role
    # only frames with something in them: one frame per (segment, non-empty slice)
    expected_frames = sum(int(np.any(m, axis=(1, 2)).sum()) for m in masks.values())
    assert int(seg.NumberOfFrames) == expected_frames
    # the SEG cites exactly the slices that hold a segment; the voxels there match the masks exactly
    z = np.flatnonzero(masks["pancreas"].any(axis=(1, 2)) | masks["lesion_1"].any(axis=(1, 2)))
    cited = [item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert sorted(cited) == sorted(str(sources[i].SOPInstanceUID) for i in z)
    uids = [str(sources[i].SOPInstanceUID) for i in z]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(pixels[..., 0], masks["pancreas"][z])
    np.testing.assert_array_equal(pixels[..., 1], masks["lesion_1"][z])
    assert int(pixels[..., 0].sum()) == int(masks["pancreas"].sum())


def test_empty_masks_give_no_seg_and_an_sr_without_segment_references(ct, tmp_path) -> None:
    _, sources, _ = ct
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    masks = {"pancreas": np.zeros(shape, np.uint8)}
    paths = write_dicom_outputs(pancreas_findings(sources, lesion=False), sources, masks, tmp_path)
    assert [p.name for p in paths] == ["sr.dcm", "report.dcm"]
    sr = hd.sr.srread(paths[0])
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    assert len(sr.content.get_image_measurement_groups()) == 1
    if DCIODVFY:
        assert _dciodvfy(paths[0])[0] == []


def test_a_lesion_without_a_mask_is_reported_against_the_images(ct, tmp_path) -> None:
    """Stage 2 may report a lesion whose mask did not survive resampling: SR group without a segment, citing
    the slices within the lesion's extent (its centre +- half its longest diameter along the slice normal)."""
    _, sources, masks = ct
    findings = pancreas_findings(sources)
    z = [float(d.ImagePositionPatient[2]) for d in sources]  # axial, ascending: the slice normal is +z
    centre, diameter = z[len(z) // 2], 2.5 * (z[1] - z[0])  # the middle slice and one either side
    findings["lesions"][0].update(centre_lps_mm=[10.0, 20.0, centre], longest_diameter_mm=diameter)
    paths = write_dicom_outputs(findings, sources, {"pancreas": masks["pancreas"]}, tmp_path)
    assert [p.name for p in paths] == ["seg.dcm", "sr.dcm", "report.dcm"]
    assert [s.SegmentLabel for s in pydicom.dcmread(paths[0]).SegmentSequence] == ["Pancreas"]
    sr = hd.sr.srread(paths[1])
    assert [g.tracking_identifier for g in sr.content.get_volumetric_roi_measurement_groups()] == ["pancreas"]
    (lesion,) = sr.content.get_image_measurement_groups()
    assert lesion.tracking_identifier == "lesion_1"
    expected = {d.SOPInstanceUID for d, at in zip(sources, z, strict=True) if abs(at - centre) <= diameter / 2}
    assert len(expected) == 3
    assert {i.referenced_sop_instance_uid for i in lesion.source_images} == expected
    if DCIODVFY:
        for path in paths:
            assert _dciodvfy(path)[0] == [], path.name


# ------------------------------------------------------------------------------------ SR


def _text_values(ds: Dataset) -> list[str]:
    """Every TEXT value in an SR content tree, depth first."""
    found: list[str] = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            found.append(str(item.TextValue))
        found += _text_values(item)
    return found


def _measurement(group: Any, name: Any) -> Any:
    found = group.get_measurements(name=name)
    assert len(found) == 1, (name, [m.name for m in group.get_measurements()])
    return found[0]


def test_sr_carries_the_measurements_and_links_the_seg(ct, pancreas_outputs) -> None:
    _, sources, _ = ct
    paths, masks, findings = pancreas_outputs
    seg = pydicom.dcmread(paths[0], stop_before_pixels=True)
    sr = hd.sr.srread(paths[1])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    groups = {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    assert set(groups) == {"pancreas", "lesion_1"}
    lesion = groups["lesion_1"]
    diameter = _measurement(lesion, codes.SCT.LongAxis)
    assert diameter.value == pytest.approx(18.5) and diameter.unit.value == "mm"
    volume = _measurement(lesion, codes.SCT.Volume)
    assert volume.value == pytest.approx(2.1) and volume.unit.value == "ml"
    assert _measurement(groups["pancreas"], codes.SCT.Volume).value == pytest.approx(72.4)
    assert lesion.finding_sites[0].value.value == PANCREAS_PARTS["head"].value
    assert lesion.finding_type.value == codes.SCT.Neoplasm.value
    probabilities = {m.name.meaning: m.value for m in lesion.get_measurements()}
    assert probabilities["Probability of abnormality"] == pytest.approx(0.93)
    assert probabilities["Probability of Adenocarcinoma of pancreas"] == pytest.approx(0.71)
    subtype = [e for e in lesion.get_qualitative_evaluations() if e.name.value == "ES-SUBTYPE"]
    assert subtype[0].value.value == "700423003"  # SCT adenocarcinoma of pancreas
    segment_ref = lesion.referenced_segment
    assert segment_ref is not None
    assert segment_ref.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert segment_ref.referenced_segment_numbers == [2]
    assert groups["pancreas"].referenced_segment.referenced_segment_numbers == [1]
    # the segment reference also names exactly the CT slices the lesion lies on
    lesion_slices = np.flatnonzero(masks["lesion_1"].any(axis=(1, 2)))
    assert {i.referenced_sop_instance_uid for i in segment_ref.source_images_for_segmentation} == {
        sources[z].SOPInstanceUID for z in lesion_slices
    }
    texts = _text_values(sr)
    assert RESEARCH_USE_BANNER in texts
    assert "lesion-subtype-ref" in texts  # stage-3 algorithm identification on the subtype probabilities
    triage = [e for e in groups["pancreas"].get_qualitative_evaluations() if e.name.value == "ES-TRIAGE"]
    assert triage[0].value.meaning == "Suspicious" and findings["triage"] == "suspicious"


def test_sr_references_its_evidence(ct, pancreas_outputs) -> None:
    """The evidence is the SEG and exactly the slices the findings lie on (not every slice of the series)."""
    _, sources, _ = ct
    paths, masks, _ = pancreas_outputs
    sr = pydicom.dcmread(paths[1])
    referenced = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    seg_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SOPInstanceUID
    on_findings = np.flatnonzero(np.logical_or.reduce([m.any(axis=(1, 2)) for m in masks.values()]))
    assert referenced == {seg_uid, *(str(sources[i].SOPInstanceUID) for i in on_findings)}


# ------------------------------------------------------------------------------------ PDF


def _pdf_bytes(ds: Dataset) -> bytes:
    pdf = bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)]
    assert pdf.startswith(b"%PDF-1.") and pdf.rstrip().endswith(b"%%EOF")
    return pdf


def _text_of_pdf(pdf: bytes, tmp_path: Path) -> str:
    """The PDF's text layer as poppler's pdftotext extracts it (what a search or a screen reader sees)."""
    path = tmp_path / f"r{len(list(tmp_path.glob('r*.pdf')))}.pdf"
    path.write_bytes(pdf)
    out = subprocess.run([PDFTOTEXT, "-layout", str(path), "-"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return " ".join(out.stdout.split())


def _pdf_text(ds: Dataset, tmp_path: Path) -> str:
    return _text_of_pdf(_pdf_bytes(ds), tmp_path)


@requires_pdftotext
def test_pdf_is_encapsulated_and_readable(ct, pancreas_outputs, tmp_path) -> None:
    _, sources, _ = ct
    paths, _, _ = pancreas_outputs
    ds = pydicom.dcmread(paths[2])
    assert ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.BurnedInAnnotation == "YES"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert "RESEARCH USE ONLY" in ds.DocumentTitle
    text = _pdf_text(ds, tmp_path)
    for expected in ("RESEARCH USE ONLY", "NOT FOR CLINICAL USE", "Result: SUSPICIOUS", "lesion_1", "18.5",
                     dict(patient_rows(sources[0]))["Patient"], "lesion-detect-ref", "Pancreas volume: 72.4 ml",
                     "Study score: 0.930", "slice spacing varies by 0.1 mm", "x86-cpu-20250301",
                     "Validated domain: the study lies within", "spec99: specificity 0.99, threshold 0.5000"):
        assert expected in text, (expected, text[:2000])


@requires_pdftotext
def test_long_reports_break_into_numbered_pages(tmp_path: Path) -> None:
    lines = [("t", f"line {i} " + "x " * 90) for i in range(120)]  # long lines wrap, 240+ rows in all
    pdf = render_pdf("many lesions", lines)
    text = _text_of_pdf(pdf, tmp_path)
    pages = int(text.split(" of ")[-1].split()[0])
    assert pages >= 3 and f"page {pages} of {pages}" in text and "line 119" in text
    assert text.count("RESEARCH USE ONLY - NOT FOR CLINICAL USE") == pages  # the banner heads every page


def test_latin1_patient_name_survives_into_every_output(tmp_path: Path) -> None:
    """Real sites send ISO_IR 100 names; the SR, SEG and PDF must carry them unmangled."""
    sources = _sorted_by_z(_headers(make_ct_series(tmp_path / "ct", slices=6, size=32)))
    masks = _masks((6, 32, 32))
    paths = write_dicom_outputs(pancreas_findings(sources), sources, masks, tmp_path / "out")
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.PatientName == "Müller^Anna", path.name
        assert ds.SpecificCharacterSet == "ISO_IR 100", path.name
        if DCIODVFY:
            assert _dciodvfy(path)[0] == [], path.name
    if PDFTOTEXT:
        assert "Müller, Anna" in _pdf_text(pydicom.dcmread(paths[2]), tmp_path)


@requires_pdftotext
@pytest.mark.parametrize(("name", "shown"), [
    ("王^小明", "王, 小明"),  # Chinese: family name 王, given name 小明
    ("Wang^Xiaoming=王^小明", "Wang, Xiaoming = 王, 小明"),  # alphabetic = ideographic groups
    ("አበበ^ቢቂላ", "አበበ, ቢቂላ"),  # Amharic (Ethiopic script)
    ("Lefèvre^Éloïse", "Lefèvre, Éloïse"),  # French
])
def test_non_latin_patient_names_print_in_the_pdf(name: str, shown: str, tmp_path: Path) -> None:
    """The PDF embeds fonts that cover the name: pdftotext reads it back intact (was '???' in cp1252)."""
    sources = _sorted_by_z(_headers(make_ct_series(tmp_path / "ct", slices=4, size=32)))
    for ds in sources:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = name
    paths = write_dicom_outputs(pancreas_findings(sources), sources, _masks((4, 32, 32)), tmp_path / "out")
    pdf = pydicom.dcmread(paths[2])
    assert pdf.PatientName == name and pdf.SpecificCharacterSet == "ISO_IR 192"
    text = _pdf_text(pdf, tmp_path)
    assert shown in text, text[:600]
    assert "?" not in text.split("Patient ID")[0]
    if DCIODVFY:
        for path in paths:
            assert _dciodvfy(path)[0] == [], path.name


_STRIPPABLE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber", "SpecificCharacterSet")


@pytest.mark.parametrize("keyword", _STRIPPABLE)
def test_outputs_are_written_whatever_patient_or_study_attribute_the_source_lacks(keyword: str, tmp_path: Path) -> None:
    """Anonymised series often lack type 2 attributes altogether: SEG, SR and PDF are still written,
    valid, with the attribute present and empty (PS3.3), and the source headers are left as they were."""
    sources = _sorted_by_z(_headers(make_ct_series(tmp_path / "ct", slices=4, size=32)))
    for ds in sources:
        del ds[keyword]
    paths = write_dicom_outputs(pancreas_findings(sources), sources, _masks((4, 32, 32)), tmp_path / "out")
    assert [p.name for p in paths] == ["seg.dcm", "sr.dcm", "report.dcm"]
    assert all(keyword not in ds for ds in sources)
    for path in paths:
        ds = pydicom.dcmread(path)
        if keyword != "SpecificCharacterSet":
            assert keyword in ds and not ds[keyword].value, (path.name, keyword)
        if DCIODVFY:
            assert _dciodvfy(path)[0] == [], (path.name, keyword)


def test_a_study_outside_the_validated_domain_says_so_in_the_sr_and_pdf(ct, tmp_path) -> None:
    _, sources, masks = ct
    findings = pancreas_findings(sources, lesion=False)
    findings.update(triage="indeterminate", domain={"in_domain": False, "reasons": [
        "slice thickness 5.0 mm is outside the validated range [1, 3]",
        "contrast phase arterial (ContrastBolusAgent 'Iomeron') is not among non_contrast"]})
    paths = write_dicom_outputs(validate_findings(findings), sources, {"pancreas": masks["pancreas"]}, tmp_path)
    sr = pydicom.dcmread(paths[1])
    assert "slice thickness 5.0 mm is outside the validated range [1, 3]" in _text_values(sr)
    codes_found = _code_values(sr)
    assert ("ES-DOMAIN", "ES-OUTDOM") in codes_found and ("ES-TRIAGE", "ES-INDET") in codes_found
    assert any("spec99" in t for t in _text_values(sr))
    if PDFTOTEXT:
        text = _pdf_text(pydicom.dcmread(paths[2]), tmp_path)
        assert "Result: INDETERMINATE" in text and "OUTSIDE the validated domain" in text
        assert "contrast phase arterial" in text
    if DCIODVFY:
        for path in paths:
            assert _dciodvfy(path)[0] == [], path.name


def _code_values(ds: Dataset) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "CODE":
            found.append((item.ConceptNameCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodeValue))
        found += _code_values(item)
    return found


# ------------------------------------------------------------------------------------ mammography


def test_mammo_writes_sr_and_pdf_referencing_each_image(mammo_outputs) -> None:
    paths, mg_paths = mammo_outputs
    sources = _headers(mg_paths)
    sr = hd.sr.srread(paths[0])
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 3  # two images and the exam
    cancer = [m.value for g in groups for m in g.get_measurements(name=codes.DCM.ProbabilityOfCancer)]
    assert cancer == [pytest.approx(0.64), pytest.approx(0.03)]
    referenced = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {str(s.SOPInstanceUID) for s in sources}
    pdf = pydicom.dcmread(paths[1])
    assert pdf.StudyInstanceUID == sources[0].StudyInstanceUID


def test_mammo_findings_in_the_briefs_alias_shape(tmp_path: Path) -> None:
    """Top-level images with SOP Instance UIDs (the shape first sketched in the issue) also work."""
    sources = _headers(make_mg_exam(tmp_path / "src"))
    findings = {
        "pipeline": "mammo", "triage": "not_suspicious", "exam_score": 0.2, "breasts": {"L": 0.2},
        "images": [{"sop_instance_uid": str(sources[1].SOPInstanceUID), "laterality": "R", "view": "MLO",
                    "abnormal_probability": 0.2, "malignant_probability": 0.1}],
        "models": [], "study_instance_uid": str(sources[0].StudyInstanceUID),
    }
    paths = write_dicom_outputs(findings, sources, {}, tmp_path / "out")
    sr = hd.sr.srread(paths[0])
    image_group = sr.content.get_image_measurement_groups()[0]
    assert image_group.source_images[0].referenced_sop_instance_uid == sources[1].SOPInstanceUID
    findings["images"][0]["sop_instance_uid"] = "9.9.9"
    with pytest.raises(DicomOutputError, match=r"findings image 0 \(9.9.9\) is not among the 2 source images"):
        write_dicom_outputs(findings, sources, {}, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------ refusals


def test_findings_for_another_study_are_refused(ct, tmp_path) -> None:
    _, sources, _ = ct
    findings = pancreas_findings(sources)
    findings["study_uid"] = "1.2.3.4"
    with pytest.raises(DicomOutputError, match="findings are for study 1.2.3.4"):
        write_dicom_outputs(findings, sources, {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mask_on_another_grid_is_refused(ct, tmp_path) -> None:
    _, sources, _ = ct
    with pytest.raises(DicomOutputError, match=r"mask 'pancreas' has shape \(2, 2, 2\)"):
        write_dicom_outputs(pancreas_findings(sources), sources, {"pancreas": np.ones((2, 2, 2), np.uint8)}, tmp_path)
    with pytest.raises(DicomOutputError, match="mask key 'liver'"):
        write_dicom_outputs(pancreas_findings(sources), sources, {"liver": np.ones((2, 2, 2), np.uint8)}, tmp_path)


# ------------------------------------------------------------------------------------ the PACS


@requires_orthanc
def test_orthanc_accepts_every_output_into_the_source_study(ct, pancreas_outputs, mammo_outputs, tmp_path) -> None:
    ct_paths, sources, _ = ct
    outputs = [*pancreas_outputs[0], *mammo_outputs[0]]
    with orthanc(tmp_path) as pacs:
        for path in ct_paths:
            assert pacs.upload(path)["Status"] == "Success"
        for path in outputs:
            answer = pacs.upload(path)
            assert answer["Status"] == "Success", (path, answer)
        studies = pacs.get("/studies?expand")
        by_uid = {s["MainDicomTags"]["StudyInstanceUID"]: s for s in studies}
        ct_study = by_uid[str(sources[0].StudyInstanceUID)]
        assert len(ct_study["Series"]) == 4  # the CT plus SEG, SR, PDF in the same study
        modalities = sorted(pacs.get(f"/series/{s}")["MainDicomTags"]["Modality"] for s in ct_study["Series"])
        assert modalities == ["CT", "DOC", "SEG", "SR"]
        assert len(studies) == 2  # and the mammography exam beside it
    assert pacs.proc.poll() is not None  # stopped on exit


def test_created_at_in_the_findings_dates_the_content(pancreas_outputs) -> None:
    paths, _, _ = pancreas_outputs
    sr = pydicom.dcmread(paths[1], stop_before_pixels=True)
    assert sr.ContentDate == dt.date(2025, 3, 1).strftime("%Y%m%d")
