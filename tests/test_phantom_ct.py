"""The CT phantom: valid DICOM (dciodvfy), correct geometry, determinism, plausible lesions.

Slice counts stay small (z-range crops, coarse matrices) so the file runs in seconds on 2 cores;
the full 300-slice timing lives in bench/bench_phantom.py, not here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from edgescreen.appliance import RESEARCH_USE_BANNER
from edgescreen.models.phantom.ct import (
    LESION_CLASSES,
    ORGAN_LABELS,
    Acquisition,
    CtPhantom,
    generate_ct_volume,
    write_ct_series,
    write_ct_study,
)


def dciodvfy_errors(paths: list[Path]) -> list[str]:
    """Every 'Error' line dciodvfy prints for ``paths`` (warnings are tolerated)."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy (Debian package dicom3tools) is required for these tests: apt-get install dicom3tools"
    errors = []
    for path in paths:
        run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
        errors += [f"{path.name}: {line}" for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
    return errors


def lesion_window(seed: int, lesion: str, margin: float = 12.0) -> tuple[float, float]:
    """Patient z-interval around the seed's lesion, from a tiny probe render."""
    truth = generate_ct_volume(seed, lesion, matrix=16, slices=8).truth
    z, d = truth["lesion_centre_mm"][2], truth["lesion_diameter_mm"]
    return z - d / 2 - margin, z + d / 2 + margin


def test_study_is_valid_dicom_with_truth_beside_it(tmp_path: Path) -> None:
    phantom = write_ct_study(tmp_path, 4, lesion="pdac", slices=60)
    files = sorted(tmp_path.glob("*.dcm"))
    assert len(files) == 60
    assert dciodvfy_errors([files[0], files[30], files[-1]]) == []
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["seed"] == 4 and truth["lesion_class"] == "pdac"
    assert truth["lesion_location"] in ("head", "body", "tail")
    assert 8 <= truth["lesion_diameter_mm"] <= 40
    assert 40 <= truth["pancreas_volume_ml"] <= 120
    assert truth["labels"] == {"0": "background", **{str(v): k for k, v in ORGAN_LABELS.items()}}
    with np.load(tmp_path / "truth.npz") as npz:
        assert npz["labels"].shape == npz["lesion"].shape == (60, 512, 512)
        assert npz["labels"].dtype == npz["lesion"].dtype == np.uint8
        np.testing.assert_array_equal(npz["lesion"], phantom.lesion)
        assert npz["lesion"].sum() > 0
    z, y, x = (int(round(v)) for v in truth["lesion_centre_voxel"])
    assert 0 <= z < 60 and 0 <= y < 512 and 0 <= x < 512
    ds = pydicom.dcmread(files[0])
    assert ds.PatientName == "PHANTOM^CT^S0004" and ds.PatientID == "PHANTOM-CT-0004"
    assert RESEARCH_USE_BANNER in ds.ImageComments


def test_normal_series_is_valid_dicom(tmp_path: Path) -> None:
    z = generate_ct_volume(3, None, matrix=16, slices=8).truth["pancreas_z_range_mm"]
    phantom = generate_ct_volume(3, None, z_range_mm=(z[0], z[0] + 12))
    assert phantom.lesion.sum() == 0 and phantom.truth["lesion_class"] is None
    paths = write_ct_series(phantom, tmp_path, 3)
    assert dciodvfy_errors(paths[:2]) == []


def test_geometry_and_pixel_round_trip(tmp_path: Path) -> None:
    seed = 7
    full = generate_ct_volume(seed, None, matrix=16)  # the seed's natural slice grid, tiny matrix
    z0 = full.origin_mm[2]
    window = (z0 + 20 * full.spacing_mm[0], z0 + 26 * full.spacing_mm[0])
    phantom = generate_ct_volume(seed, None, z_range_mm=window)
    paths = write_ct_series(phantom, tmp_path, seed)
    slices = [pydicom.dcmread(p) for p in paths]
    step = float(slices[0].SpacingBetweenSlices)
    assert step == pytest.approx(full.spacing_mm[0], abs=1e-4)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    np.testing.assert_allclose(np.diff(positions[:, 2]), step, atol=1e-3)
    np.testing.assert_allclose(positions[:, :2], np.broadcast_to(positions[:1, :2], positions[:, :2].shape))
    # a z-range crop samples exactly the slices of the full grid
    assert (positions[0, 2] - z0) / step == pytest.approx(20, abs=1e-3)
    for k, ds in enumerate(slices):
        assert (ds.Rows, ds.Columns) == (512, 512)
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert 0.6 <= float(ds.PixelSpacing[0]) == float(ds.PixelSpacing[1]) <= 0.9
        assert 1.0 <= float(ds.SliceThickness) <= 5.0
        assert ds.ImageType == ["ORIGINAL", "PRIMARY", "AXIAL"] and ds.Modality == "CT"
        assert ds.BodyPartExamined == "ABDOMEN" and ds.Manufacturer == "edgescreen phantom"
        assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024 and ds.PixelRepresentation == 0
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, phantom.hu[k])
        assert ds.InstanceNumber == k + 1


@pytest.mark.parametrize("seed", [0, 1, 2, 5, 9, 13])
def test_seed_fixes_a_plausible_scan(seed: int) -> None:
    ph = generate_ct_volume(seed, None, matrix=16)
    dz, dy, dx = ph.spacing_mm
    assert 60 <= ph.hu.shape[0] <= 400 and 1.0 <= dz <= 5.0
    assert 0.6 <= dx * 16 / 512 <= 0.9
    coarse = generate_ct_volume(seed, None, matrix=32, slices=40)
    # other grids resample the same field of view and z extent
    assert coarse.spacing_mm[2] * 32 == pytest.approx(dx * 16)
    assert coarse.spacing_mm[0] * 40 == pytest.approx(dz * ph.hu.shape[0])


def test_same_seed_same_bytes_and_uids(tmp_path: Path) -> None:
    a = generate_ct_volume(11, "scn", matrix=64, slices=24)
    b = generate_ct_volume(11, "scn", matrix=64, slices=24)
    for name in ("hu", "labels", "lesion"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    pa = write_ct_series(a, tmp_path / "a", 11)
    pb = write_ct_series(b, tmp_path / "b", 11)
    assert [p.read_bytes() for p in pa] == [p.read_bytes() for p in pb]
    other = generate_ct_volume(12, "scn", matrix=64, slices=24)
    assert not np.array_equal(other.hu, a.hu)
    po = write_ct_series(other, tmp_path / "c", 12)
    ua, uo = pydicom.dcmread(pa[0]), pydicom.dcmread(po[0])
    for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert getattr(ua, tag) != getattr(uo, tag)
    assert ua.StudyDate == pydicom.dcmread(pb[0]).StudyDate


def test_a_lesion_never_moves_the_patient() -> None:
    normal = generate_ct_volume(21, None, matrix=48, slices=30)
    cyst = generate_ct_volume(21, "mcn", matrix=48, slices=30)
    for organ in ("liver", "spleen", "right_kidney", "left_kidney", "aorta", "vertebrae"):
        label = ORGAN_LABELS[organ]
        np.testing.assert_array_equal(normal.labels == label, cyst.labels == label)
    assert normal.lesion.sum() == 0 and cyst.lesion.sum() > 0


def test_rejects_unknown_lesion() -> None:
    with pytest.raises(ValueError):
        generate_ct_volume(1, "melanoma", matrix=16, slices=8)


def _core(mask: np.ndarray, spacing: tuple[float, float, float], depth_mm: float) -> np.ndarray:
    return ndimage.distance_transform_edt(mask, sampling=spacing) > depth_mm


@pytest.mark.parametrize("index,lesion", list(enumerate(LESION_CLASSES)))
def test_lesion_class_looks_like_itself(index: int, lesion: str) -> None:
    """Mask/class consistency and each class's non-contrast HU behaviour, on a 256 crop."""
    seed = 1 + index
    window = lesion_window(seed, lesion)
    ph = generate_ct_volume(seed, lesion, matrix=256, z_range_mm=window)
    assert ph.lesion_class == lesion and ph.truth["lesion_class"] == lesion
    les = ph.lesion.astype(bool)
    pancreas = ph.labels == ORGAN_LABELS["pancreas"]
    gland = pancreas & ~les
    assert les.sum() > 20
    assert not (les & ~pancreas).any(), "lesion voxels must carry the pancreas label"
    assert (ndimage.binary_dilation(les) & gland).any(), "the lesion must touch pancreatic parenchyma"
    hu = ph.hu.astype(np.float64)
    inner = _core(les, ph.spacing_mm, 1.5)
    inner = inner if inner.sum() >= 20 else les
    away = _core(~les, ph.spacing_mm, 6.0)
    parenchyma = _core(gland, ph.spacing_mm, 2.0) & away
    lesion_hu, gland_hu = hu[inner], hu[parenchyma]
    calcified = ndimage.label((hu > 130) & ndimage.binary_dilation(pancreas, iterations=2))[1]
    if lesion == "pdac":
        # against the same patient's normal gland (paired render): 5-20 HU darker, no calcium
        normal = generate_ct_volume(seed, None, matrix=256, z_range_mm=window)
        ref = hu_core_mean(normal)
        assert 5 <= ref - lesion_hu.mean() <= 20
        assert lesion_hu.mean() < gland_hu.mean()
    elif lesion == "pnet":
        assert abs(np.median(lesion_hu) - gland_hu.mean()) <= 12, "near iso-attenuating"
    elif lesion in ("ipmn", "mcn"):
        assert np.median(lesion_hu) <= 20, "cysts are near water"
    elif lesion == "scn":
        assert np.median(lesion_hu) <= np.median(gland_hu) - 6
    elif lesion == "spt":
        cystic = float((lesion_hu < 25).mean())
        assert 0.1 < cystic < 0.9, "mixed solid and cystic"
    elif lesion == "cp":
        assert calcified >= 3, "chronic pancreatitis shows multiple calcifications"
    else:
        assert 0 < np.median(lesion_hu) < 80, "a solid soft-tissue mass"


def hu_core_mean(ph: CtPhantom) -> float:
    """Mean HU of the pancreas at least 2 mm inside its surface."""
    gland = ph.labels == ORGAN_LABELS["pancreas"]
    return float(ph.hu[_core(gland, ph.spacing_mm, 2.0)].mean())


def test_chronic_pancreatitis_shrinks_the_gland() -> None:
    normal = generate_ct_volume(30, None, matrix=96)
    cp = generate_ct_volume(30, "cp", matrix=96)
    assert cp.truth["pancreas_volume_ml"] < 0.9 * normal.truth["pancreas_volume_ml"]


# ------------------------------------------------------------------------------------ acquisition knobs
# Each knob is what a real site varies between series; the domain gate's shifted test sets turn them one
# at a time, and stage 1 trains on their random mix (Acquisition.randomized). Small grids keep it fast.


def _slab(seed: int, **knobs: object) -> CtPhantom:
    """A 60 mm slab around the seed's pancreas on a 128 matrix, scanned with ``knobs``."""
    z = generate_ct_volume(seed, None, matrix=16, slices=8, **knobs).truth["pancreas_z_range_mm"]
    return generate_ct_volume(seed, None, matrix=128, z_range_mm=((z[0] + z[1]) / 2 - 30, (z[0] + z[1]) / 2 + 30), **knobs)


def _organ_median(ph: CtPhantom, organ: str) -> float:
    return float(np.median(ph.hu[_core(ph.labels == ORGAN_LABELS[organ], ph.spacing_mm, 3.0)]))


def test_default_acquisition_is_the_validated_domain() -> None:
    plain = generate_ct_volume(8, None, matrix=32, slices=20)
    same = generate_ct_volume(8, None, matrix=32, slices=20, acquisition=Acquisition())
    np.testing.assert_array_equal(plain.hu, same.hu)
    assert Acquisition().in_domain and not Acquisition(kernel="sharp").in_domain
    assert plain.truth["acquisition"]["contrast_phase"] == "non_contrast"
    with pytest.raises(ValueError):
        Acquisition(contrast_phase="venous")
    with pytest.raises(ValueError):
        generate_ct_volume(8, None, matrix=16, slices=8, acquisition=Acquisition(), kernel="soft")


def test_contrast_phases_enhance_vessels_and_organs() -> None:
    plain, arterial, portal = (_slab(6, contrast_phase=p) for p in ("non_contrast", "arterial", "portal_venous"))
    assert _organ_median(plain, "aorta") < 60 < 200 < _organ_median(arterial, "aorta")
    assert _organ_median(portal, "liver") > _organ_median(plain, "liver") + 35
    assert _organ_median(arterial, "pancreas") > _organ_median(plain, "pancreas") + 40
    # the anatomy does not move
    np.testing.assert_array_equal(plain.labels, portal.labels)


def test_kernel_sets_the_noise() -> None:
    def liver_noise(ph: CtPhantom) -> float:
        core = _core(ph.labels == ORGAN_LABELS["liver"], ph.spacing_mm, 6.0)
        return float(np.std(ph.hu[core]))

    soft, sharp = liver_noise(_slab(9, kernel="soft")), liver_noise(_slab(9, kernel="sharp"))
    assert sharp > 1.8 * soft


def test_slice_thickness_scan_range_and_child_size() -> None:
    base = generate_ct_volume(10, None, matrix=16)
    thin = generate_ct_volume(10, None, matrix=16, slice_thickness_mm=0.625)
    thick = generate_ct_volume(10, None, matrix=16, slice_thickness_mm=5.0)
    extent = base.hu.shape[0] * base.spacing_mm[0]
    assert thin.spacing_mm[0] == pytest.approx(0.625, rel=0.01) and thick.spacing_mm[0] == pytest.approx(5.0, rel=0.02)
    assert thin.hu.shape[0] * thin.spacing_mm[0] == pytest.approx(extent, rel=1e-6)
    pelvis = generate_ct_volume(10, None, matrix=48, slices=60, scan_range="abdomen_pelvis")
    chest = generate_ct_volume(10, None, matrix=48, slices=80, scan_range="chest_abdomen_pelvis")
    p_ext = pelvis.hu.shape[0] * pelvis.spacing_mm[0]
    c_ext = chest.hu.shape[0] * chest.spacing_mm[0]
    assert extent + 100 < p_ext < c_ext - 150
    # the lowest slices of the pelvic scan hold the femoral heads (bone) and no pancreas, the top of the chest lung
    low = pelvis.hu[:4]
    assert (low > 300).sum() > 20 and not (pelvis.labels[: pelvis.hu.shape[0] // 3] == ORGAN_LABELS["pancreas"]).any()
    assert (chest.hu[-3:] < -700).mean() > 0.2
    child = generate_ct_volume(10, None, matrix=64, body_scale=0.6)
    adult = generate_ct_volume(10, None, matrix=64)
    ratio = child.truth["pancreas_volume_ml"] / adult.truth["pancreas_volume_ml"]
    assert 0.6**3 * 0.8 < ratio < 0.6**3 * 1.25
    assert child.truth["patient"]["age"] < 18 and child.spacing_mm[1] < adult.spacing_mm[1]


def test_metal_and_truncated_field_of_view() -> None:
    metal = _slab(12, metal=True)
    assert (metal.hu >= 3000).sum() > 10
    plain = _slab(12)
    body = plain.hu > -500
    assert np.abs(metal.hu[body].astype(float) - plain.hu[body]).mean() > 10, "streaks change the body"
    narrow = generate_ct_volume(12, None, matrix=96, slices=6, fov_mm=220)
    corners = narrow.hu[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners < -950).all(), "outside the reconstruction circle there is no image (air and noise)"
    rows = narrow.hu[3] > -500
    assert rows[:, 1:-1].any(axis=0).sum() > 0.9 * 94, "the body fills the whole width: truncated"


def test_shifted_series_are_valid_dicom_with_their_own_tags(tmp_path: Path) -> None:
    z = generate_ct_volume(13, None, matrix=16, slices=8).truth["pancreas_z_range_mm"]
    ph = generate_ct_volume(13, None, z_range_mm=(z[0], z[0] + 6), contrast_phase="portal_venous", kernel="sharp",
                            scan_range="abdomen_pelvis")
    paths = write_ct_series(ph, tmp_path / "shifted", 13)
    assert dciodvfy_errors(paths[:1]) == []
    ds = pydicom.dcmread(paths[0])
    assert ds.ContrastBolusAgent == "IODINATED CONTRAST" and ds.ConvolutionKernel == "SHARP"
    assert ds.BodyPartExamined == "ABDOMENPELVIS" and "CONTRAST" in ds.ProtocolName
    plain = generate_ct_volume(13, None, z_range_mm=(z[0], z[0] + 6))
    other = pydicom.dcmread(write_ct_series(plain, tmp_path / "plain", 13)[0])
    assert other.StudyInstanceUID == ds.StudyInstanceUID and other.SeriesInstanceUID != ds.SeriesInstanceUID
    assert other.ContrastBolusAgent == "" and other.ConvolutionKernel == "STANDARD"


def test_randomized_acquisition_is_seeded_and_wide() -> None:
    draws = [Acquisition.randomized(s) for s in range(200)]
    assert draws[:5] == [Acquisition.randomized(s) for s in range(5)]
    phases = {a.contrast_phase for a in draws}
    assert phases == {"non_contrast", "arterial", "portal_venous", "delayed"}
    assert {a.kernel for a in draws} == {"soft", "standard", "sharp"}
    assert {a.scan_range for a in draws} == {"abdomen", "abdomen_pelvis", "chest_abdomen_pelvis"}
    assert any(a.metal for a in draws) and any(a.fov_mm for a in draws) and any(a.body_scale < 1 for a in draws)
    assert 0.45 < np.mean([a.contrast_phase == "non_contrast" for a in draws]) < 0.75
