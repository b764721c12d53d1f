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

from edgescreen.appliance.modelcard import ModelCard, load_card
from edgescreen.appliance.pipeline.activations import sigmoid, softmax
from edgescreen.appliance.pipeline.metrics import dice
from edgescreen.appliance.pipeline.pancreas import largest_component
from edgescreen.models.train.ct_common import (
    HELDOUT_SEED_BASE,
    LESION_CLASSES,
    ORGAN_NAMES,
    bbox_centre,
    crop,
    sliding_window,
    window,
)

ort = pytest.importorskip("onnxruntime")
MODELS = Path(__file__).resolve().parents[1] / "models"
# Measured with stage 1 0.2.0 (2600 steps): 0.95 on this test's seed (200007, pancreas slab), 0.85 mean on
# calibration seeds 100900-100903, 0.89 on the 60 held-out studies of models/REPORT.md. Stage 0.3.0 (0.2.0
# fine-tuned on the domain-randomised phantom) passes it and measured 0.805 on those calibration seeds.
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
    from edgescreen.models.phantom.ct import generate_ct_volume

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
    logits = sess.run(["organs"], {card.inputs[0].name: img[None, :, : patch[0], : patch[1], : patch[2]]})[0]
    assert logits.shape == (1, len(ORGAN_NAMES), *patch)
    np.testing.assert_allclose(softmax(logits, axis=1).sum(axis=1), 1.0, rtol=1e-5)
    probs = sliding_window(lambda t: sess.run(["organs"], {card.inputs[0].name: t})[0], img, patch,
                           card.preprocessing.overlap, len(ORGAN_NAMES))
    pred = probs.argmax(0)
    d = dice(pred == 1, ph.labels == 1)
    assert d > STAGE1_PANCREAS_DICE_FLOOR, f"pancreas Dice {d:.3f} on a held-out phantom"
    assert dice(pred == 2, ph.labels == 2) > 0.8  # the liver is large and easy: a sanity check


def test_stage1_finds_the_gland_in_a_contrast_abdomen_pelvis_scan() -> None:
    """Across the domain gap the phantom can draw: a held-out patient scanned from the lung bases to the pubis,
    portal venous phase, soft kernel. The first model put its pancreas on bowel in the lower abdomen of a real
    series; the largest predicted pancreas component (what the pipeline crops on) must lie on the gland."""
    from edgescreen.models.phantom.ct import generate_ct_volume

    card, sess = _load("pancreas.stage1")
    spacing = card.preprocessing.target_spacing_mm
    knobs = {"scan_range": "abdomen_pelvis", "contrast_phase": "portal_venous", "kernel": "soft"}
    probe = generate_ct_volume(HELDOUT_SEED_BASE + 11, None, matrix=16, slices=8, **knobs)
    fov, extent = probe.spacing_mm[1] * 16, probe.spacing_mm[0] * 8
    ph = generate_ct_volume(HELDOUT_SEED_BASE + 11, None, matrix=int(round(fov / spacing[2])),
                            slices=int(round(extent / spacing[0])), **knobs)
    img = _norm(card, ph.hu)[None]
    probs = sliding_window(lambda t: sess.run(["organs"], {card.inputs[0].name: t})[0], img,
                           card.preprocessing.patch_size, card.preprocessing.overlap, len(ORGAN_NAMES))
    pred = largest_component(probs.argmax(0) == 1)
    truth = ph.labels == 1
    assert pred.any(), "no pancreas found"
    offset_mm = np.abs(np.mean(np.nonzero(pred), axis=1) - np.mean(np.nonzero(truth), axis=1)) * np.asarray(ph.spacing_mm)
    assert offset_mm.max() < 25, f"the predicted pancreas lies {offset_mm} mm (z, y, x) from the gland"
    assert dice(pred, truth) > 0.5


def test_features_outputs_are_declared_and_pooled() -> None:
    """The domain gate's OOD score reads each model's pooled encoder features: (N, F) with F from the card."""
    for role, shape in (("pancreas.stage1", (1, 1, 32, 64, 64)), ("pancreas.stage2", None)):
        card, sess = _load(role)
        spec = card.output("features")
        assert spec.kind == "features" and spec.activation == "none"
        x = np.random.default_rng(1).random(shape or (1, *card.inputs[0].shape[1:]), dtype=np.float32)
        (features,) = sess.run(["features"], {card.inputs[0].name: x})
        assert features.shape == (1, spec.size) and np.isfinite(features).all() and features.std() > 0


def test_stage1_accepts_other_sizes_divisible_by_16() -> None:
    card, sess = _load("pancreas.stage1")
    x = np.random.default_rng(0).random((1, 1, 32, 64, 48), dtype=np.float32)
    out = sess.run(["organs"], {card.inputs[0].name: x})[0]
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


def test_the_ct_stages_share_one_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One loop, one command line, one export-and-card path for the three stages (issue 14.7).

    A tiny stage with the real trainer: it trains, keeps its checkpoint and recipe, exports an ONNX file
    that onnxruntime agrees with, writes a card the appliance's schema accepts, and --export-only
    rebuilds the same card from the checkpoint without training.
    """
    torch = pytest.importorskip("torch")
    from edgescreen.models.train import ct_export, ct_stage1, ct_stage2, ct_stage3, ct_trainer

    for module, cls in ((ct_stage1, "Stage1"), (ct_stage2, "Stage2"), (ct_stage3, "Stage3")):
        stage = getattr(module, cls)()
        assert isinstance(stage, ct_trainer.Stage) and stage.role == module.ROLE

    # checkpoints go to the test's folder, not models/data/checkpoints
    monkeypatch.setattr(ct_trainer, "save_checkpoint", lambda model, role: _save(tmp_path / f"{role}.pt", model, torch))

    class Tiny(ct_trainer.Stage):
        role, version, n, steps, batch, seed, lr = "pancreas.stage3", "0.0.1", 3, 4, 2, 0, 1e-2
        input_name, output_names = "ct_lesion", ("subtype",)

        def build_model(self):  # noqa: ANN202
            return torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(4, len(LESION_CLASSES)))

        def load(self, n):  # noqa: ANN001, ANN202
            rng = np.random.default_rng(0)
            return list(range(n)), [rng.random((2, 8, 8, 8), dtype=np.float32) for _ in range(n)], []

        def batch_loss(self, model, items, rng, batch):  # noqa: ANN001, ANN202
            x = torch.from_numpy(np.stack([items[int(i)] for i in rng.integers(len(items), size=batch)]))
            return torch.nn.functional.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long)), {"part": 1.0}

        def example(self):  # noqa: ANN202
            return torch.rand((1, 2, 8, 8, 8), generator=torch.Generator().manual_seed(0))

        def check(self, onnx_path):  # noqa: ANN001, ANN202
            return {"checked": 1.0}

        def card(self, info, checked):  # noqa: ANN001, ANN202
            return ct_export.card_document(
                self.role, self.version, "tiny", body={
                    "inputs": [{"name": "ct_lesion", "layout": "NCDHW", "shape": ["N", 2, 8, 8, 8], "channels": ["ct", "lesion_mask"]}],
                    "outputs": [{"name": "subtype", "kind": "classification", "activation": "softmax", "classes": list(LESION_CLASSES)}],
                    "preprocessing": {"normalization": {"type": "hu_window", "low": -150, "high": 350}, "crop_size": [8, 8, 8]}},
                training_data=f"tiny, {info['steps']} steps", metrics={**checked, "steps": float(info["steps"])})

    assert ct_trainer.main(Tiny(), ["--out", str(tmp_path), "--steps", "4"]) == 0
    card = load_card(tmp_path / "pancreas.stage3.json")
    assert card.metrics["checked"] == 1.0 and card.metrics["steps"] == 4.0
    (tmp_path / "pancreas.stage3.json").unlink()
    assert ct_trainer.main(Tiny(), ["--out", str(tmp_path), "--export-only", str(tmp_path / "pancreas.stage3.pt")]) == 0
    assert load_card(tmp_path / "pancreas.stage3.json").metrics["steps"] == 4.0


def _save(path: Path, model, torch) -> Path:  # noqa: ANN001
    torch.save(model.state_dict(), path)
    return path
