"""Every model card in models/ is valid, matches its ONNX file, and bad cards fail with clear messages.

Why: the appliance pipeline reads only the card to feed and read a model, so a card that drifts from
its ONNX file (shape, output names, sha256) or a typo that is silently accepted would make the
pipeline feed a model wrongly without any error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.modelcard import CardError, load_card, sha256_file

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
    from appliance.cli import build_parser

    args = build_parser().parse_args(["models", "evaluate", "--n", "120", "--stage1-n", "60", "--update-cards"])
    assert (args.models_command, args.n, args.stage1_n, args.update_cards) == ("evaluate", 120, 60, True)
    makefile = (MODELS.parent / "Makefile").read_text()
    assert "edgescreen models evaluate --n 120 --stage1-n 60 --update-cards" in makefile
