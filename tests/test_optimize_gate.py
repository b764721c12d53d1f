"""The accuracy gate: metrics, and a deliberately broken candidate rejected with its figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.modelcard import ModelCard, load_card
from appliance.runtime import get_backend
from optimize import gate
from optimize.calibration import Case
from optimize.toymodels import ToySpec, perturb_onnx, toy_case, write_toy_model

SEG = ToySpec("pancreas.stage1", "seg3d", (16, 24, 24), 4)
CLS = ToySpec("pancreas.stage3", "cls3d", (8, 16, 16), 8)


def _outputs(path: Path, cases: list[Case]) -> list[dict]:
    with get_backend("onnxruntime").load(path, threads=1) as session:
        return [session.run(c.inputs) for c in cases]


def test_binary_auc_matches_the_rank_formula() -> None:
    assert gate.binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert gate.binary_auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)  # ties count half
    assert gate.binary_auc(np.array([0.1, 0.2]), np.array([1, 1])) is None


def test_pooled_dice_weighs_classes_not_voxels() -> None:
    dice = gate.PooledDice(["big", "small"])
    a = np.zeros((2, 10, 10), bool)
    b = a.copy()
    a[0, :8], b[0, :8] = True, True  # the big class is perfect
    a[1, 9, 0] = True  # the small one is missed entirely
    dice.add(a, b)
    mean, worst = dice.mean()
    assert mean == pytest.approx(0.5) and worst == "small"


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard, list[Case]]:
    root = tmp_path_factory.mktemp("gate")
    card_path = write_toy_model(SEG, root)
    cases = [toy_case(SEG, 300_000 + i) for i in range(6)]
    return card_path, load_card(card_path), cases


def test_fp32_against_itself_passes(seg_model: tuple[Path, ModelCard, list[Case]]) -> None:
    card_path, card, cases = seg_model
    ref = _outputs(card_path.with_suffix(".onnx"), cases)
    result = gate.evaluate(card, cases, ref, ref)
    assert result.passed and result.dice_vs_fp32 == 1.0 and result.dice_vs_truth_drop == 0.0
    assert result.dice_vs_truth_fp32 > 0.9  # the designed path really segments the bands


def test_perturbed_weights_are_rejected_with_their_figures(seg_model: tuple[Path, ModelCard, list[Case]],
                                                           tmp_path: Path) -> None:
    card_path, card, cases = seg_model
    src = card_path.with_suffix(".onnx")
    broken = perturb_onnx(src, tmp_path / "broken.onnx", scale=0.3)
    result = gate.evaluate(card, cases, _outputs(src, cases), _outputs(broken, cases))
    assert not result.passed
    assert result.dice_vs_fp32 < 0.98 and result.dice_vs_truth_drop > 0.01
    assert any(r.startswith("dice_vs_fp32 ") and "needs >= 0.98" in r for r in result.reasons)
    assert result.dice_vs_fp32_worst_class.startswith("logits:class")
    figures = result.to_dict()
    assert figures["passed"] is False and figures["heldout_cases"] == len(cases)


def test_classification_gate_uses_auc_and_decisions(tmp_path: Path) -> None:
    card = load_card(write_toy_model(CLS, tmp_path))
    cases = [toy_case(CLS, 300_000 + i) for i in range(16)]
    ref = _outputs(tmp_path / f"{CLS.role}.onnx", cases)
    same = gate.evaluate(card, cases, ref, ref)
    assert same.passed and same.decision_agreement == 1.0 and same.auc_drop == 0.0 and same.auc_fp32 > 0.9
    flipped = [{"logits": -r["logits"]} for r in ref]  # a candidate that inverts every score
    bad = gate.evaluate(card, cases, ref, flipped)
    assert not bad.passed and bad.decision_agreement < 0.5 and bad.auc_drop > 0.5 and bad.prob_mae > 0.1
    assert {r.split()[0] for r in bad.reasons} == {"auc_drop", "decision_agreement"}


def test_sigmoid_scores_use_the_card_threshold_and_heatmaps_correlate() -> None:
    card = ModelCard.model_validate({
        "role": "mammo", "name": "m", "version": "1", "file": "m.onnx",
        "inputs": [{"name": "image", "layout": "NCHW", "shape": [1, 1, 8, 8], "channels": ["mammogram"]}],
        "outputs": [{"name": "scores", "kind": "classification", "activation": "sigmoid", "classes": ["abnormal", "malignant"]},
                    {"name": "heatmap", "kind": "heatmap", "activation": "sigmoid", "classes": ["suspicious"]}],
        "preprocessing": {"normalization": {"type": "percentile", "low": 0.5, "high": 99.5}, "input_size_px": [8, 8]},
        "decision": {"output": "scores", "class_name": "abnormal", "threshold": 0.9, "meaning": "m"},
        "intended_use": "t", "training_data": "t", "licence": "t", "not_for_clinical_use": True,
    })
    rng = np.random.default_rng(0)
    cases = [Case(i, {}, {"scores": np.array([i % 2, 0])}) for i in range(10)]
    ref = [{"scores": np.array([[3.0 if i % 2 else -3.0, -2.0]]), "heatmap": rng.normal(size=(1, 1, 4, 4))} for i in range(10)]
    # 1.5 logit = 0.82 probability: under the card's 0.9 threshold, so every positive decision flips
    cand = [{"scores": np.array([[1.5 if i % 2 else -3.0, -2.0]]), "heatmap": r["heatmap"] + 0.01} for i, r in enumerate(ref)]
    result = gate.evaluate(card, cases, ref, cand)
    assert result.decision_agreement == pytest.approx(0.5) and result.auc_drop == pytest.approx(0.0)
    assert result.heatmap_corr > 0.99 and not result.passed
    noisy = [{"scores": r["scores"], "heatmap": rng.normal(size=(1, 1, 4, 4))} for r in ref]
    assert gate.evaluate(card, cases, ref, noisy).reasons[0].startswith("heatmap_corr")
