"""Series loading: real DICOM test files from pydicom, and phantom series broken in the ways scanners break them."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from edgescreen.appliance.pipeline.ctload import SeriesError, load_ct_series
from edgescreen.appliance.pipeline.preprocess import Grid, canonical_orientation

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def phantom_hu(shape: tuple[int, int, int] = (24, 32, 32), seed: int = 0) -> np.ndarray:
    """A smooth abdomen-like volume (int16 HU): body, an organ, a bright spot, mild noise."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[(y / 0.9) ** 2 + (x / 0.95) ** 2 < 1] = -90
    hu[((x + 0.4) / 0.35) ** 2 + (y / 0.4) ** 2 + (z / 0.8) ** 2 < 1] = 60
    hu[(x - 0.3) ** 2 + (y - 0.1) ** 2 + z**2 < 0.05] = 400
    hu += 2.0 * z * 10  # a gentle z gradient so slices differ
    hu += np.random.default_rng(seed).normal(0, 3, shape)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)  # a scanner's 12-bit range


def write_series(
    out_dir: Path,
    hu: np.ndarray,
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
    origin: tuple[float, float, float] = (-12.0, -15.0, 100.0),
    *,
    orientation: tuple[float, ...] = AXIAL,
    slope: float = 1.0,
    intercept: float = -1024.0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "CT",
    syntax: str = ExplicitVRLittleEndian,
    edit: Callable[[Dataset, int], None] | None = None,
) -> list[Path]:
    """One CT Image Storage file per slice; positions step along the slice normal. `edit` may change a slice."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
    frame_uid = generate_uid()
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    paths = []
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.PatientID, ds.PatientName = modality, "PHANTOM", "Phantom^Test"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19700101", "O", "20240101", "120000"
        ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber, ds.SeriesNumber = "", "1", "", 1
        ds.Manufacturer, ds.ContentDate, ds.ContentTime, ds.AcquisitionNumber = "edgescreen", "20240101", "120000", 1
        ds.ImageType, ds.KVP = ["ORIGINAL", "PRIMARY", "AXIAL"], 120
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[0] * normal]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.rint((hu[k].astype(np.float64) - intercept) / slope).astype("<u2").tobytes()
        if edit is not None:
            edit(ds, k)
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax) if syntax != ImplicitVRLittleEndian else setattr(ds.file_meta, "TransferSyntaxUID", syntax)
        path = out_dir / f"IM{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def hu() -> np.ndarray:
    return phantom_hu()


def _reference(path: str | Path, *, ct: bool = True) -> np.ndarray:
    """pydicom's own decode + modality LUT; for CT, padding and values below air are air (-1024)."""
    ds = pydicom.dcmread(path)
    hu = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    if ct and "PixelPaddingValue" in ds:
        hu[ds.pixel_array == ds.PixelPaddingValue] = -1024
    return np.maximum(hu, -1024) if ct else hu


# ---------------------------------------------------------------------------------------------- real files


def test_ct_small_real_file() -> None:
    path = get_testdata_file("CT_small.dcm")
    vol = load_ct_series([path], min_slices=1)
    ds = pydicom.dcmread(path)
    assert vol.hu.shape == (1, 128, 128)
    np.testing.assert_array_equal(vol.hu[0], _reference(path))
    assert vol.spacing_mm[1:] == (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
    assert vol.origin == tuple(float(v) for v in ds.ImagePositionPatient)
    assert vol.series_uid == ds.SeriesInstanceUID and "PixelData" not in vol.datasets[0]


@pytest.mark.parametrize("name", ["J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm"])
def test_real_compressed_ct_files(name: str) -> None:
    """Real JPEG 2000 CT slices (one with a pixel-representation mismatch) decode as pydicom decodes them."""
    path = get_testdata_file(name)
    vol = load_ct_series([path], min_slices=1)
    np.testing.assert_allclose(vol.hu[0], _reference(path))


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_real_compressed_mr_equals_uncompressed(name: str) -> None:
    want = load_ct_series([get_testdata_file("MR_small.dcm")], min_slices=1, modalities=())
    got = load_ct_series([get_testdata_file(name)], min_slices=1, modalities=())
    np.testing.assert_array_equal(got.hu, want.hu)


def test_mr_refused_as_ct() -> None:
    with pytest.raises(SeriesError, match="modality MR.*needs CT"):
        load_ct_series([get_testdata_file("MR_small.dcm")], min_slices=1)


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm"])
def test_non_image_dicom_refused(name: str) -> None:
    with pytest.raises(SeriesError, match="no pixel data|modality"):
        load_ct_series([get_testdata_file(name)], min_slices=1, modalities=())


def test_colour_refused(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match="colour|ImagePositionPatient"):
        load_ct_series([get_testdata_file("SC_rgb_small_odd.dcm")], min_slices=1, modalities=())


def test_not_dicom_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(SeriesError, match="notes.txt: not a DICOM file"):
        load_ct_series([text], min_slices=1)


def test_real_jpeg_extended_bitstream_in_ct(tmp_path: Path) -> None:
    """A real 12-bit JPEG Extended bitstream (pydicom's JPGExtended.dcm) given CT geometry decodes via pydicom."""
    src = pydicom.dcmread(get_testdata_file("JPGExtended.dcm"))
    src.Modality, src.SOPClassUID = "CT", CTImageStorage
    src.file_meta.MediaStorageSOPClassUID = CTImageStorage
    src.ImagePositionPatient, src.ImageOrientationPatient, src.PixelSpacing = [0, 0, 0], list(AXIAL), [1, 1]
    src.SeriesInstanceUID = generate_uid()
    path = tmp_path / "jpeg.dcm"
    src.save_as(path)
    vol = load_ct_series([path], min_slices=1)
    np.testing.assert_array_equal(vol.hu[0], _reference(get_testdata_file("JPGExtended.dcm")))


# ---------------------------------------------------------------------------------------------- phantom series


def test_roundtrip_and_int16(tmp_path: Path, hu: np.ndarray) -> None:
    paths = write_series(tmp_path / "s", hu)
    vol = load_ct_series(paths)
    assert vol.hu.dtype == np.int16
    np.testing.assert_array_equal(vol.hu, hu)
    assert vol.spacing_mm == pytest.approx((2.5, 0.8, 0.8))
    np.testing.assert_allclose(vol.direction, np.eye(3)[[2, 1, 0]])
    assert not vol.warnings and not vol.resampled
    assert len(vol.datasets) == hu.shape[0] and all("PixelData" not in ds for ds in vol.datasets)


def test_shuffled_order_and_reversed_positions(tmp_path: Path, hu: np.ndarray) -> None:
    paths = write_series(tmp_path / "s", hu)
    rng = np.random.default_rng(3)
    vol = load_ct_series([paths[i] for i in rng.permutation(len(paths))], workers=3)
    np.testing.assert_array_equal(vol.hu, hu)
    assert [int(ds.InstanceNumber) for ds in vol.datasets] == list(range(1, hu.shape[0] + 1))


def test_feet_first_normal_sorts_along_normal(tmp_path: Path, hu: np.ndarray) -> None:
    """Rows flipped: the normal points to the feet, slices are still stacked along it consistently."""
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    vol = load_ct_series(write_series(tmp_path / "s", hu, orientation=flipped))
    np.testing.assert_array_equal(vol.hu, hu)
    assert vol.direction[0] == pytest.approx([0, 0, -1])


def test_single_missing_slice_is_interpolated(tmp_path: Path, hu: np.ndarray) -> None:
    paths = write_series(tmp_path / "s", hu)
    vol = load_ct_series(paths[:10] + paths[11:])
    assert vol.resampled and vol.hu.shape == hu.shape
    assert any("gap" in w and "interpolated" in w for w in vol.warnings)
    np.testing.assert_allclose(vol.hu[10], (hu[9].astype(np.float32) + hu[11]) / 2, atol=1e-3)
    np.testing.assert_array_equal(vol.hu[:10], hu[:10])
    # masks go back onto the 23 source slices: slice 10 of the volume has no source image
    assert list(vol.source_slice_indices()) == [i for i in range(24) if i != 10]


def test_large_gap_is_refused_with_position(tmp_path: Path, hu: np.ndarray) -> None:
    paths = write_series(tmp_path / "s", hu)
    with pytest.raises(SeriesError) as err:
        load_ct_series(paths[:8] + paths[11:])
    msg = str(err.value)
    assert "10.0 mm gap" in msg and "slices 8 and 9" in msg and "2.50 mm" in msg and "about 3 slice(s) missing" in msg


def test_variable_spacing_is_resampled(tmp_path: Path, hu: np.ndarray) -> None:
    def edit(ds: Dataset, k: int) -> None:
        z = 100 + (2.0 * k if k < 12 else 22 + 3.0 * (k - 11))
        ds.ImagePositionPatient = [-12.0, -15.0, z]

    vol = load_ct_series(write_series(tmp_path / "s", hu, edit=edit))
    assert vol.resampled and any("spacing varies from 2.00 to 3.00 mm" in w for w in vol.warnings)
    assert vol.spacing_mm[0] == pytest.approx((22 + 3 * 12) / (vol.hu.shape[0] - 1))
    np.testing.assert_allclose(vol.hu[0], hu[0])
    np.testing.assert_allclose(vol.hu[-1], hu[-1])


def test_small_jitter_is_uniform(tmp_path: Path, hu: np.ndarray) -> None:
    def edit(ds: Dataset, k: int) -> None:
        ds.ImagePositionPatient = [-12.0, -15.0, 100 + 2.5 * k + (0.1 if k % 2 else -0.1)]

    vol = load_ct_series(write_series(tmp_path / "s", hu, edit=edit))
    assert not vol.resampled and not vol.warnings


def test_duplicate_file_kept_once(tmp_path: Path, hu: np.ndarray) -> None:
    paths = write_series(tmp_path / "s", hu)
    copy = tmp_path / "copy.dcm"
    shutil.copy(paths[5], copy)
    vol = load_ct_series([*paths, copy])
    np.testing.assert_array_equal(vol.hu, hu)
    assert any("duplicate" in w for w in vol.warnings)


def test_two_images_at_one_position_refused(tmp_path: Path, hu: np.ndarray) -> None:
    uid = generate_uid()
    paths = write_series(tmp_path / "a", hu, series_uid=uid, study_uid="1.2.3")
    other = write_series(tmp_path / "b", hu[:1] + 5, series_uid=uid, study_uid="1.2.3")
    with pytest.raises(SeriesError, match="two different images at the same position 100.00 mm"):
        load_ct_series([*paths, *other])


def test_mixed_orientation_refused(tmp_path: Path, hu: np.ndarray) -> None:
    uid = generate_uid()
    a = write_series(tmp_path / "a", hu[:2], series_uid=uid)
    b = write_series(tmp_path / "b", hu[:1], series_uid=uid, orientation=(1, 0, 0, 0, 0, -1))
    with pytest.raises(SeriesError) as err:
        load_ct_series([*a, *b])
    assert "3 slices with 2 different orientations" in str(err.value)
    assert "need at least 20 parallel slices" in str(err.value)


def test_stray_localizers_dropped(tmp_path: Path, hu: np.ndarray) -> None:
    uid = generate_uid()
    main = write_series(tmp_path / "a", hu, series_uid=uid)
    scouts = write_series(tmp_path / "b", hu[:2, :, :], series_uid=uid, orientation=(1, 0, 0, 0, 0, -1))
    vol = load_ct_series([*scouts, *main])
    np.testing.assert_array_equal(vol.hu, hu)
    assert any("dropped 2 image(s) with another orientation" in w for w in vol.warnings)


def test_too_few_slices(tmp_path: Path, hu: np.ndarray) -> None:
    with pytest.raises(SeriesError, match="only 5 distinct slice position.*at least 20"):
        load_ct_series(write_series(tmp_path / "s", hu[:5]))


def test_two_series_refused(tmp_path: Path, hu: np.ndarray) -> None:
    a = write_series(tmp_path / "a", hu)
    b = write_series(tmp_path / "b", hu)
    with pytest.raises(SeriesError, match="2 different series"):
        load_ct_series([*a, *b])


def test_matrix_size_mismatch_refused(tmp_path: Path, hu: np.ndarray) -> None:
    uid = generate_uid()
    a = write_series(tmp_path / "a", hu, series_uid=uid)
    b = write_series(tmp_path / "b", np.zeros((1, 16, 16), np.int16), series_uid=uid, origin=(-12.0, -15.0, 300.0))
    with pytest.raises(SeriesError, match="different sizes"):
        load_ct_series([*a, *b])


def test_missing_geometry_refused(tmp_path: Path, hu: np.ndarray) -> None:
    def edit(ds: Dataset, k: int) -> None:
        if k == 3:
            del ds.ImagePositionPatient

    with pytest.raises(SeriesError, match="IM0003.dcm: no ImagePositionPatient"):
        load_ct_series(write_series(tmp_path / "s", hu, edit=edit))


def test_rescale_differs_per_slice(tmp_path: Path, hu: np.ndarray) -> None:
    def edit(ds: Dataset, k: int) -> None:
        slope, intercept = (0.5, -2048.0) if k % 2 else (1.0, -1024.0)
        raw = np.rint((hu[k].astype(np.float64) - intercept) / slope).astype("<u2")
        ds.RescaleSlope, ds.RescaleIntercept, ds.BitsStored, ds.HighBit = slope, intercept, 16, 15
        ds.PixelData = raw.tobytes()

    vol = load_ct_series(write_series(tmp_path / "s", hu, edit=edit))
    assert vol.hu.dtype == np.float32
    np.testing.assert_allclose(vol.hu, hu, atol=0.5)


def test_signed_pixels_and_high_bit_garbage(tmp_path: Path, hu: np.ndarray) -> None:
    """Signed 12-bit stored values with junk in the unused high bits (an overlay) still give the right HU."""
    def edit(ds: Dataset, k: int) -> None:
        raw = hu[k].astype(np.int16)  # intercept 0: stored value == HU, negative values need the sign bit
        junk = (raw.view(np.uint16) & 0x0FFF) | (0xA000 if k % 2 else 0)
        ds.PixelRepresentation, ds.RescaleIntercept = 1, 0
        ds.PixelData = junk.astype("<u2").tobytes()

    vol = load_ct_series(write_series(tmp_path / "s", hu, edit=edit))
    np.testing.assert_array_equal(vol.hu, hu)


def test_padding_becomes_air(tmp_path: Path, hu: np.ndarray) -> None:
    def edit(ds: Dataset, k: int) -> None:
        raw = np.frombuffer(ds.PixelData, dtype="<u2").reshape(hu.shape[1:]).copy()
        raw[:4, :] = 4095  # outside the reconstruction circle, marked as padding
        ds.PixelData = raw.tobytes()
        ds.PixelPaddingValue = 4095

    vol = load_ct_series(write_series(tmp_path / "s", hu, edit=edit))
    assert (vol.hu[:, :4, :] == -1024).all()
    np.testing.assert_array_equal(vol.hu[:, 4:, :], hu[:, 4:, :])


def test_gantry_tilt_warns_and_loads(tmp_path: Path, hu: np.ndarray) -> None:
    tilt = np.radians(15)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(np.sin(tilt)))

    def edit(ds: Dataset, k: int) -> None:
        ds.GantryDetectorTilt = 15
        ds.ImagePositionPatient = [-12.0, -15.0, 100.0 + 2.5 * k]  # table moves along z: sheared stack

    vol = load_ct_series(write_series(tmp_path / "s", hu, orientation=orientation, edit=edit))
    assert vol.hu.shape == hu.shape
    assert any("gantry tilt 15 degrees" in w and "15.0 degrees" in w for w in vol.warnings)
    assert vol.spacing_mm[0] == pytest.approx(2.5 * np.cos(tilt), rel=1e-3)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless, ImplicitVRLittleEndian])
def test_compressed_series_equal_uncompressed(tmp_path: Path, hu: np.ndarray, syntax: str) -> None:
    vol = load_ct_series(write_series(tmp_path / "s", hu, syntax=syntax))
    np.testing.assert_array_equal(vol.hu, hu)


@pytest.mark.parametrize("option", ["+e1", "+ee"])
def test_dcmtk_jpeg_series(tmp_path: Path, hu: np.ndarray, option: str) -> None:
    """JPEG lossless SV1 and 12-bit JPEG extended written by dcmtk's dcmcjpeg (another toolkit's encoder)."""
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk dcmcjpeg not installed")
    paths = write_series(tmp_path / "raw", hu)
    out = []
    for p in paths:
        target = tmp_path / "jpeg" / p.name
        target.parent.mkdir(exist_ok=True)
        subprocess.run(["dcmcjpeg", option, str(p), str(target)], check=True, capture_output=True)
        out.append(target)
    assert pydicom.dcmread(out[0]).file_meta.TransferSyntaxUID.is_compressed
    vol = load_ct_series(out)
    if option == "+e1":
        np.testing.assert_array_equal(vol.hu, hu)
    else:
        assert np.abs(vol.hu.astype(np.float32) - hu).mean() < 5.0  # lossy, but close


def test_enhanced_multiframe_equals_single_frames(tmp_path: Path, hu: np.ndarray) -> None:
    """A real Legacy Converted Enhanced CT object (highdicom) loads as the same volume, frames in any order."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    paths = write_series(tmp_path / "s", hu, study_uid=generate_uid())
    singles = [pydicom.dcmread(p) for p in paths]
    rng = np.random.default_rng(1)
    enhanced = LegacyConvertedEnhancedCTImage([singles[i] for i in rng.permutation(len(singles))], generate_uid(), 2,
                                              generate_uid(), 1)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    assert int(pydicom.dcmread(path).NumberOfFrames) == hu.shape[0]
    vol = load_ct_series([path])
    np.testing.assert_array_equal(vol.hu, hu)
    assert len(vol.datasets) == 1 and sorted(s.frame for s in vol.slices) == list(range(hu.shape[0]))
    assert vol.spacing_mm == pytest.approx((2.5, 0.8, 0.8))


def test_enhanced_multiframe_compressed(tmp_path: Path, hu: np.ndarray) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    singles = [pydicom.dcmread(p) for p in write_series(tmp_path / "s", hu[:20])]
    enhanced = LegacyConvertedEnhancedCTImage(singles, generate_uid(), 2, generate_uid(), 1,
                                              transfer_syntax_uid=RLELossless)
    path = tmp_path / "enhanced_rle.dcm"
    enhanced.save_as(path)
    vol = load_ct_series([path])
    np.testing.assert_array_equal(vol.hu, hu[:20])


def test_coronal_series_reoriented_to_lps(tmp_path: Path) -> None:
    """A coronal acquisition of a volume loads and reorients onto the same LPS array as an axial one."""
    lps = phantom_hu((20, 24, 28))  # (z: feet->head, y: anterior->posterior, x: right->left)
    coronal = np.ascontiguousarray(np.transpose(lps, (1, 0, 2))[:, ::-1, :])  # slices along y, rows head->feet
    paths = write_series(tmp_path / "c", coronal, spacing=(1.5, 2.0, 1.0), origin=(0.0, 0.0, 40.0),
                         orientation=(1, 0, 0, 0, 0, -1))
    vol = load_ct_series(paths)
    grid = Grid.make(vol.hu.shape, vol.spacing_mm, vol.origin, vol.direction)
    reo, canon, oblique = canonical_orientation(grid)
    np.testing.assert_array_equal(reo.apply(vol.hu), lps)
    np.testing.assert_array_equal(reo.invert(reo.apply(vol.hu)), vol.hu)
    assert canon.spacing == pytest.approx((2.0, 1.5, 1.0)) and oblique == pytest.approx(0.0)
    assert canon.origin == pytest.approx((0.0, 0.0, 40.0 - 2.0 * 19))


# ---------------------------------------------------------------------------------------------- the header walk


def test_plain_series_never_build_a_pydicom_dataset_while_loading(tmp_path: Path, hu: np.ndarray,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The speed of loading rests on the walk: a plain series must load without pydicom parsing a header,
    and the full headers come later, only for the slices asked for."""
    from edgescreen.appliance.pipeline import ctload

    paths = write_series(tmp_path / "s", hu)
    calls: list[str] = []
    real = ctload.pydicom.dcmread

    def counting(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ctload.pydicom, "dcmread", counting)
    vol = load_ct_series(paths)
    assert calls == []
    np.testing.assert_array_equal(vol.hu, hu)
    monkeypatch.undo()
    assert vol.sop_instance_uids == [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    monkeypatch.setattr(ctload.pydicom, "dcmread", counting)
    assert int(vol.datasets[3].InstanceNumber) == 4 and calls == ["IM0003.dcm"]  # parsed on first use, once
    assert vol.datasets[3] is vol.datasets[3] and "PixelData" not in vol.datasets[3]


def _walked_equals_pydicom(path: Path) -> None:
    from edgescreen.appliance.pipeline import ctload

    walked = ctload._walk(path)
    assert walked is not None, f"{path.name} went to pydicom"
    ds = pydicom.dcmread(path)
    for keyword in ("SOPInstanceUID", "Rows", "Columns", "BitsStored", "PixelRepresentation", "RescaleIntercept",
                    "PixelPaddingValue"):
        if keyword in ds:
            assert walked.get(keyword) == ds[keyword].value, keyword
    assert [float(v) for v in walked.ImagePositionPatient] == [float(v) for v in ds.ImagePositionPatient]
    assert walked.pixel_offset == pydicom.dcmread(path, defer_size=1).get_item(0x7FE00010, keep_deferred=True).value_tell


def test_the_walk_reads_what_pydicom_reads(tmp_path: Path, hu: np.ndarray) -> None:
    """Implicit VR, a signed padding value, an undefined-length sequence (nested items, both lengths) and a
    value of VR UN before the pixel data: the walk skips or decodes each as pydicom does."""
    from pydicom.sequence import Sequence as Seq

    def edit(ds: Dataset, k: int) -> None:
        inner = Dataset()
        inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D0050", "SRT", "Tissue"
        outer = Dataset()
        outer.AnatomicRegionSequence = Seq([inner])
        ds.ReferencedImageSequence = Seq([outer, Dataset()])
        ds.PixelRepresentation = 1
        ds.PixelPaddingValue = -2000
        ds.PixelData = np.where(hu[k] < -900, -2000, hu[k] + 1024).astype("<i2").tobytes()

    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        paths = write_series(tmp_path / syntax[-1], hu[:3], syntax=syntax, edit=edit)
        for p in paths:
            raw = pydicom.dcmread(p)
            if syntax == ExplicitVRLittleEndian:  # undefined lengths: rewrite so the sequence has no length
                raw["ReferencedImageSequence"].is_undefined_length = True
                for item in raw.ReferencedImageSequence:
                    item.is_undefined_length_sequence_item = True
                raw.save_as(p)
                assert bytes.fromhex("08004011535100" "00ffffffff") in p.read_bytes()  # really undefined
            _walked_equals_pydicom(p)


def test_anything_the_walk_cannot_read_goes_to_pydicom(tmp_path: Path, hu: np.ndarray) -> None:
    from edgescreen.appliance.pipeline import ctload

    plain = write_series(tmp_path / "p", hu[:1])[0]
    data = plain.read_bytes()
    no_preamble = tmp_path / "nopreamble.dcm"
    no_preamble.write_bytes(data[132:])
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:600])
    compressed = write_series(tmp_path / "r", hu[:1], syntax=RLELossless)[0]
    assert ctload._walk(plain) is not None
    assert all(ctload._walk(p) is None for p in (no_preamble, truncated, compressed))
