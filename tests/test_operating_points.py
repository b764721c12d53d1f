"""Operating points (issue 14.5): calibrated thresholds on the card, chosen by name in the site config,
stated in the findings, the SR and the PDF.

The toy stage 2 (tests/test_pancreas_pipeline.py) scores the study by its brightest lesion voxel, so a
study with lesions scores near 1 and a normal one near 0: the operating points below are placed so
that the one chosen decides the triage, which proves the name reached the cascade.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from edgescreen.appliance.config.site import Triage
from edgescreen.appliance.modelcard import CardError, ModelCard, load_card
from edgescreen.appliance.pipeline.analyze import AnalysisRequest, AnalysisSettings, analyze_study
from edgescreen.appliance.pipeline.operating_point import OperatingPointError, resolve
from edgescreen.appliance.pipeline.outputs.text import operating_point_text
from tests.test_pancreas_pipeline import write_study, write_test_models

PDFTOTEXT = shutil.which("pdftotext")
POINTS = [
    {"name": "spec99", "target": "specificity", "target_value": 0.99, "threshold": 0.9999,
     "calibration_set": "toy normals 0-99", "measured": {"specificity": 1.0, "sensitivity": 0.5, "n_normal": 100, "n_lesion": 20}},
    {"name": "spec90", "target": "specificity", "target_value": 0.90, "threshold": 0.5,
     "calibration_set": "toy normals 0-99", "measured": {"specificity": 0.91, "sensitivity": 0.9}},
    {"name": "sens95", "target": "sensitivity", "target_value": 0.95, "threshold": 1e-6,
     "calibration_set": "toy lesions 0-19", "measured": {"specificity": 0.2, "sensitivity": 1.0}},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = write_test_models(tmp_path_factory.mktemp("models"))
    path = models / "pancreas.stage2.json"
    card = json.loads(path.read_text())
    card["operating_points"] = POINTS
    card["default_operating_point"] = "spec99"
    card["decision"]["threshold"] = 0.9999
    path.write_text(json.dumps(card))
    return models


@pytest.fixture(scope="module")
def normal_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_study(tmp_path_factory.mktemp("normal") / "ct", lesions=0)


def _card(**changes: Any) -> dict[str, Any]:
    base = {"schema_version": 1, "role": "pancreas.stage2", "name": "x", "version": "1", "file": "x.onnx",
            "inputs": [{"name": "ct", "layout": "NCDHW", "shape": ["N", 1, 8, 8, 8], "channels": ["ct"]}],
            "outputs": [{"name": "abnormal", "kind": "classification", "activation": "sigmoid", "classes": ["abnormal"]}],
            "preprocessing": {"normalization": {"type": "hu_window", "low": -150, "high": 250}},
            "decision": {"output": "abnormal", "class_name": "abnormal", "threshold": 0.9999, "meaning": "m"},
            "operating_points": POINTS, "default_operating_point": "spec99", "intended_use": "t", "training_data": "t",
            "licence": "t", "not_for_clinical_use": True}
    base.update(changes)
    return base


def test_card_validation_of_operating_points(tmp_path: Path) -> None:
    ModelCard.model_validate(_card())
    with pytest.raises(ValueError, match="names must be unique"):
        ModelCard.model_validate(_card(operating_points=[POINTS[0], POINTS[0]]))
    with pytest.raises(ValueError, match="default_operating_point 'spec95' is not one of"):
        ModelCard.model_validate(_card(default_operating_point="spec95"))
    with pytest.raises(ValueError, match="differs from the default operating point"):
        ModelCard.model_validate(_card(decision={"output": "abnormal", "class_name": "abnormal", "threshold": 0.5,
                                                 "meaning": "m"}))
    (tmp_path / "c.json").write_text(json.dumps(_card(operating_points=[{**POINTS[0], "target": "ppv"}])))
    with pytest.raises(CardError, match="operating_points.0.target"):
        load_card(tmp_path / "c.json", verify_file=False)


def test_precedence_override_then_name_then_card_default() -> None:
    card = ModelCard.model_validate(_card())
    assert resolve(card)["name"] == "spec99" and resolve(card)["source"] == "card"
    site = resolve(card, name="spec90")
    assert (site["name"], site["threshold"], site["source"], site["calibration_set"]) == ("spec90", 0.5, "site", "toy normals 0-99")
    assert resolve(card, name="sens95", name_source="override")["source"] == "override"
    hand = resolve(card, name="spec90", threshold=0.3)
    assert (hand["name"], hand["threshold"], hand["source"]) == ("custom", 0.3, "override")
    with pytest.raises(OperatingPointError, match="'spec98' is not in the pancreas.stage2 card .* spec99, spec90, sens95"):
        resolve(card, name="spec98")


def test_site_config_names_an_operating_point() -> None:
    assert Triage(pancreas_operating_point="spec95").pancreas_operating_point == "spec95"
    with pytest.raises(ValueError):
        Triage(pancreas_operating_point="Spec 95!")
    with pytest.raises(ValueError):
        Triage(pancreas_threshold=0.5)  # numbers are no longer set by hand in the site config: extra keys are refused


def _analyze(study: list[Path], out: Path, models: Path, **settings: Any) -> dict:
    return analyze_study(AnalysisRequest(study, out, models_dir=models, settings=AnalysisSettings(**settings)))


def test_the_chosen_operating_point_decides_and_is_stated_everywhere(models: Path, normal_study: list[Path],
                                                                    tmp_path: Path) -> None:
    default = _analyze(normal_study, tmp_path / "default", models)
    assert default["triage"] == "not_suspicious"
    assert default["operating_point"]["name"] == "spec99" and default["operating_point"]["source"] == "card"
    site = _analyze(normal_study, tmp_path / "site", models, **AnalysisSettings.from_triage(
        Triage(pancreas_operating_point="sens95")).__dict__)
    assert site["triage"] == "suspicious" and site["threshold"] == 1e-6
    assert site["operating_point"] == {"name": "sens95", "target": "sensitivity", "target_value": 0.95, "threshold": 1e-6,
                                       "calibration_set": "toy lesions 0-19", "source": "site"}
    assert json.loads((tmp_path / "site" / "findings.json").read_text())["operating_point"]["name"] == "sens95"
    text = operating_point_text(site)
    assert text.startswith("sens95: sensitivity 0.95, threshold 0.0000 (chosen in the site configuration")
    sr = pydicom.dcmread(tmp_path / "site" / "sr.dcm")
    assert text in _texts(sr)
    if PDFTOTEXT:
        ds = pydicom.dcmread(tmp_path / "site" / "report.dcm")
        (tmp_path / "r.pdf").write_bytes(bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)])
        pdf = " ".join(subprocess.run([PDFTOTEXT, str(tmp_path / "r.pdf"), "-"], capture_output=True, text=True).stdout.split())
        assert "Operating point: sens95: sensitivity 0.95" in pdf and "toy lesions 0-19" in pdf


def _texts(ds: pydicom.Dataset) -> list[str]:
    out = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            out.append(str(item.TextValue))
        out += _texts(item)
    return out


def test_cli_operating_point_and_a_name_the_card_lacks(models: Path, normal_study: list[Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from edgescreen.appliance.cli import analyze as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    folder = normal_study[0].parent
    code = cli.run(parser.parse_args([str(folder), "--out", str(tmp_path / "a"), "--models", str(models),
                                      "--operating-point", "sens95"]))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "operating point sens95" in out and "SUSPICIOUS" in out
    code = cli.run(parser.parse_args([str(folder), "--out", str(tmp_path / "b"), "--models", str(models),
                                      "--operating-point", "spec98"]))
    _, err = capsys.readouterr()
    assert code == 1 and "operating point 'spec98' is not in the pancreas.stage2 card" in err


def test_thresholds_for_each_target_from_calibration_scores() -> None:
    from edgescreen.models.domain_calibrate import operating_points

    normal = [i / 100 for i in range(100)]  # 0.00 .. 0.99
    lesion = [0.5 + i / 40 for i in range(20)]  # 0.500 .. 0.975
    points = {p["name"]: p for p in operating_points(normal, lesion, "synthetic scores")}
    assert points["spec99"]["measured"]["specificity"] >= 0.99 and points["spec99"]["threshold"] > 0.98
    assert points["spec90"]["measured"]["specificity"] >= 0.90 and points["spec90"]["threshold"] > 0.89
    assert points["sens95"]["measured"]["sensitivity"] >= 0.95 and points["sens95"]["threshold"] <= 0.525
    ModelCard.model_validate(_card(operating_points=list(points.values()),
                                   decision={"output": "abnormal", "class_name": "abnormal",
                                             "threshold": points["spec99"]["threshold"], "meaning": "m"}))
