"""De-identification for the cloud (PS3.15 Annex E basic profile + site options) on the SEG and SR that the
pipeline really writes, for a study whose headers carry a full set of identifiers and private tags."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from edgescreen.appliance.pipeline.analyze import AnalysisRequest, AnalysisSettings, analyze_study
from edgescreen.appliance.sync.deid import Deidentifier, DeidError, DeidPolicy, load_secret
from edgescreen.appliance.sync.summary import finding_summary
from tests.test_pancreas_pipeline import write_study, write_test_models

PHI = {"PatientName": "DOE^JANE^Q", "PatientID": "MRN-48213977", "PatientBirthDate": "19570412",
       "AccessionNumber": "ACC99812377", "OtherPatientIDs": "OTHER-5521", "InstitutionName": "St Example Clinic",
       "ReferringPhysicianName": "HOUSE^GREGORY", "StationName": "CTSTATION7", "DeviceSerialNumber": "SN-77120",
       "PatientSex": "F", "PatientAge": "067Y", "StudyDate": "20240311", "StudyDescription": "CT ABD JANE DOE"}
SECRET = b"a" * 64


def _identify(folder: Path) -> list[Path]:
    """Put a full set of identifiers and private tags (top level and nested) into every slice."""
    files = sorted(folder.glob("*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        block = ds.private_block(0x0029, "ACME SCANNER", create=True)
        block.add_new(0x10, "LO", "DOE JANE private copy")
        item = Dataset()
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        item.add_new(0x00091001, "LO", "nested private MRN-48213977")
        ds.ReferencedImageSequence = Sequence([item])
        ds.save_as(path)
    return files


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("deid")
    models = write_test_models(root / "models")
    write_study(root / "ct")
    files = _identify(root / "ct")
    findings = analyze_study(AnalysisRequest([root / "ct"], root / "out", models_dir=models,
                                             settings=AnalysisSettings(require_dicom_outputs=True)))
    return {"root": root, "ct": files, "findings": findings, "seg": root / "out" / "seg.dcm",
            "sr": root / "out" / "sr.dcm"}


def _strings(ds: Dataset) -> list[str]:
    out: list[str] = []

    def collect(_ds: Dataset, elem) -> None:  # noqa: ANN001
        if elem.VR in ("SQ", "OB", "OW", "OF", "UN"):
            return
        values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) else [elem.value]
        out.extend(str(v) for v in values)

    ds.walk(collect)
    ds.file_meta.walk(collect)
    return out


def _forbidden(analysed: dict) -> list[str]:
    src = pydicom.dcmread(analysed["ct"][0])
    uids = [src.StudyInstanceUID, src.SeriesInstanceUID, *(str(pydicom.dcmread(f).SOPInstanceUID)
                                                           for f in analysed["ct"])]
    return [PHI["PatientName"], "DOE^JANE", PHI["PatientID"], PHI["PatientBirthDate"], PHI["AccessionNumber"],
            PHI["OtherPatientIDs"], "St Example Clinic", "HOUSE^GREGORY", "JANE DOE", *uids]


@pytest.mark.parametrize("name", ["seg", "sr"])
def test_pipeline_outputs_leave_without_identity(analysed: dict, name: str) -> None:
    source = pydicom.dcmread(analysed[name])
    assert str(source.PatientName) == PHI["PatientName"], "the pipeline copies the patient into its outputs"
    deid = Deidentifier(DeidPolicy(SECRET))
    encoded = deid.encode(source)
    result = pydicom.dcmread(__import__("io").BytesIO(encoded))
    values = "\n".join(_strings(result))
    for needle in _forbidden(analysed):
        assert needle not in values, f"{needle} survived in an element"
        assert needle.encode() not in encoded, f"{needle} survived in the file's bytes"
    assert result.PatientIdentityRemoved == "YES"
    codes = {c.CodeValue for c in result.DeidentificationMethodCodeSequence}
    assert {"113100", "113104"} <= codes and "113107" not in codes
    assert all(c.CodingSchemeDesignator == "DCM" for c in result.DeidentificationMethodCodeSequence)
    assert any("Basic Profile" in m for m in result.DeidentificationMethod)
    assert not [e for e in result.iterall() if e.tag.is_private]
    for keyword in ("PatientSex", "PatientAge", "StationName", "DeviceSerialNumber"):  # removed, emptied or dummy
        assert str(result.get(keyword, "")) in ("", "ANONYMIZED"), keyword
    assert str(result.SeriesDescription).startswith("RESEARCH USE ONLY"), "the research banner stays"
    assert result.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID
    if name == "sr":  # Clean Structured Content: the findings survive, de-identified
        assert len(result.ContentSequence) == len(source.ContentSequence) > 3


def test_uids_map_consistently_per_site_secret_and_references_still_resolve(analysed: dict) -> None:
    seg = pydicom.dcmread(analysed["seg"])
    a, b, other = (Deidentifier(DeidPolicy(SECRET)), Deidentifier(DeidPolicy(SECRET)),
                   Deidentifier(DeidPolicy(b"b" * 64)))
    one, two, three = a.dataset(seg), b.dataset(seg), other.dataset(seg)
    assert one.StudyInstanceUID == two.StudyInstanceUID == a.uid(seg.StudyInstanceUID)
    assert one.SOPInstanceUID == two.SOPInstanceUID and one.PatientID == two.PatientID
    assert three.StudyInstanceUID != one.StudyInstanceUID and three.PatientID != one.PatientID
    assert one.StudyInstanceUID.startswith("2.25.") and len(one.StudyInstanceUID) <= 64
    # the SEG's references point at the de-identified CT images (same mapping), so the cloud can join them
    ct_uids = {a.dataset(pydicom.dcmread(f)).SOPInstanceUID for f in analysed["ct"]}
    referenced = {str(e.value) for e in one.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert referenced and referenced <= ct_uids
    sr = a.dataset(pydicom.dcmread(analysed["sr"]))
    sr_refs = {str(e.value) for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert one.SOPInstanceUID in sr_refs, "the SR still references the de-identified SEG"
    assert sr.StudyInstanceUID == one.StudyInstanceUID


def test_the_source_image_with_nested_private_tags(analysed: dict) -> None:
    src = pydicom.dcmread(analysed["ct"][0])
    result = Deidentifier(DeidPolicy(SECRET)).dataset(src)
    assert not [e for e in result.iterall() if e.tag.is_private]
    assert result.ReferencedImageSequence[0].ReferencedSOPInstanceUID == result.SOPInstanceUID
    assert "StudyDescription" not in result, "free text that names the patient is removed"
    assert str(result.get("InstitutionName", "")) in ("", "ANONYMIZED")
    assert str(pydicom.dcmread(analysed["ct"][0]).PatientName) == PHI["PatientName"], "the source is untouched"


def test_site_options(analysed: dict) -> None:
    files = analysed["ct"][:2]
    a, b = (pydicom.dcmread(f) for f in files)
    b.StudyDate = "20240401"  # a later study of the same patient: 21 days after the first
    policy = DeidPolicy(SECRET, retain_dates_shifted=True, retain_device_identity=True,
                        retain_patient_characteristics=True)
    deid = Deidentifier(policy)
    one, two = deid.dataset(a), deid.dataset(b)
    import datetime as dt

    day = lambda v: dt.datetime.strptime(str(v), "%Y%m%d")  # noqa: E731
    assert one.StudyDate != PHI["StudyDate"] and (day(two.StudyDate) - day(one.StudyDate)).days == 21
    assert 30 <= (day(PHI["StudyDate"]) - day(one.StudyDate)).days <= 730
    assert one.PatientSex == "F" and one.PatientAge == "067Y"
    assert one.StationName == PHI["StationName"] and one.DeviceSerialNumber == PHI["DeviceSerialNumber"]
    assert str(one.get("PatientBirthDate", "")) != PHI["PatientBirthDate"], "a birth date is never kept"
    codes = {c.CodeValue for c in one.DeidentificationMethodCodeSequence}
    assert {"113100", "113107", "113108", "113109"} <= codes
    assert one.LongitudinalTemporalInformationModified == "MODIFIED"
    plain = Deidentifier(DeidPolicy(SECRET)).dataset(a)
    assert plain.get("StudyDate", "") in ("", "19000101") and plain.LongitudinalTemporalInformationModified == "REMOVED"


def test_an_identifier_the_profile_does_not_cover_is_refused(analysed: dict) -> None:
    ds = pydicom.dcmread(analysed["ct"][0])
    ds.ManufacturerModelName = PHI["PatientID"]  # kept by the profile: the last check must catch it
    with pytest.raises(DeidError, match="ManufacturerModelName"):
        Deidentifier(DeidPolicy(SECRET)).dataset(ds)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed (apt install dicom3tools)")
@pytest.mark.parametrize("name", ["seg", "sr"])
def test_deidentified_outputs_still_validate(analysed: dict, name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.dcm"
    out.write_bytes(Deidentifier(DeidPolicy(SECRET)).encode(pydicom.dcmread(analysed[name])))
    proc = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_the_site_secret_is_made_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sync" / "deid-secret"
    first = load_secret(path)
    assert len(first) == 64 and oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert load_secret(path) == first
    path.write_text("short\n")
    with pytest.raises(DeidError, match="too short"):
        load_secret(path)


def test_finding_summary_keeps_the_verdict_and_drops_identity(analysed: dict) -> None:
    findings = analysed["findings"]
    deid = Deidentifier(DeidPolicy(SECRET))
    summary = finding_summary(findings, deid, forbidden=_forbidden(analysed))
    text = __import__("json").dumps(summary)
    assert summary["triage"] == findings["triage"] and len(summary["lesions"]) == len(findings["lesions"])
    assert summary["study"] == deid.uid(findings["study_uid"]) and findings["study_uid"] not in text
    assert "outputs" not in summary and "warnings" not in summary and "created_at" not in summary
    assert summary["disclaimer"].startswith("RESEARCH USE ONLY")
    with pytest.raises(DeidError):
        finding_summary({**findings, "bundle": PHI["PatientID"]}, deid, forbidden=[PHI["PatientID"]])


def _gate_report_quoting(description: str, kernel: str) -> dict:
    """What the real domain gate writes for a CT whose headers it quotes: a contrast phase read from the study
    description (flagged) and a kernel name it does not know (not checked)."""
    from edgescreen.appliance.modelcard import Domain
    from edgescreen.appliance.pipeline.domain.attributes import check_ct
    from edgescreen.appliance.pipeline.domain.verdict import DomainReport

    ds = Dataset()
    ds.Modality, ds.StudyDescription, ds.ConvolutionKernel = "CT", description, kernel
    report = DomainReport()
    check_ct(Domain(modality=["CT"], contrast_phase=["non_contrast"], kernel_family=["soft"], source="test"), ds,
             (3.0, 0.8, 0.8), report)
    doc = report.to_json()
    assert description in " ".join(doc["reasons"]) and kernel in " ".join(doc["checks"].values()), doc
    return doc


def test_sr_text_that_quotes_a_header_leaves_without_it(analysed: dict) -> None:
    """The SR's domain-reason TEXT items quote the StudyDescription (free text, Annex E "X"): what they quote is
    removed; the sentence and the rest of the SR stay."""
    reasons = _gate_report_quoting("CT ABD ARTERIAL JANE DOE", "ZZQ91")["reasons"]
    reason = next(r for r in reasons if r.startswith("contrast phase"))
    sr = pydicom.dcmread(analysed["sr"])
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", reason
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121106", "DCM", "Comment"
    item.ConceptNameCodeSequence = Sequence([code])
    sr.ContentSequence.append(item)
    encoded = Deidentifier(DeidPolicy(SECRET)).encode(sr)
    result = pydicom.dcmread(__import__("io").BytesIO(encoded))
    texts = [str(e.value) for e in result.iterall() if e.keyword == "TextValue"]
    assert b"JANE" not in encoded and b"CT ABD ARTERIAL" not in encoded
    assert any(t.startswith("contrast phase arterial (description '<removed>')") for t in texts), texts
    assert any(t.startswith("RESEARCH USE ONLY") for t in texts), "our own sentences are kept"


def test_the_summarys_domain_verdict_keeps_no_header_text(analysed: dict) -> None:
    findings = {**analysed["findings"], "domain": _gate_report_quoting("ABDOMEN ARTERIAL HOUSE^GREGORY", "ZZQ91 ACC991")}
    deid = Deidentifier(DeidPolicy(SECRET))
    summary = finding_summary(findings, deid, forbidden=_forbidden(analysed))
    text = __import__("json").dumps(summary)
    assert "GREGORY" not in text and "ACC991" not in text and "ABDOMEN ARTERIAL" not in text
    assert summary["domain"]["in_domain"] is False and summary["domain"]["checks"]["dicom"] == "flagged"
    assert any(r.startswith("contrast phase arterial (description '<removed>')") for r in summary["domain"]["reasons"])
    assert set(summary["domain"]["checks"].values()) <= {"passed", "flagged", "not checked"}


def test_an_id_inside_a_number_is_not_a_leak_but_as_a_word_it_is(analysed: dict) -> None:
    """The last check matches identifiers as whole tokens: an MRN 48213977 is not 'found' inside a probability
    0.4821397712 (that would hold back a real finding), but the ID written as a word is refused."""
    deid = Deidentifier(DeidPolicy(SECRET))
    findings = {**analysed["findings"], "abnormal_probability": 0.4821397712}
    assert finding_summary(findings, deid, forbidden=["48213977"])["abnormal_probability"] == 0.4821397712
    with pytest.raises(DeidError):
        finding_summary({**findings, "bundle": "bundle-48213977"}, deid, forbidden=["48213977"])


def test_a_uid_hidden_in_binary_data_is_still_found(analysed: dict) -> None:
    """The last check reads the encoded bytes too: a source UID inside a binary value (which no element check
    reads), even with digits right against it, holds the item back."""
    ds = pydicom.dcmread(analysed["ct"][0])
    ds.ICCProfile = b"\x00\x319" + str(ds.StudyInstanceUID).encode() + b"7.\x00"
    with pytest.raises(DeidError, match="bytes containing"):
        Deidentifier(DeidPolicy(SECRET)).dataset(ds)
