"""The mammography phantom: valid For Presentation DICOM (dciodvfy), views, labels, determinism."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edgescreen.appliance import RESEARCH_USE_BANNER
from edgescreen.models.phantom import _dicom
from edgescreen.models.phantom.mg import MG_FINDINGS, generate_mg_image, write_mg_exam

VIEW_CODES = {"CC": "399162004", "MLO": "399368009"}  # SNOMED CT: cranio-caudal, medio-lateral oblique


def dciodvfy_errors(paths: list[Path]) -> list[str]:
    """Every 'Error' line dciodvfy prints for ``paths`` (warnings are tolerated)."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy (Debian package dicom3tools) is required for these tests: apt-get install dicom3tools"
    errors = []
    for path in paths:
        run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
        errors += [f"{path.name}: {line}" for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
    return errors


@pytest.mark.parametrize("finding", MG_FINDINGS)
def test_exam_is_valid_dicom_with_labels(tmp_path: Path, finding: str) -> None:
    seed = 40 + MG_FINDINGS.index(finding)
    truth = write_mg_exam(tmp_path, seed, finding)
    files = sorted(tmp_path.glob("*.dcm"))
    assert [f.name for f in files] == ["MG_LCC.dcm", "MG_LMLO.dcm", "MG_RCC.dcm", "MG_RMLO.dcm"]
    assert dciodvfy_errors(files) == []
    assert json.loads((tmp_path / "truth.json").read_text()) == truth
    side = truth["finding_laterality"]
    assert truth["finding"] == finding and side in ("L", "R")
    for key, entry in truth["images"].items():
        ds = pydicom.dcmread(tmp_path / entry["file"])
        lat, view = key[0], key[1:]
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2" and ds.Modality == "MG"
        assert ds.PresentationIntentType == "FOR PRESENTATION" and ds.BurnedInAnnotation == "NO"
        assert ds.ImageLaterality == lat and ds.ViewPosition == view and ds.BreastImplantPresent == "NO"
        assert ds.ViewCodeSequence[0].CodeValue == VIEW_CODES[view]
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 12
        assert [float(v) for v in ds.ImagerPixelSpacing] == [0.1, 0.1]
        assert max(ds.Rows, ds.Columns) >= 1500 and int(ds.pixel_array.max()) <= 4095
        assert ds.PatientName == f"PHANTOM^MG^S{seed:04d}" and RESEARCH_USE_BANNER in ds.ImageComments
        found = entry["finding"]
        if lat != side:
            assert found is None
            continue
        assert found["type"] == finding
        x, y = found["centre_px"]
        assert 0 <= x < ds.Columns and 0 <= y < ds.Rows
        assert ds.pixel_array[int(y), int(x)] > 0, "the finding lies inside the breast"
        radius_mm = found["radius_px"] * 0.1
        assert (3 <= radius_mm <= 8) if finding == "calcification" else (4 <= radius_mm <= 12)
    cc, mlo = truth["images"][f"{side}CC"]["finding"], truth["images"][f"{side}MLO"]["finding"]
    # the same depth from the chest wall in both views of the breast
    assert cc["centre_px"][0] == pytest.approx(mlo["centre_px"][0], abs=1.0)


def test_views_are_hung_with_the_chest_wall_outside() -> None:
    images = {(lat, view): generate_mg_image(3, lat, view, None, size=(512, 416)).pixels.astype(float)
              for lat in ("L", "R") for view in ("CC", "MLO")}
    for (lat, view), img in images.items():
        left, right = img[:, :20].mean(), img[:, -20:].mean()
        assert (left > right) if lat == "L" else (right > left), f"{lat}{view}: chest wall edge"
    for lat, corner in (("L", np.s_[:40, :30]), ("R", np.s_[:40, -30:])):
        mlo, cc = images[(lat, "MLO")][corner], images[(lat, "CC")][corner]
        assert mlo.mean() > cc.mean(), "the pectoral muscle fills the upper chest-wall corner of an MLO"


def test_same_seed_same_pixels_and_uids(tmp_path: Path) -> None:
    a = generate_mg_image(9, "R", "MLO", "malignant")
    b = generate_mg_image(9, "R", "MLO", "malignant")
    assert a.pixels.tobytes() == b.pixels.tobytes() and a.finding == b.finding
    assert generate_mg_image(10, "R", "MLO", "malignant").pixels.tobytes() != a.pixels.tobytes()
    assert a.pixels.dtype == np.uint16 and a.pixel_spacing_mm == (0.1, 0.1)
    write_mg_exam(tmp_path / "a", 9)
    write_mg_exam(tmp_path / "b", 9)
    first = {f.name: f.read_bytes() for f in (tmp_path / "a").glob("*.dcm")}
    assert len(first) == 4 and first == {f.name: f.read_bytes() for f in (tmp_path / "b").glob("*.dcm")}
    uids = {pydicom.dcmread(tmp_path / "a" / name).SOPInstanceUID for name in first}
    assert len(uids) == 4
    assert _dicom.uid("mg", 9, "none", "study") != _dicom.uid("mg", 10, "none", "study")


def test_finding_survives_resampling() -> None:
    native = generate_mg_image(12, "L", "CC", "calcification")
    small = generate_mg_image(12, "L", "CC", "calcification", size=(1024, 832))
    assert small.pixels.shape == (1024, 832) and small.pixel_spacing_mm == (0.2, 0.2)
    assert small.finding["radius_px"] == pytest.approx(native.finding["radius_px"] / 2, abs=0.1)
    assert small.finding["centre_px"][0] == pytest.approx((native.finding["centre_px"][0] + 0.5) / 2 - 0.5, abs=0.1)


def test_calcifications_are_bright_dots() -> None:
    img = generate_mg_image(14, "L", "CC", "calcification")
    x, y = (int(v) for v in img.finding["centre_px"])
    r = int(img.finding["radius_px"]) + 5
    patch = img.pixels[y - r : y + r, x - r : x + r].astype(float)
    plain = generate_mg_image(14, "L", "CC", None).pixels[y - r : y + r, x - r : x + r].astype(float)
    assert (patch - plain).max() > 0.25 * 4095, "microcalcifications are much brighter than tissue"


def test_rejects_unknown_finding() -> None:
    with pytest.raises(ValueError):
        generate_mg_image(1, "L", "CC", "cyst")
