"""The pancreas reference models run in onnxruntime exactly as their cards declare, and stage 1 works.

Why: the appliance feeds every model from its card alone; these tests feed each ONNX file the input
its card describes (a small phantom at the card's spacing for stage 1, fixed crops for stages 2/3)
and check the outputs' names, shapes, classes and probability sums, plus one behavioural check:
stage 1 finds the pancreas on a held-out phantom it never saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.modelcard import ModelCard, load_card
from models.train.ct_common import (
    HELDOUT_SEED_BASE,
    LESION_CLASSES,
    ORGAN_NAMES,
    bbox_centre,
    crop,
    dice,
    sigmoid,
    sliding_window,
    softmax,
    window,
)

ort = pytest.importorskip("onnxruntime")
MODELS = Path(__file__).resolve().parents[1] / "models"
# Measured with the shipped model (stage 1 0.2.0, 2600 steps): 0.95 on this test's seed (200007, pancreas
# slab), 0.85 mean on calibration seeds 100900-100903, 0.89 on the 60 held-out studies of models/REPORT.md.
# The floor leaves a margin for a retrained model, yet fails a model that has not learned the gland (the
# earlier, under-trained 0.1.0 run measured 0.78 here and 0.60 held-out).
STAGE1_PANCREAS_DICE_FLOOR = 0.8


def _load(role: str) -> tuple[ModelCard, object]:
    card = load_card(MODELS / f"{role}.json")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return card, ort.InferenceSession(str(MODELS / card.file), sess_options=opts, providers=["CPUExecutionProvider"])


def _render(seed: int, lesion: str | None, spacing: list[float], z_halfwidth_mm: float | None = None):  # noqa: ANN202
    """A phantom on the card's grid, optionally only a z-slab around the pancreas (fast)."""
    from models.phantom.ct import generate_ct_volume

    probe = generate_ct_volume(seed, None, matrix=16, slices=8)
    fov, extent = probe.spacing_mm[1] * 16, probe.spacing_mm[0] * 8
    zr = None
    if z_halfwidth_mm is not None:
        lo, hi = probe.truth["pancreas_z_range_mm"]
        zr = ((lo + hi) / 2 - z_halfwidth_mm, (lo + hi) / 2 + z_halfwidth_mm)
    return generate_ct_volume(seed, lesion, matrix=int(round(fov / spacing[2])), slices=int(round(extent / spacing[0])),
                              z_range_mm=zr)


def _norm(card: ModelCard, hu: np.ndarray) -> np.ndarray:
    n = card.preprocessing.normalization
    return window(hu.astype(np.float32), n.low, n.high)


def test_stage1_outputs_match_card_and_finds_pancreas() -> None:
    card, sess = _load("pancreas.stage1")
    assert [o.name for o in sess.get_outputs()] == [o.name for o in card.outputs]
    assert card.outputs[0].classes == list(ORGAN_NAMES) and card.outputs[0].activation == "softmax"
    patch = card.preprocessing.patch_size
    # a held-out patient the model never saw, a 144 mm slab around the pancreas on the card's grid
    ph = _render(HELDOUT_SEED_BASE + 7, "pdac", card.preprocessing.target_spacing_mm, z_halfwidth_mm=72)
    img = _norm(card, ph.hu)[None]
    logits = sess.run(None, {card.inputs[0].name: img[None, :, : patch[0], : patch[1], : patch[2]]})[0]
    assert logits.shape == (1, len(ORGAN_NAMES), *patch)
    np.testing.assert_allclose(softmax(logits, axis=1).sum(axis=1), 1.0, rtol=1e-5)
    probs = sliding_window(lambda t: sess.run(None, {card.inputs[0].name: t})[0], img, patch,
                           card.preprocessing.overlap, len(ORGAN_NAMES))
    pred = probs.argmax(0)
    d = dice(pred == 1, ph.labels == 1)
    assert d > STAGE1_PANCREAS_DICE_FLOOR, f"pancreas Dice {d:.3f} on a held-out phantom"
    assert dice(pred == 2, ph.labels == 2) > 0.8  # the liver is large and easy: a sanity check


def test_stage1_accepts_other_sizes_divisible_by_16() -> None:
    card, sess = _load("pancreas.stage1")
    x = np.random.default_rng(0).random((1, 1, 32, 64, 48), dtype=np.float32)
    out = sess.run(None, {card.inputs[0].name: x})[0]
    assert out.shape == (1, len(ORGAN_NAMES), 32, 64, 48)


def test_stage2_runs_on_its_crop() -> None:
    card, sess = _load("pancreas.stage2")
    ph = _render(HELDOUT_SEED_BASE + 3, "ipmn", card.preprocessing.target_spacing_mm, z_halfwidth_mm=70)
    x = crop(_norm(card, ph.hu), bbox_centre(ph.labels == 1), card.preprocessing.crop_size)[None, None]
    assert list(x.shape[1:]) == card.inputs[0].shape[1:]
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {card.inputs[0].name: x}), strict=True))
    assert set(outs) == {o.name for o in card.outputs}
    seg = card.output("lesion")
    assert seg.kind == "segmentation" and "lesion" in seg.classes
    assert outs["lesion"].shape == (1, len(seg.classes), *card.preprocessing.crop_size)
    assert outs["abnormal"].shape == (1, 1)
    assert card.output("abnormal").classes == ["abnormal"]
    p = float(sigmoid(outs["abnormal"])[0, 0])
    assert 0.0 <= p <= 1.0
    assert card.decision is not None and 0.0 < card.decision.threshold < 1.0


def test_stage3_runs_on_a_lesion_crop() -> None:
    card, sess = _load("pancreas.stage3")
    assert card.inputs[0].channels == ["ct", "lesion_mask"]
    ph = _render(HELDOUT_SEED_BASE + 5, "scn", card.preprocessing.target_spacing_mm, z_halfwidth_mm=70)
    c = bbox_centre(ph.lesion)
    size = card.preprocessing.crop_size
    x = np.stack([crop(_norm(card, ph.hu), c, size), crop(ph.lesion, c, size).astype(np.float32)])[None]
    logits = sess.run(None, {card.inputs[0].name: x})[0]
    assert logits.shape == (1, len(LESION_CLASSES))
    assert card.outputs[0].classes == list(LESION_CLASSES) and card.outputs[0].activation == "softmax"
    np.testing.assert_allclose(softmax(logits, axis=1).sum(), 1.0, rtol=1e-5)
