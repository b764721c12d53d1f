"""The mammography pipeline and `predict-mammo` on real mini-MIAS images, as PNG and as DICOM.

DICOM variants are built here from one PNG so each property is checked against the same pixels:
MONOCHROME1 storage, a horizontally flipped breast, a compressed transfer syntax, a view given only as
a code, a VOI window. The mini-MIAS folder is read in place (never copied into the repository).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgescreen.appliance import RESEARCH_USE_BANNER
from edgescreen.appliance.cli import predict_mammo
from edgescreen.appliance.modelcard import load_card
from edgescreen.appliance.pipeline import mammo as pipeline
from tests.conftest import minimias_dir, requires_minimias

MIAS = minimias_dir() or Path("/nonexistent")
NORMAL, ABNORMAL = "mdb003", "mdb005"  # patient 2 (normal) and patient 3 (benign mass, left breast)

pytestmark = requires_minimias


@pytest.fixture(scope="module")
def model():
    return pipeline.load_session(pipeline.DEFAULT_CARD)


def png(name: str) -> Path:
    return MIAS / f"{name}.png"


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", laterality: str | None = "L",
                view: str | None = "MLO", view_code: tuple[str, str] | None = None, window: tuple[float, float] | None = None,
                transfer_syntax: str | None = None) -> Path:
    """A minimal For Presentation digital mammogram around the given 16-bit pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DigitalMammographyXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientName, ds.PatientID = "Test^Mammo", "T1"
    if laterality:
        ds.ImageLaterality = laterality
    if view:
        ds.ViewPosition = view
    if view_code:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = view_code[0], "SCT", view_code[1]
        ds.ViewCodeSequence = [item]
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    if transfer_syntax:
        ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def mias_12bit(name: str) -> np.ndarray:
    """The 8-bit PNG stretched to 12 bits, as a digital detector would store it."""
    return np.asarray(Image.open(png(name)), dtype=np.uint16) * 16


def score(path: Path, model) -> pipeline.MammoImageResult:
    card, session = model
    return pipeline.infer_image(pipeline.read_mammogram(path), card, session, path)


def test_png_scores_are_probabilities_and_the_heatmap_maps_back(model) -> None:
    result = score(png(ABNORMAL), model)
    assert 0.0 <= result.abnormal_probability <= 1.0 and 0.0 <= result.malignant_probability <= 1.0
    assert result.heatmap.shape == (1024, 1024) and result.heatmap.dtype == np.float32
    assert 0.0 <= result.heatmap.min() <= result.heatmap.max() <= 1.0
    assert result.laterality_source == "image" and result.view == "unknown"


def test_dicom_monochrome1_scores_like_monochrome2(model, tmp_path: Path) -> None:
    pixels = mias_12bit(ABNORMAL)
    mono2 = score(write_dicom(tmp_path / "m2.dcm", pixels), model)
    mono1 = score(write_dicom(tmp_path / "m1.dcm", 4095 - pixels, photometric="MONOCHROME1"), model)
    from_png = score(png(ABNORMAL), model)
    assert mono1.abnormal_probability == pytest.approx(mono2.abnormal_probability, abs=1e-5)
    assert mono1.malignant_probability == pytest.approx(mono2.malignant_probability, abs=1e-5)
    assert mono2.abnormal_probability == pytest.approx(from_png.abnormal_probability, abs=1e-4)
    assert (mono2.laterality, mono2.view, mono2.laterality_source) == ("L", "MLO", "dicom")


def test_flipped_breast_scores_the_same_and_its_heatmap_is_mirrored(model, tmp_path: Path) -> None:
    pixels = mias_12bit(ABNORMAL)
    plain = score(write_dicom(tmp_path / "a.dcm", pixels), model)
    flipped = score(write_dicom(tmp_path / "b.dcm", pixels[:, ::-1], laterality="R"), model)
    assert plain.flipped != flipped.flipped
    assert flipped.abnormal_probability == pytest.approx(plain.abnormal_probability, abs=1e-4)
    assert flipped.malignant_probability == pytest.approx(plain.malignant_probability, abs=1e-4)
    np.testing.assert_allclose(flipped.heatmap, plain.heatmap[:, ::-1], atol=1e-4)


def test_compressed_dicom_view_code_and_window(model, tmp_path: Path) -> None:
    from pydicom.uid import RLELossless

    pixels = mias_12bit(NORMAL)
    reference = score(write_dicom(tmp_path / "ref.dcm", pixels), model)
    rle = score(write_dicom(tmp_path / "rle.dcm", pixels, view=None, view_code=("399368009", "medio-lateral oblique"),
                            transfer_syntax=RLELossless), model)
    assert rle.view == "MLO"
    assert rle.abnormal_probability == pytest.approx(reference.abnormal_probability, abs=1e-5)
    windowed = score(write_dicom(tmp_path / "win.dcm", pixels, window=(2048.0, 4096.0)), model)
    assert windowed.abnormal_probability == pytest.approx(reference.abnormal_probability, abs=2e-3)


def test_analyze_exam_gives_breast_and_exam_scores(model, tmp_path: Path) -> None:
    card, session = model
    left = write_dicom(tmp_path / "l.dcm", mias_12bit(ABNORMAL), laterality="L")
    right = write_dicom(tmp_path / "r.dcm", mias_12bit("mdb006"), laterality="R")
    result = pipeline.analyze_mammo_images([left, right], session=session)
    assert set(result.breasts) == {"L", "R"}
    assert result.exam_score == max(i.decision_score for i in result.images)
    assert result.breasts == {i.laterality: i.decision_score for i in result.images}
    assert result.triage == ("suspicious" if result.exam_score >= card.decision.threshold else "not_suspicious")
    assert pipeline.analyze_mammo_images([left], session=session, threshold=0.0).triage == "suspicious"
    assert pipeline.analyze_mammo_images([left], session=session, threshold=1.0 + 1e-9).triage == "not_suspicious"


def _card_with_rule(tmp_path: Path, rule: dict | None) -> Path:
    """A copy of the shipped card and model with the given contralateral rule (None: without one)."""
    import shutil

    card = json.loads(pipeline.DEFAULT_CARD.read_text())
    shutil.copy(pipeline.DEFAULT_CARD.parent / card["file"], tmp_path / card["file"])
    card.pop("contralateral", None)
    if rule is not None:
        card["contralateral"] = rule
    path = tmp_path / "mammo.json"
    path.write_text(json.dumps(card))
    return path


def test_exam_reads_each_view_against_the_other_breast(model, tmp_path: Path) -> None:
    """With the card's contralateral rule the decision score of a view is read against the other breast's same
    view and the image says so; a lone view is set against a typical breast and says that; without a rule the
    decision score is the image's own. The exam score and the triage follow the decision scores."""
    _, session = model
    left = write_dicom(tmp_path / "l.dcm", mias_12bit(ABNORMAL), laterality="L")
    right = write_dicom(tmp_path / "r.dcm", mias_12bit("mdb006"), laterality="R")
    lone = write_dicom(tmp_path / "c.dcm", mias_12bit(NORMAL), laterality="L", view="CC")
    rule = {"weight": 0.5, "lone_view_logit": -1.25, "calibration": "test"}
    paired = pipeline.analyze_mammo_images([left, right, lone], card_path=_card_with_rule(tmp_path, rule),
                                           session=session, threshold=0.5)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    l_img, r_img, c_img = paired.images
    assert l_img.decision_score == pytest.approx(sig(logit(l_img.abnormal_probability) - 0.5 * logit(r_img.abnormal_probability)), abs=1e-6)
    assert r_img.decision_score == pytest.approx(sig(logit(r_img.abnormal_probability) - 0.5 * logit(l_img.abnormal_probability)), abs=1e-6)
    assert c_img.decision_score == pytest.approx(sig(logit(c_img.abnormal_probability) + 0.5 * 1.25), abs=1e-6)
    assert any("read against the R MLO" in n for n in l_img.notes)
    assert any("no R CC in this exam" in n for n in c_img.notes)
    assert paired.exam_score == max(i.decision_score for i in paired.images)
    assert paired.triage == ("suspicious" if paired.exam_score >= 0.5 else "not_suspicious")
    sub = tmp_path / "plain"
    sub.mkdir()
    plain = pipeline.analyze_mammo_images([left, right, lone], card_path=_card_with_rule(sub, None), session=session)
    assert [i.decision_score for i in plain.images] == [i.abnormal_probability for i in plain.images]
    assert [i.abnormal_probability for i in plain.images] == [i.abnormal_probability for i in paired.images]
    assert not any("read against" in n for i in plain.images for n in i.notes)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    predict_mammo.add_arguments(parser)
    return predict_mammo.run(parser.parse_args(argv))


def test_predict_mammo_writes_json_with_banner(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.json"
    assert _cli([str(png(NORMAL)), str(png(ABNORMAL)), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert RESEARCH_USE_BANNER in printed and "mdb005" in printed
    payload = json.loads(out.read_text())
    assert payload["banner"] == RESEARCH_USE_BANNER
    assert [Path(r["path"]).name for r in payload["images"]] == ["mdb003.png", "mdb005.png"]
    for row in payload["images"]:
        assert 0.0 <= row["abnormal_probability"] <= 1.0 and 0.0 <= row["malignant_probability"] <= 1.0
        assert row["laterality"] in ("L", "R") and row["view"] == "unknown"


def test_predict_mammo_reports_unreadable_files_and_exits_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    out = tmp_path / "out.json"
    code = _cli([str(bad), str(png(NORMAL)), str(text), str(tmp_path / "missing.png"), "--json", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "broken.dcm" in err and "notes.png" in err and "no such file" in err
    rows = json.loads(out.read_text())["images"]
    assert ["error" in r for r in rows] == [True, False, True, True]
    assert 0.0 <= rows[1]["abnormal_probability"] <= 1.0


def test_unusable_images_are_refused_with_a_reason(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tiny)
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((256, 256), 7, np.uint8)).save(flat)
    card = load_card(pipeline.DEFAULT_CARD)
    with pytest.raises(pipeline.MammoInputError, match="at least"):
        pipeline.prepare_mammogram(pipeline.read_mammogram(tiny).pixels, card.preprocessing)
    with pytest.raises(pipeline.MammoInputError, match="no contrast"):
        pipeline.prepare_mammogram(pipeline.read_mammogram(flat).pixels, card.preprocessing)


def test_for_processing_and_16bit_png_are_read(model, tmp_path: Path) -> None:
    from pydicom import dcmread

    raw = write_dicom(tmp_path / "raw.dcm", 4095 - mias_12bit(NORMAL), photometric="MONOCHROME1")
    ds = dcmread(raw)
    ds.PresentationIntentType = "FOR PROCESSING"
    ds.save_as(raw)
    result = score(raw, model)
    assert any("FOR PROCESSING" in note for note in result.notes)
    assert 0.0 <= result.abnormal_probability <= 1.0
    wide = tmp_path / "wide.png"
    Image.fromarray(mias_12bit(NORMAL).astype(np.uint16)).save(wide)
    assert score(wide, model).abnormal_probability == pytest.approx(score(png(NORMAL), model).abnormal_probability, abs=1e-4)


def test_predict_mammo_without_a_model_exits_2(tmp_path: Path, capsys) -> None:
    assert _cli([str(png(NORMAL)), "--card", str(tmp_path / "missing.json")]) == 2
    assert "cannot load the mammography model" in capsys.readouterr().err
