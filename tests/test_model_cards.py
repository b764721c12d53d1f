"""Every model card in models/ is valid, matches its ONNX file, and bad cards fail with clear messages.

Why: the appliance pipeline reads only the card to feed and read a model, so a card that drifts from
its ONNX file (shape, output names, sha256) or a typo that is silently accepted would make the
pipeline feed a model wrongly without any error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgescreen.appliance.modelcard import CardError, load_card, sha256_file

MODELS = Path(__file__).resolve().parents[1] / "models"
PANCREAS = ("pancreas.stage1", "pancreas.stage2", "pancreas.stage3")


def _card_paths() -> list[Path]:
    """A card is the .json beside an .onnx of the same stem (REPORT.json and the like are not cards)."""
    return sorted(p.with_suffix(".json") for p in MODELS.glob("*.onnx") if p.with_suffix(".json").is_file())


@pytest.mark.parametrize("role", PANCREAS)
def test_pancreas_cards_exist(role: str) -> None:
    assert (MODELS / f"{role}.json").is_file(), f"models/{role}.json is missing; run `make models`"
    assert (MODELS / f"{role}.onnx").is_file(), f"models/{role}.onnx is missing; run `make models`"


@pytest.mark.parametrize("path", _card_paths(), ids=lambda p: p.name)
def test_card_validates_and_sha_matches(path: Path) -> None:
    card = load_card(path)
    onnx_path = path.parent / card.file
    assert card.sha256 is not None, f"{path.name} carries no sha256"
    assert sha256_file(onnx_path) == card.sha256
    assert card.not_for_clinical_use is True
    assert onnx_path.stat().st_size <= 20 * 1024 * 1024


@pytest.mark.parametrize("role", PANCREAS)
def test_pancreas_card_is_honest(role: str) -> None:
    card = load_card(MODELS / f"{role}.json")
    assert card.role == role
    assert "synthetic" in card.training_data and "models.phantom" in card.training_data
    assert "research" in card.intended_use.lower()
    assert card.preprocessing.normalization.type == "hu_window"
    assert card.preprocessing.target_spacing_mm is not None and len(card.preprocessing.target_spacing_mm) == 3


def _stage2_raw() -> dict:
    return json.loads((MODELS / "pancreas.stage2.json").read_text())


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "pancreas.stage2.json"
    path.write_text(json.dumps(raw))
    return path


def test_unknown_key_is_refused_by_name(tmp_path: Path) -> None:
    raw = _stage2_raw()
    raw["preprocessing"]["windowing"] = "abdomen"
    with pytest.raises(CardError, match=r"preprocessing\.windowing"):
        load_card(_write(tmp_path, raw), verify_file=False)


def test_wrong_type_is_refused(tmp_path: Path) -> None:
    raw = _stage2_raw()
    raw["not_for_clinical_use"] = "maybe"
    with pytest.raises(CardError, match="not_for_clinical_use"):
        load_card(_write(tmp_path, raw), verify_file=False)


def test_decision_naming_a_missing_output_is_refused(tmp_path: Path) -> None:
    raw = _stage2_raw()
    raw["decision"]["output"] = "malignancy"
    with pytest.raises(CardError, match="malignancy"):
        load_card(_write(tmp_path, raw), verify_file=False)


def test_changed_model_file_is_detected(tmp_path: Path) -> None:
    raw = _stage2_raw()
    (tmp_path / raw["file"]).write_bytes(b"not the model")
    with pytest.raises(CardError, match="sha256"):
        load_card(_write(tmp_path, raw))


def test_models_evaluate_takes_the_options_make_models_passes() -> None:
    """`make models` runs `edgescreen models evaluate --n 120 --stage1-n 60 --update-cards`: it must parse."""
    from edgescreen.appliance.cli import build_parser

    args = build_parser().parse_args(["models", "evaluate", "--n", "120", "--stage1-n", "60", "--update-cards"])
    assert (args.models_command, args.n, args.stage1_n, args.update_cards) == ("evaluate", 120, 60, True)
    makefile = (MODELS.parent / "Makefile").read_text()
    assert "edgescreen models evaluate --n 120 --stage1-n 60 --update-cards" in makefile


# ------------------------------------------------------------------------------------------------------------
# A clinic's own model (issue 14.6): another shape, loaded by card alone


def _clinic_stage1(path: Path) -> None:
    """A 3-level "U-Net" of intensity bumps: another input name, patch, spacing, normalisation (z-score),
    five classes in another order (pancreas third) and a features output. Logits at full, 1/2 and 1/4
    resolution (AveragePool, then Resize back) are summed, so the patch must be divisible by 4."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    classes = 5  # background, liver, fat, pancreas, kidney
    centre = np.reshape([0.0, 0.4, -1.0, 2.2, 6.0], [1, classes, 1, 1, 1]).astype(np.float32)
    width = np.reshape([1.0, 0.3, 0.3, 0.6, 0.3], [1, classes, 1, 1, 1]).astype(np.float32)
    gain = np.reshape([0.0, 1.0, 1.0, 1.0, 1.0], [1, classes, 1, 1, 1]).astype(np.float32)
    bias = np.reshape([-3.0, 0.0, 0.0, 0.0, 0.0], [1, classes, 1, 1, 1]).astype(np.float32)

    def const(name: str, arr: np.ndarray) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.FLOAT, arr.shape, arr.ravel().tolist())

    nodes, level_outputs = [], []
    for level, factor in enumerate((1, 2, 4)):
        src = "volume"
        if factor > 1:
            nodes.append(helper.make_node("AveragePool", ["volume"], [f"pool{level}"], kernel_shape=[factor] * 3,
                                          strides=[factor] * 3))
            src = f"pool{level}"
        nodes += [helper.make_node("Sub", [src, "c"], [f"d{level}"]), helper.make_node("Div", [f"d{level}", "w"], [f"q{level}"]),
                  helper.make_node("Mul", [f"q{level}", f"q{level}"], [f"q2{level}"]),
                  helper.make_node("Mul", [f"q2{level}", "a"], [f"aq{level}"]),
                  helper.make_node("Sub", ["b", f"aq{level}"], [f"l{level}"])]
        out = f"l{level}"
        if factor > 1:  # coarse levels add context, weakly (the fine level decides the boundaries)
            nodes += [helper.make_node("Resize", [out, "", f"s{level}"], [f"up{level}"], mode="nearest"),
                      helper.make_node("Mul", [f"up{level}", "lw"], [f"wup{level}"])]
            out = f"wup{level}"
        level_outputs.append(out)
    nodes += [helper.make_node("Sum", level_outputs, ["probs"]),
              helper.make_node("GlobalAveragePool", ["pool2"], ["gap"]), helper.make_node("Flatten", ["gap"], ["embedding"])]
    inits = [const("c", centre), const("w", width), const("a", gain), const("b", bias),
             const("lw", np.array(0.05, np.float32)), const("s1", np.array([1, 1, 2, 2, 2], np.float32)), const("s2", np.array([1, 1, 4, 4, 4], np.float32))]
    graph = helper.make_graph(nodes, "clinic_stage1",
                              [helper.make_tensor_value_info("volume", TensorProto.FLOAT, ["N", 1, 24, 32, 32])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes, 24, 32, 32]),
                               helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _masked_stage2(path: Path) -> None:
    """Lesion logit 40 * (ct - t) inside the mask channel, -20 outside; abnormal = the largest lesion logit."""
    import onnx
    from onnx import TensorProto, helper

    t = (220 + 150) / 400
    nodes = [
        helper.make_node("Split", ["image"], ["ct", "mask"], axis=1),  # opset 17: equal halves
        helper.make_node("Sub", ["ct", "t"], ["d"]), helper.make_node("Mul", ["d", "k"], ["inside"]),
        helper.make_node("Mul", ["inside", "mask"], ["m1"]), helper.make_node("Sub", ["one", "mask"], ["outside"]),
        helper.make_node("Mul", ["outside", "neg"], ["m2"]), helper.make_node("Add", ["m1", "m2"], ["lesion"]),
        helper.make_node("ReduceMax", ["lesion"], ["abnormal"], axes=[2, 3, 4], keepdims=0),
    ]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("t", t), ("k", 40.0), ("one", 1.0), ("neg", -20.0))]
    graph = helper.make_graph(nodes, "masked_stage2",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 2, "D", "H", "W"])],
                              [helper.make_tensor_value_info("lesion", TensorProto.FLOAT, ["N", 1, "D", "H", "W"]),
                               helper.make_tensor_value_info("abnormal", TensorProto.FLOAT, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _clinic_models(root: Path, mask_channel: str) -> Path:
    from tests.test_pancreas_pipeline import write_test_models

    models = write_test_models(root)
    _clinic_stage1(models / "pancreas.stage1.onnx")
    (models / "pancreas.stage1.json").write_text(json.dumps({
        "schema_version": 1, "role": "pancreas.stage1", "name": "clinic-organs-3level", "version": "2.1.0",
        "file": "pancreas.stage1.onnx",
        "inputs": [{"name": "volume", "layout": "NCDHW", "shape": ["N", 1, 24, 32, 32], "channels": ["ct"]}],
        "outputs": [{"name": "probs", "kind": "segmentation", "activation": "softmax",
                     "classes": ["background", "liver", "fat", "pancreas", "kidney"]},
                    {"name": "embedding", "kind": "features", "activation": "none", "size": 1}],
        "preprocessing": {"normalization": {"type": "zscore", "mean": 0.0, "std": 100.0, "clip_low": -1024, "clip_high": 600},
                          "target_spacing_mm": [5.0, 3.0, 3.0], "patch_size": [24, 32, 32], "overlap": 0.25},
        "domain": {"modality": ["CT"], "source": "the clinic's validation: any CT"},
        "intended_use": "a clinic's own model (test)", "training_data": "none", "licence": "test", "not_for_clinical_use": True,
    }))
    _masked_stage2(models / "pancreas.stage2.onnx")
    card = json.loads((models / "pancreas.stage2.json").read_text())
    card["inputs"][0]["shape"][1] = 2
    card["inputs"][0]["channels"] = ["ct", mask_channel]
    (models / "pancreas.stage2.json").write_text(json.dumps(card))
    return models


def test_a_clinics_own_stage1_of_another_shape_runs_by_card_alone(tmp_path: Path) -> None:
    """Another patch size, spacing, normalisation, depth and class list, and a stage 2 that takes stage 1's
    pancreas as a second channel: the pipeline reads only the cards (no code knows these models)."""
    from edgescreen.appliance.pipeline.analyze import AnalysisRequest, analyze_study
    from tests.test_pancreas_pipeline import write_study

    study = write_study(tmp_path / "ct")
    models = _clinic_models(tmp_path / "clinic", "pancreas_mask")
    findings = analyze_study(AnalysisRequest(study, tmp_path / "out", models_dir=models))
    assert findings["models"][0]["name"] == "clinic-organs-3level"
    assert set(findings["organs"]) == {"liver", "fat", "pancreas", "kidney"}
    assert findings["pancreas_volume_ml"] > 5 and findings["organs"]["fat"] > findings["organs"]["pancreas"]
    assert findings["triage"] == "suspicious" and [les["location"] for les in findings["lesions"]] == ["head", "tail"]
    assert findings["domain"]["in_domain"] is True
    assert findings["domain"]["checks"]["ood:pancreas.stage1"].startswith("not checked: the card has no OOD statistics")
    # the mask channel is what stage 2 sees: the same model fed the liver's mask segments no lesion (the
    # lesions lie in the gland; only a partial-volume rim the toy stage 1 calls "liver" touches them)
    liver_fed = analyze_study(AnalysisRequest(study, tmp_path / "out2",
                                              models_dir=_clinic_models(tmp_path / "clinic2", "liver_mask")))
    assert liver_fed["lesions"] == [] and liver_fed["organs"]["liver"] > 0


def test_a_mask_channel_naming_no_stage1_class_is_refused(tmp_path: Path) -> None:
    from edgescreen.appliance.pipeline.analyze import AnalysisRequest, analyze_study
    from edgescreen.appliance.pipeline.pancreas import PipelineError
    from tests.test_pancreas_pipeline import write_study

    models = _clinic_models(tmp_path / "clinic", "duodenum_mask")
    with pytest.raises(PipelineError, match="'duodenum_mask' names 'duodenum', not a class of stage 1"):
        analyze_study(AnalysisRequest(write_study(tmp_path / "ct"), tmp_path / "out", models_dir=models))
    bad = json.loads((models / "pancreas.stage2.json").read_text())
    bad["inputs"][0]["channels"] = ["ct", "Pancreas Mask"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(CardError, match="channel"):
        load_card(tmp_path / "bad.json", verify_file=False)
