"""The shipped mammography model: its card, its ONNX file, its CV record, and training/inference parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgescreen.appliance.modelcard import load_card, model_path, sha256_file
from edgescreen.appliance.pipeline import mammo as pipeline

REPO = Path(__file__).resolve().parent.parent
CARD = REPO / "models" / "mammo.json"
CV = REPO / "models" / "mammo_cv.json"


@pytest.fixture(scope="module")
def card():
    return load_card(CARD)  # validates the schema and checks the sha256 of the ONNX file


def test_card_is_the_default_and_describes_the_contract(card) -> None:
    assert pipeline.DEFAULT_CARD.resolve() == CARD.resolve()
    assert card.role == "mammo"
    assert card.not_for_clinical_use is True
    spec = card.inputs[0]
    assert (spec.name, spec.layout, spec.channels) == ("image", "NCHW", ["mammogram"])
    assert spec.shape[:2] == [1, 1]
    assert card.preprocessing.orientation == "mammo-chest-wall-left"
    assert max(card.preprocessing.input_size_px) >= 512
    assert spec.shape[2:] == card.preprocessing.input_size_px
    scores = card.output("scores")
    assert (scores.kind, scores.activation, scores.classes) == ("classification", "sigmoid", ["abnormal", "malignant"])
    heat = card.output("heatmap")
    assert (heat.kind, heat.classes) == ("heatmap", ["suspicious"])
    assert card.decision is not None and card.decision.class_name == "abnormal"
    assert "mini-MIAS" in card.training_data and "Suckling" in card.training_data
    assert "research" in card.licence.lower() and "research" in card.intended_use.lower()
    assert card.sha256 == sha256_file(model_path(CARD, card))


def test_cv_record_has_the_figures_the_report_reads(card) -> None:
    cv = json.loads(CV.read_text())
    for key in ("auc", "auc_malignant", "sensitivity", "specificity", "accuracy", "threshold"):
        assert 0.0 <= cv[key] <= 1.0, key
        if key != "threshold":
            low, high = cv[f"{key}_ci95"]
            assert 0.0 <= low <= high <= 1.0, key
    assert cv["folds"] == 5 and cv["n_images"] >= 200 and cv["n_patients"] >= 100
    assert cv["threshold"] == pytest.approx(card.decision.threshold, abs=1e-6)
    assert card.metrics["cv_auc_abnormal"] == cv["auc"]


def test_onnx_runs_on_its_declared_input(card) -> None:
    import onnxruntime as ort

    path = model_path(CARD, card)
    assert path.stat().st_size <= 20 * 1024 * 1024
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = card.inputs[0].shape
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    scores, heat = sess.run(["scores", "heatmap"], {"image": x})
    assert scores.shape == (1, 2)
    h, w = card.preprocessing.input_size_px
    assert heat.shape == (1, 1, h // 16, w // 16)
    for raw in (scores, heat):
        prob = 1.0 / (1.0 + np.exp(-raw.astype(np.float64)))
        assert np.isfinite(prob).all() and (prob >= 0).all() and (prob <= 1).all()


def test_training_uses_the_pipeline_preprocessing(card) -> None:
    pytest.importorskip("torch")
    from edgescreen.models.train import mammo as train
    from edgescreen.models.train import mammo_data

    assert mammo_data.prepare_mammogram is pipeline.prepare_mammogram
    assert train.default_preprocessing() == card.preprocessing


def test_training_step_smoke() -> None:
    """Both training phases and hard-negative mining on two synthetic 64 px images (a few seconds)."""
    torch = pytest.importorskip("torch")
    from edgescreen.models.train import mammo as train
    from edgescreen.models.train.mammo_data import Finding, MammoDataset, Record

    rng = np.random.default_rng(0)
    images = rng.random((2, 64, 64), dtype=np.float32)
    masks = np.zeros((2, 64, 64), dtype=np.uint8)
    masks[0, 20:30, 10:20] = 2
    records = [Record("a", 1, "F", [Finding(15, 25, 5, True, "SPIC")], True, True), Record("b", 1, "F")]
    data = MammoDataset(records, images, masks, np.array([1, 0], np.float32), np.array([1, 0], np.float32),
                        np.array([True, True]), np.array([1, 1]))
    cfg = train.TrainConfig(patch_steps=3, patch=64, patch_batch=2, mine_every=1, hard_per_image=2,
                            full_epochs=1, batch_size=2, crop=64, threads=1)
    torch.set_num_threads(1)
    model = train.train_model(data, np.arange(2), cfg, seed=0, tag="smoke")
    scores = train.predict_scores(model, images, tta=True)
    assert scores.shape == (2, 2) and np.isfinite(scores).all()


def test_each_view_is_read_against_the_same_view_of_the_other_breast() -> None:
    """The one pairing rule (issue 14.4): logit minus w x the other breast's same view (several: their mean);
    views compare case-blind; a lone view, or an image of unknown side, is set against the lone reference."""
    images = [("L", "MLO", 2.0), ("R", "MLO", -1.0), ("L", "CC", 1.0), ("R", "cc", 0.0), ("R", "CC", -2.0),
              ("L", "ML", 0.5), ("U", "MLO", 3.0)]
    scores, partners = pipeline.contralateral_scores(images, 0.5, lone_reference=-1.5)
    assert scores[0] == pytest.approx(2.0 + 0.5) and partners[0] == "R MLO"
    assert scores[1] == pytest.approx(-1.0 - 1.0) and partners[1] == "L MLO"
    assert scores[2] == pytest.approx(1.0 - 0.5 * -1.0) and partners[2] == "R CC"
    assert scores[3] == pytest.approx(0.0 - 0.5 * 1.0) and scores[4] == pytest.approx(-2.0 - 0.5 * 1.0)
    assert partners[5] is None and scores[5] == pytest.approx(0.5 + 0.75)  # no right ML in the exam
    assert partners[6] is None and scores[6] == pytest.approx(3.0 + 0.75)  # side unknown: never paired
    assert pipeline.contralateral_scores(images, 0.0, lone_reference=-1.5)[0] == [v for _, _, v in images]

