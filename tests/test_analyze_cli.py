"""`edgescreen analyze` as a technician runs it: exit 0 with findings, exit 2 with one clear reason."""

from __future__ import annotations

import argparse
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from edgescreen.appliance.cli import analyze as cli
from tests.test_pancreas_pipeline import write_study, write_test_models


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study")
    write_study(root / "ct")
    return root / "ct"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    code = cli.run(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_phantom_folder(tmp_path: Path, models_dir: Path, study_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(study_dir, tmp_path / "in")
    (tmp_path / "in" / "README.txt").write_text("a stray text file next to the images")
    code, out, err = _run([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--models", str(models_dir)], capsys)
    assert code == 0, err
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert findings["triage"] == "suspicious" and len(findings["lesions"]) == 2
    assert "pancreas: SUSPICIOUS" in out and "lesion_1: head" in out and "timings (s):" in out and "stage1" in out
    assert any("not DICOM" in w for w in findings["warnings"])
    assert (tmp_path / "out" / "key_pancreas.png").is_file()
    assert "\r" not in err  # no progress bar when stderr is not a terminal


def test_analyze_zip_and_threshold(tmp_path: Path, models_dir: Path, study_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(study_dir.glob("*.dcm")):
            zf.write(f, f"DICOM/{f.name}")
    code, out, err = _run([str(archive), "--out", str(tmp_path / "out"), "--models", str(models_dir),
                           "--threshold", "0.99"], capsys)
    assert code == 0, err
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert findings["threshold"] == 0.99 and findings["triage"] == "not_suspicious" and findings["lesions"] == []


def test_text_file_only_is_exit_2(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("hello")
    code, out, err = _run([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--models", str(models_dir)], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no DICOM files in the input" in err and "notes.txt" in err


@pytest.mark.parametrize("name, what", [("rtplan.dcm", "RTPLAN"), ("test-SR.dcm", "SR"), ("MR_small.dcm", "MR")])
def test_non_analysable_dicom_is_exit_2(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str],
                                        name: str, what: str) -> None:
    code, _, err = _run([get_testdata_file(name), "--out", str(tmp_path / "out"), "--models", str(models_dir)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "no CT or MG image series" in err and what in err


def test_broken_series_is_exit_2(tmp_path: Path, models_dir: Path, study_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(study_dir.glob("*.dcm"))
    keep = files[:10] + files[16:]  # six slices lost in transfer
    (tmp_path / "in").mkdir()
    for f in keep:
        shutil.copy(f, tmp_path / "in" / f.name)
    code, _, err = _run([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--models", str(models_dir)], capsys)
    assert code == 2 and "slices are missing" in err and "resend the complete series" in err


def test_missing_path_and_bundle_are_exit_2(tmp_path: Path, models_dir: Path, study_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run([str(tmp_path / "nope"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "no such file or directory" in err
    code, _, err = _run([str(study_dir), "--out", str(tmp_path / "out"), "--bundle", str(tmp_path / "nobundle")], capsys)
    assert code == 2 and "bundle" in err and "does not exist" in err


def test_bundle_manifest_selects_artifacts(tmp_path: Path, models_dir: Path, study_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    roles = {}
    for i in (1, 2, 3):
        role = f"pancreas.stage{i}"
        shutil.copy(models_dir / f"{role}.onnx", bundle / f"{role}.fp32.onnx")
        roles[role] = {"artifact": f"{role}.fp32.onnx", "backend": "onnxruntime", "precision": "fp32"}
    (bundle / "manifest.json").write_text(json.dumps({"bundle_id": "test-bundle-1", "roles": roles}))
    code, _, err = _run([str(study_dir), "--out", str(tmp_path / "out"), "--models", str(models_dir),
                         "--bundle", str(bundle)], capsys)
    assert code == 0, err
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert findings["bundle"] == "test-bundle-1"


def test_missing_models_is_exit_1(tmp_path: Path, study_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run([str(study_dir), "--out", str(tmp_path / "out"), "--models", str(tmp_path / "empty")], capsys)
    assert code == 1 and "model card not found" in err


def _write_mammogram(path: Path, laterality: str, view: str, study_uid: str) -> None:
    """A Digital Mammography For Presentation image: a bright half-disc breast on a dark background."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DigitalMammographyXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    yy, xx = np.mgrid[0:384, 0:256]
    pixels = np.where((xx / 240.0) ** 2 + ((yy - 192) / 180.0) ** 2 < 1, 2000, 100).astype(np.uint16)
    pixels = pixels + np.random.default_rng(len(view)).integers(0, 50, pixels.shape).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, generate_uid(), "MG"
    ds.PatientID, ds.PatientName, ds.ImageLaterality, ds.ViewPosition = "MG1", "Phantom^Mammo", laterality, view
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 384, 256, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_mg_images_go_to_the_mammo_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pydicom.uid import generate_uid

    study = generate_uid()
    (tmp_path / "in").mkdir()
    for lat, view in (("L", "CC"), ("R", "MLO")):
        _write_mammogram(tmp_path / "in" / f"{lat}{view}.dcm", lat, view, study)
    code, out, err = _run([str(tmp_path / "in"), "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert findings["pipeline"] == "mammo" and findings["models"][0]["role"] == "mammo"
    assert {(i["laterality"], i["view"]) for i in findings["mammo"]["images"]} == {("L", "CC"), ("R", "MLO")}
    assert len(findings["key_images"]) == 2 and all((tmp_path / "out" / k).is_file() for k in findings["key_images"])
    assert "mammo:" in out


def test_ct_and_mg_mixed_is_exit_2(tmp_path: Path, study_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pydicom

    study = str(pydicom.dcmread(next(study_dir.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    shutil.copytree(study_dir, tmp_path / "in")
    _write_mammogram(tmp_path / "in" / "mg.dcm", "L", "CC", study)
    code, _, err = _run([str(tmp_path / "in"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "mixes CT and MG" in err


def test_every_pydicom_test_file_is_refused_cleanly(tmp_path: Path, models_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed and odd files from pydicom's own test suite: exit 2 with a reason, never a traceback."""
    import os

    from pydicom.data import get_testdata_files

    files = [f for f in get_testdata_files() if os.path.isfile(f)]
    assert len(files) > 100
    for i, path in enumerate(files):
        code, out, err = _run([path, "--out", str(tmp_path / f"o{i}"), "--models", str(models_dir)], capsys)
        assert code == 2, f"{path}: exit {code}\n{err}"
        assert "unusable input:" in err and "Traceback" not in err


def _signed_bundle(root: Path, models_dir: Path, data_dir: Path) -> Path:
    """A real signed bundle (appliance.bundle's format) holding the three test models as fp32 ONNX."""
    from edgescreen.appliance.bundle import ensure_signing_key, fingerprint, load_private_key, sign_bytes
    from edgescreen.appliance.modelcard import sha256_file

    bundle = root / "bundle"
    bundle.mkdir()
    private = ensure_signing_key(data_dir)
    models, files = {}, {}
    for i in (1, 2, 3):
        role = f"pancreas.stage{i}"
        for name in (f"{role}.onnx", f"{role}.json"):
            shutil.copy(models_dir / name, bundle / name)
            files[name] = sha256_file(bundle / name)
        models[role] = {"artifact": f"{role}.onnx", "files": [f"{role}.onnx"], "backend": "onnxruntime",
                        "device": "CPU", "precision": "fp32", "sha256": files[f"{role}.onnx"], "card": f"{role}.json",
                        "gate": {"passed": True}}
    manifest = {"schema_version": 1, "bundle_id": "signed-test-1", "profile": "x86-cpu", "created_at": "2024-01-01T00:00:00Z",
                "signer": {"fingerprint": fingerprint(load_private_key(private).public_key())}, "models": models,
                "files": files}
    data = json.dumps(manifest).encode()
    (bundle / "manifest.json").write_bytes(data)
    (bundle / "manifest.sig").write_text(json.dumps(sign_bytes(private, data)))
    return bundle


def test_signed_bundle_verified_and_tampered_refused(tmp_path: Path, models_dir: Path, study_dir: Path) -> None:
    from edgescreen.appliance.pipeline.analyze import AnalysisRequest, InputError, analyze_study

    data_dir = tmp_path / "data"
    bundle = _signed_bundle(tmp_path, models_dir, data_dir)
    findings = analyze_study(AnalysisRequest([study_dir], tmp_path / "out", models_dir=tmp_path / "nowhere",
                                             bundle_dir=bundle, trusted_keys=data_dir))
    assert findings["bundle"] == "signed-test-1" and not any("not verified" in w for w in findings["warnings"])
    with open(bundle / "pancreas.stage2.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(InputError, match="sha256 mismatch"):
        analyze_study(AnalysisRequest([study_dir], tmp_path / "out2", bundle_dir=bundle, trusted_keys=data_dir))
