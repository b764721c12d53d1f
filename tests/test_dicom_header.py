"""The receive path's header reader and rules, against pydicom's own reading of the same bytes."""

from __future__ import annotations

import shutil
import subprocess
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from edgescreen.appliance.dicom import sop
from edgescreen.appliance.dicom.header import (
    Refusal,
    check_instance,
    file_preamble_and_meta,
    parse_dataset,
    split_file,
)
from tests.test_dicom_support import write_ct_series


def encode(ds: Dataset, syntax: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, syntax == ImplicitVRLittleEndian
    if "PixelData" in ds and ds["PixelData"].VR not in ("OB", "OW"):
        ds["PixelData"].VR = "OW"
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = c.compress(raw) + c.flush()
    return raw


@pytest.fixture
def ct(tmp_path: Path) -> Dataset:
    ds = pydicom.dcmread(write_ct_series(tmp_path, 1, size=32)[0])
    ds.add_new(0x00091010, "SQ", [Dataset()])  # a private sequence before the pixels, to be skipped
    ds[0x00091010].value[0].PatientComments = "nested"
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_header_matches_pydicom(ct: Dataset, syntax: str) -> None:
    h = parse_dataset(encode(ct, syntax), syntax)
    assert (h.sop_uid, h.study_uid, h.series_uid, h.modality, h.rows, h.columns, h.instance_number) == \
        (ct.SOPInstanceUID, ct.StudyInstanceUID, ct.SeriesInstanceUID, "CT", 32, 32, 1)
    assert h.patient_name == "TEST^DICOM" and h.body_part == "ABDOMEN" and h.pixel_length == 32 * 32 * 2
    check_instance(h, request_sop_class=ct.SOPClassUID, request_sop_uid=ct.SOPInstanceUID, transfer_syntax=syntax)


def test_header_of_encapsulated_and_testdata_files() -> None:
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_rle.dcm", "JPEG2000.dcm", "image_dfl.dcm"):
        path = get_testdata_file(name)
        ts, raw = split_file(Path(path).read_bytes())
        h = parse_dataset(raw, ts)
        ds = pydicom.dcmread(path)
        assert (h.sop_uid, h.rows, h.columns, h.frames) == \
            (ds.SOPInstanceUID, ds.Rows, ds.Columns, int(ds.get("NumberOfFrames") or 1)), name
        assert h.pixel_complete, name


def test_specific_character_set_is_honoured(ct: Dataset) -> None:
    ct.SpecificCharacterSet = "ISO_IR 192"
    ct.PatientName = "Müller^Jörg"
    assert parse_dataset(encode(ct, ExplicitVRLittleEndian), ExplicitVRLittleEndian).patient_name == "Müller^Jörg"


def _refusal(raw: bytes, syntax: str = ExplicitVRLittleEndian, **rq: str) -> Refusal:
    with pytest.raises(Refusal) as info:
        h = parse_dataset(raw, syntax)
        check_instance(h, request_sop_class=rq.get("sop_class"), request_sop_uid=rq.get("sop_uid"),
                       transfer_syntax=syntax)
    return info.value


def test_rules(ct: Dataset) -> None:
    good = encode(ct, ExplicitVRLittleEndian)
    assert _refusal(good[:len(good) - 100]).status == sop.CANNOT_UNDERSTAND  # truncated pixels
    assert _refusal(good[:150]).status == sop.CANNOT_UNDERSTAND  # truncated header
    assert _refusal(b"\x01\x02garbage" * 50).status == sop.CANNOT_UNDERSTAND
    r = _refusal(good, sop_class=sop.MG_FOR_PRESENTATION)
    assert r.status == sop.DATASET_DOES_NOT_MATCH_SOP_CLASS and "differs from the C-STORE request" in r.reason
    assert "SOP Instance UID" in _refusal(good, sop_uid="1.2.3").reason
    ct.PixelData = b"\0" * 100
    assert "Pixel Data length 100" in _refusal(encode(ct, ExplicitVRLittleEndian)).reason
    del ct.PixelData
    assert "no Pixel Data" in _refusal(encode(ct, ExplicitVRLittleEndian)).reason
    ct.PixelData = b"\0" * 2048
    del ct.SeriesInstanceUID
    assert "missing Series Instance UID" in _refusal(encode(ct, ExplicitVRLittleEndian)).reason


def test_compressed_syntax_needs_encapsulated_pixels(ct: Dataset) -> None:
    assert "not encapsulated" in _refusal(encode(ct, ExplicitVRLittleEndian), RLELossless).reason
    ct.compress(RLELossless)
    raw = encode(ct, ExplicitVRLittleEndian)
    check_instance(parse_dataset(raw, RLELossless), request_sop_class=None, request_sop_uid=None,
                   transfer_syntax=RLELossless)
    assert "truncated inside Pixel Data" in _refusal(raw[:-20], RLELossless).reason


def test_file_meta_makes_a_valid_part10_file(ct: Dataset, tmp_path: Path) -> None:
    raw = encode(ct, ExplicitVRLittleEndian)
    path = tmp_path / "stored.dcm"
    path.write_bytes(file_preamble_and_meta(ct.SOPClassUID, ct.SOPInstanceUID, ExplicitVRLittleEndian, "SCANNER")
                     + raw)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ct.SOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PixelData == ct.PixelData
    if shutil.which("dciodvfy"):  # our file meta must add no error of its own to those of the data set
        source = tmp_path / "source.dcm"
        ct.save_as(source, enforce_file_format=True)

        def errors(p: Path) -> set[str]:
            out = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True)
            return {line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")}

        assert errors(path) <= errors(source)
