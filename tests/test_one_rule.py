"""One copy of each rule (issue 17 item 3), and what it does at its edges: the bounding-box centre a crop
is taken around (an empty mask has none), report figures truncated never rounded up, the activations and
metrics every evaluator outside the training tree imports."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgescreen.appliance.pipeline import activations, metrics
from edgescreen.appliance.pipeline.preprocess import bbox_centre

REPO = Path(__file__).resolve().parents[1]


def test_bbox_centre_of_an_empty_mask_is_none() -> None:
    """No pancreas, no centre: the caller decides (the pipeline reads `indeterminate`), never a silent crop
    of the volume's middle that would be scored as if it were the gland."""
    assert bbox_centre(np.zeros((4, 5, 6), bool)) is None
    assert bbox_centre(np.zeros((0, 5, 6), bool)) is None


def test_bbox_centre_of_a_mask() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[2, 3, 4] = True
    assert bbox_centre(mask) == (2, 3, 4)
    mask[2:6, 3:8, 4:5] = True  # box 2..5, 3..7, 4..4: centres 3.5 -> 4 (half to even), 5, 4
    assert bbox_centre(mask) == (4, 5, 4)
    assert all(isinstance(v, int) for v in bbox_centre(mask))


def test_key_images_with_an_empty_pancreas_and_lesion_mask(tmp_path: Path) -> None:
    """A pancreas found on stage 1's coarse grid can vanish on the source slices: the key image then shows
    the middle slice with why, and a lesion mask that is empty gets no key image (no crash either way)."""
    from edgescreen.appliance.pipeline.analyze import _ct_key_images

    result = SimpleNamespace(ct=SimpleNamespace(hu=np.full((9, 32, 32), 40.0, np.float32),
                                                grid=SimpleNamespace(spacing=(3.0, 0.8, 0.8))))
    findings = {"triage": "indeterminate", "abnormal_probability": None, "pancreas_volume_ml": 0.0, "threshold": 0.5,
                "domain": {"in_domain": True},
                "lesions": [{"id": "lesion_1", "location": "head", "longest_diameter_mm": 6.0, "volume_ml": 0.1,
                             "abnormal_probability": 0.7, "subtype": None}]}
    masks = {"pancreas": np.zeros((9, 32, 32), np.uint8), "lesion_1": np.zeros((9, 32, 32), np.uint8)}
    written = _ct_key_images(result, masks, findings, tmp_path)
    assert [p.name for p in written] == ["key_pancreas.png"] and written[0].stat().st_size > 0
    assert "key_image" not in findings["lesions"][0]

    masks["pancreas"][3:5, 10:20, 10:20] = 1
    masks["lesion_1"][6, 12:14, 12:14] = 1
    written = _ct_key_images(result, masks, findings, tmp_path)
    assert [p.name for p in written] == ["key_pancreas.png", "key_lesion_1.png"]
    assert findings["lesions"][0]["key_image"] == "key_lesion_1.png"


def test_figures_are_truncated_never_rounded_up() -> None:
    assert metrics.truncated(0.99999) == "0.999"
    assert metrics.truncated(0.9126, 2) == "0.91"
    assert metrics.truncated(float("nan")) == "n/a"
    assert metrics.truncated(None) == "n/a"  # type: ignore[arg-type]
    assert metrics.figure(0.9129, [0.8509, 0.9999]) == "0.912 (95% CI 0.850-0.999)"


def test_activations_and_auc_at_their_edges() -> None:
    assert activations.sigmoid(np.array([-1000.0, 0.0, 1000.0])).tolist() == pytest.approx([0.0, 0.5, 1.0])
    p = activations.softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]]), axis=1)
    assert np.isfinite(p).all() and np.allclose(p, [[0.5, 0.5], [0.25, 0.75]])
    assert metrics.auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75  # (labels, scores)
    with pytest.raises(ValueError, match="both classes"):
        metrics.auc(np.array([1, 1]), np.array([0.1, 0.2]))


_OWN = {"sigmoid", "softmax", "auc", "roc_auc", "bootstrap_ci", "bootstrap", "bbox_centre", "dice"}


def test_no_second_copy_outside_the_training_tree() -> None:
    """Outside models/train (the training tree, which MODELS is moving onto the same functions) and the
    modules that hold the rule, no module defines its own sigmoid, softmax, AUC, bootstrap, Dice or
    bounding-box centre."""
    homes = {REPO / "appliance/pipeline/activations.py", REPO / "appliance/pipeline/metrics.py",
             REPO / "appliance/pipeline/preprocess.py"}
    copies = []
    for pkg in ("appliance", "optimize", "models", "bench"):
        for path in (REPO / pkg).rglob("*.py"):
            if path in homes or (REPO / "models/train") in path.parents:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in _OWN:
                    copies.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert copies == []




def test_no_assert_for_control_flow_in_the_appliance() -> None:
    """`python -O` strips asserts: a check the appliance relies on raises an error that says what is wrong."""
    found = sorted(f"{path.relative_to(REPO)}:{node.lineno}" for path in (REPO / "appliance").rglob("*.py")
                   for node in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(node, ast.Assert))
    assert found == []


# The SOP class lists live in appliance/dicom/sop.py.


def test_the_sop_class_lists_are_defined_once() -> None:
    found = []
    for pkg in ("appliance", "optimize", "models"):
        for path in (REPO / pkg).rglob("*.py"):
            rel = str(path.relative_to(REPO))
            if rel == "appliance/dicom/sop.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, ast.AnnAssign) else []
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                if any(n.endswith("SOP_CLASSES") for n in names):
                    found.append(f"{rel}:{node.lineno} {names}")
    assert found == []
