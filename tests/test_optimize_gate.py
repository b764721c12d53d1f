"""The accuracy gate: metrics, and a deliberately broken candidate rejected with its figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgescreen.appliance.modelcard import ModelCard, load_card
from edgescreen.appliance.runtime import get_backend
from edgescreen.optimize import gate
from edgescreen.optimize.calibration import Case
from edgescreen.optimize.toymodels import ToySpec, perturb_onnx, toy_case, write_toy_model

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


def _features_card(ood: bool, tiled: bool = False) -> ModelCard:
    """A classification card with a features output and, optionally, an OOD statistic on it (F = 4)."""
    from edgescreen.optimize.toymodels import toy_card

    doc = toy_card(CLS, "toy.onnx")
    doc["outputs"].append({"name": "features", "kind": "features", "activation": "none", "size": 4})
    if tiled:
        doc["preprocessing"] = {**doc["preprocessing"], "patch_size": list(CLS.patch), "overlap": 0.5}
        doc["preprocessing"].pop("crop_size")
    if ood:
        doc["domain"] = {"modality": ["CT"], "source": "test", "ood": {
            "output": "features", "mean": [0.0] * 4, "components": np.eye(4).tolist(), "variances": [1.0] * 4,
            "threshold": 3.0, "calibration": "test", "target_flag_rate": 0.01}}
    return ModelCard.model_validate(doc)


def _feature_outputs(features: np.ndarray) -> list[dict]:
    """Per case: a confident, stable classification (so only the features differ) and the given vector."""
    logits = np.zeros((1, CLS.n_classes), np.float32)
    logits[0, 0] = 10.0
    return [{"logits": logits, "features": f[None].astype(np.float32)} for f in features]


def test_features_drift_is_reported_never_gated_without_an_ood_statistic() -> None:
    card = _features_card(ood=False)
    cases = [Case(seed=i, inputs={}) for i in range(10)]
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (10, 4))
    result = gate.evaluate(card, cases, _feature_outputs(ref), _feature_outputs(ref * 3.0 + 5.0))
    assert result.passed, result.reasons  # far-off features alone never fail a model without an OOD statistic
    assert result.features_rel_error > 1.0 and result.features_cosine_min < 0.99
    assert result.ood_flag_rate is None
    same = gate.evaluate(card, cases, _feature_outputs(ref), _feature_outputs(ref))
    assert same.features_rel_error == 0.0 and same.features_cosine_min == pytest.approx(1.0)


def test_quantised_features_that_push_in_domain_cases_out_fail_the_gate() -> None:
    card = _features_card(ood=True)
    cases = [Case(seed=i, inputs={}) for i in range(20)]
    ref = np.full((20, 4), 0.5)  # distance 1.0: well inside the threshold 3.0
    shifted = ref.copy()
    shifted[:2] = 2.0  # distance 4.0: two in-domain cases of twenty (10 %) now flagged
    result = gate.evaluate(card, cases, _feature_outputs(ref), _feature_outputs(shifted))
    assert not result.passed
    assert result.ood_flag_rate == pytest.approx(0.1) and result.ood_flag_rate_fp32 == 0.0
    assert any(r.startswith("ood_flag_rate 0.1000") for r in result.reasons), result.reasons
    ok = gate.evaluate(card, cases, _feature_outputs(ref), _feature_outputs(ref + 0.05))
    assert ok.passed and ok.ood_flag_rate == 0.0


def test_a_candidate_flagging_no_more_than_fp32_passes() -> None:
    """When FP32 itself flags some held-out cases, the candidate is held to FP32's rate, not to 1 %."""
    card = _features_card(ood=True)
    cases = [Case(seed=i, inputs={}) for i in range(10)]
    ref = np.full((10, 4), 0.5)
    ref[0] = 2.0  # FP32 flags one case (10 %)
    same_rate = gate.evaluate(card, cases, _feature_outputs(ref), _feature_outputs(ref * 1.01))
    assert same_rate.passed and same_rate.ood_flag_rate == same_rate.ood_flag_rate_fp32 == pytest.approx(0.1)
    worse = ref.copy()
    worse[1] = 2.0
    assert not gate.evaluate(card, cases, _feature_outputs(ref), _feature_outputs(worse)).passed


def test_a_tiled_models_flag_rate_is_left_to_the_volume_gate() -> None:
    """One tile's features are not what the appliance scores (the mean over a study's tiles is)."""
    card = _features_card(ood=True, tiled=True)
    cases = [Case(seed=i, inputs={}) for i in range(4)]
    ref = np.full((4, 4), 0.5)
    result = gate.evaluate(card, cases, _feature_outputs(ref), _feature_outputs(ref + 3.0))
    assert result.passed and result.ood_flag_rate is None and result.features_rel_error > 1.0
