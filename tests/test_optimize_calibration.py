"""Calibration and held-out cases: disjoint seeds, lesion mix, tensors exactly as the card describes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgescreen.appliance.cli import optimize_cmd
from edgescreen.appliance.modelcard import ModelCard
from edgescreen.optimize.calibration import (
    CALIBRATION_SEED_BASE,
    HELDOUT_SEED_BASE,
    LESION_CLASSES,
    TRAINING_SEEDS,
    ct_builder,
    directory_cases,
    minimias_builder,
    minimias_dir,
    plan,
)


def _card(role: str, channels: list[str], outputs: list[dict], **pre: object) -> ModelCard:
    return ModelCard.model_validate({
        "role": role, "name": "t", "version": "1", "file": "t.onnx",
        "inputs": [{"name": "x", "layout": "NCDHW", "shape": ["N", len(channels), "D", "H", "W"], "channels": channels}],
        "outputs": outputs,
        "preprocessing": {"normalization": {"type": "hu_window", "low": -150, "high": 250}, **pre},
        "intended_use": "t", "training_data": "t", "licence": "t", "not_for_clinical_use": True,
    })


@pytest.mark.parametrize("role", ["pancreas.stage1", "pancreas.stage2", "pancreas.stage3", "mammo"])
def test_seed_ranges_are_disjoint_and_the_gate_set_has_lesions(role: str) -> None:
    calib, held = plan(role, "calibration", 16), plan(role, "heldout", 24)
    calib_seeds, held_seeds = {s for s, _ in calib}, {s for s, _ in held}
    assert not calib_seeds & held_seeds
    assert min(calib_seeds | held_seeds) > TRAINING_SEEDS[1]
    assert min(calib_seeds) == CALIBRATION_SEED_BASE and min(held_seeds) == HELDOUT_SEED_BASE
    lesions = [les for _, les in held]
    if role == "mammo":
        assert {"normal", "benign", "malignant"} <= set(lesions)
    else:
        assert set(LESION_CLASSES) <= set(lesions)  # every lesion class is gated on
        if role != "pancreas.stage3":
            assert lesions.count(None) == 8  # and normal anatomy too


def test_stage2_case_from_the_ct_phantom_matches_the_card() -> None:
    card = _card("pancreas.stage2", ["ct", "pancreas_mask"],
                 [{"name": "seg", "kind": "segmentation", "activation": "sigmoid", "classes": ["lesion"]},
                  {"name": "cls", "kind": "classification", "activation": "sigmoid", "classes": ["abnormal"]}],
                 target_spacing_mm=[2.0, 2.0, 2.0], crop_size=[24, 48, 48])
    case = ct_builder(card, HELDOUT_SEED_BASE + 1, "pdac")
    x = case.inputs["x"]
    assert x.shape == (1, 2, 24, 48, 48) and x.dtype == np.float32
    assert x[0, 0].min() >= 0.0 and x[0, 0].max() <= 1.0  # hu_window normalised
    assert x[0, 1].sum() > 0 and set(np.unique(x[0, 1])) <= {0.0, 1.0}  # pancreas mask channel
    assert case.truth["seg"].shape == (24, 48, 48) and case.truth["seg"].sum() > 0  # the lesion is in the crop
    assert case.truth["cls"].tolist() == [1]


def test_softmax_pancreas_and_lesion_segmentation_gets_a_label_map_truth() -> None:
    """The shipped stage 2 segments background/pancreas/lesion: the lesion label wins over the gland's."""
    card = _card("pancreas.stage2", ["ct"],
                 [{"name": "seg", "kind": "segmentation", "activation": "softmax",
                   "classes": ["background", "pancreas", "lesion"]},
                  {"name": "cls", "kind": "classification", "activation": "sigmoid", "classes": ["abnormal"]}],
                 target_spacing_mm=[2.0, 2.0, 2.0], crop_size=[24, 48, 48])
    case = ct_builder(card, HELDOUT_SEED_BASE + 1, "pdac")
    seg = case.truth["seg"]
    assert seg.shape == (24, 48, 48) and set(np.unique(seg)) == {0, 1, 2}
    assert (seg == 2).sum() > 0 and (seg == 1).sum() > (seg == 2).sum() // 4  # lesion and the gland around it


def test_stage3_case_is_centred_on_the_lesion_with_its_class() -> None:
    card = _card("pancreas.stage3", ["ct", "lesion_mask"],
                 [{"name": "logits", "kind": "classification", "activation": "softmax", "classes": list(LESION_CLASSES)}],
                 target_spacing_mm=[2.0, 2.0, 2.0], crop_size=[16, 32, 32])
    case = ct_builder(card, HELDOUT_SEED_BASE + 2, "ipmn")
    lesion = case.inputs["x"][0, 1]
    centre = np.array(np.nonzero(lesion)).mean(axis=1)
    assert np.all(np.abs(centre - np.array([8, 16, 16])) < 4)
    assert case.truth["logits"].tolist() == [int(c == "ipmn") for c in LESION_CLASSES]


def test_directory_calibration_checks_input_names(tmp_path: Path) -> None:
    card = _card("pancreas.stage1", ["ct"], [{"name": "o", "kind": "segmentation", "activation": "softmax",
                                              "classes": ["background", "pancreas"]}], patch_size=[8, 8, 8])
    (tmp_path / card.role).mkdir()
    np.savez(tmp_path / card.role / "a.npz", x=np.zeros((1, 1, 8, 8, 8), np.float32))
    assert directory_cases(card, tmp_path, 4).cases[0].inputs["x"].shape == (1, 1, 8, 8, 8)
    np.savez(tmp_path / card.role / "b.npz", y=np.zeros(3))
    with pytest.raises(ValueError, match="missing input arrays"):
        directory_cases(card, tmp_path, 4)


MAMMO_CARD = Path(__file__).resolve().parents[1] / "models" / "mammo.json"


@pytest.mark.skipif(minimias_dir() is None or not MAMMO_CARD.is_file(),
                    reason="needs the mini-MIAS images (../shared/data) and the trained models/mammo.json")
def test_mammo_cases_come_from_disjoint_real_images() -> None:
    card = ModelCard.model_validate(json.loads(MAMMO_CARD.read_text()))
    calib = {minimias_builder(card, s, les).lesion or f"normal{s}" for s, les in plan("mammo", "calibration", 6)}
    held = [minimias_builder(card, s, les) for s, les in plan("mammo", "heldout", 6)]
    assert held[0].inputs["image"].shape == (1, 1, *card.preprocessing.input_size_px)
    assert not {c.lesion for c in held if c.lesion} & calib
    assert [c.truth["scores"].tolist() for c in held[:3]] == [[0, 0], [1, 0], [1, 1]]


def test_optimize_command_without_the_optimiser_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "edgescreen.optimize" else real(name, *a))
    parser = argparse.ArgumentParser()
    optimize_cmd.add_arguments(parser)
    code = optimize_cmd.run(parser.parse_args(["--out", "x"]), SimpleNamespace())
    assert code == 3 and "pip install edgescreen[optimize]" in capsys.readouterr().err


def test_stage1_truth_maps_organs_by_name_whatever_the_class_order() -> None:
    classes = ["background", "liver", "pancreas", "spleen"]  # not the phantom's label order
    card = _card("pancreas.stage1", ["ct"], [{"name": "o", "kind": "segmentation", "activation": "softmax",
                                              "classes": classes}], target_spacing_mm=[3.0, 3.0, 3.0],
                 patch_size=[16, 48, 48])
    case = ct_builder(card, HELDOUT_SEED_BASE, None)
    truth = case.truth["o"]
    assert truth.shape == (16, 48, 48) and set(np.unique(truth)) <= {0, 1, 2, 3}
    assert (truth == 2).sum() > 0  # the tile is centred on the pancreas, index 2 in this card
    assert truth[8, 24, 24] in (2, 0)  # centre voxel: pancreas or the fat around it, never liver


def test_refused_seeds_are_replaced_keeping_the_lesion_mix() -> None:
    from edgescreen.optimize.calibration import Case, build_cases

    card = _card("pancreas.stage2", ["ct"], [{"name": "o", "kind": "classification", "activation": "sigmoid",
                                              "classes": ["abnormal"]}], crop_size=[4, 4, 4])

    def picky(card: ModelCard, seed: int, lesion: str | None) -> Case:
        if seed == HELDOUT_SEED_BASE + 1:
            raise ValueError("lesion does not fit this gland")
        return Case(seed, {"x": np.zeros((1, 1, 4, 4, 4), np.float32)}, lesion=lesion)

    cases = build_cases(card, "heldout", 6, picky)
    assert cases.skipped == [HELDOUT_SEED_BASE + 1]
    assert [c.lesion for c in cases.cases] == [les for _, les in plan(card.role, "heldout", 6)]
    assert cases.cases[1].seed == HELDOUT_SEED_BASE + 6 and cases.describe()["skipped_seeds"] == cases.skipped


def test_the_appliance_cli_never_imports_the_optimiser() -> None:
    """House rule: a Jetson without NNCF runs every other command; only `optimize`'s run() imports it."""
    import subprocess
    import sys

    code = ("import sys, edgescreen.appliance.cli as cli, edgescreen.appliance.bundle; cli.build_parser(); "
            "bad = [m for m in ('edgescreen.optimize', 'nncf', 'onnx') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-500:]
