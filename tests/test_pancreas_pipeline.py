"""The pancreas cascade end to end: real ONNX models (tiny, built here) through the real runtime.

The test models threshold the input intensity (onnx.helper graphs), so their answers are known: on the
synthetic study below stage 1 finds liver and pancreas, stage 2 finds the bright lesions and stage 3
gives fixed subtype scores. That is enough to check every piece of plumbing: geometry, crops, tiles,
safe points, checkpoints, measurements, masks on the source grid, key images. With the reference
models present (models/pancreas.stage*.json) the last test runs them on the real CT phantom.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgescreen.appliance.pipeline.checkpoint import CheckpointStore, Preempted
from edgescreen.appliance.pipeline.preprocess import Grid, map_to_grid, resample, sample_box, zoomed_grid
from edgescreen.appliance.pipeline.sliding_window import WindowSpec, sliding_window
from tests.test_ctload import write_series

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SUBTYPES = ["pdac", "pnet", "spt", "ipmn", "mcn", "scn", "cp", "other"]
ORGAN_NAMES = ("background", "pancreas", "liver", "spleen", "right_kidney", "left_kidney", "aorta", "vertebrae")
SPACING = (2.5, 2.0, 2.0)
SHAPE = (40, 64, 64)
PANCREAS_HU, LIVER_HU, FAT_HU, LESION_HU = 150, 40, -100, 300


# ---------------------------------------------------------------------------------------------- study


def study_hu(lesions: int = 2, seed: int = 0) -> np.ndarray:
    """Body fat, a liver on the patient's right, a pancreas along x, bright lesions in head and tail."""
    z, y, x = (np.arange(n) * s for n, s in zip(SHAPE, SPACING, strict=True))
    z, y, x = np.meshgrid(z, y, x, indexing="ij")
    hu = np.full(SHAPE, -1000.0)
    hu[((y - 64) / 60) ** 2 + ((x - 64) / 62) ** 2 < 1] = FAT_HU
    hu[((z - 50) / 35) ** 2 + ((y - 55) / 30) ** 2 + ((x - 25) / 18) ** 2 < 1] = LIVER_HU  # low x: patient's right
    hu[((z - 50) / 10) ** 2 + ((y - 80) / 8) ** 2 + ((x - 72) / 32) ** 2 < 1] = PANCREAS_HU
    centres = [(50, 80, 52, 5.0), (50, 80, 94, 4.0)][:lesions]
    for cz, cy, cx, r in centres:
        hu[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < r**2] = LESION_HU
    hu += np.random.default_rng(seed).normal(0, 4, SHAPE)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def write_study(out_dir: Path, lesions: int = 2) -> list[Path]:
    return write_series(out_dir, study_hu(lesions), SPACING, origin=(-64.0, -40.0, -900.0))


# ---------------------------------------------------------------------------------------------- models


def _const(name: str, values: Any) -> Any:
    arr = np.asarray(values, dtype=np.float32)
    return helper.make_tensor(name, TensorProto.FLOAT, arr.shape, arr.ravel().tolist())


def _save(graph: Any, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _stage1_graph() -> Any:
    """logit_k = b_k - a_k * ((x - c_k) / w)^2 over [background, pancreas, liver] (window -200..300)."""
    centre = [0.0, (PANCREAS_HU + 200) / 500, (LIVER_HU + 200) / 500]
    shape = [1, 3, 1, 1, 1]
    nodes = [
        helper.make_node("Sub", ["image", "c"], ["d"]),
        helper.make_node("Div", ["d", "w"], ["q"]),
        helper.make_node("Mul", ["q", "q"], ["q2"]),
        helper.make_node("Mul", ["q2", "a"], ["aq"]),
        helper.make_node("Sub", ["b", "aq"], ["segmentation"]),
    ]
    inits = [_const("c", np.reshape(centre, shape)), _const("w", np.full(shape, 0.06)),
             _const("a", np.reshape([0.0, 1.0, 1.0], shape)), _const("b", np.reshape([-1.0, 0.0, 0.0], shape))]
    return helper.make_graph(nodes, "stage1", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])],
                             [helper.make_tensor_value_info("segmentation", TensorProto.FLOAT, ["N", 3, "D", "H", "W"])], inits)


def _stage2_graph() -> Any:
    """lesion logit = 40 * (x - t), t at 220 HU (window -150..250); abnormal = max lesion logit."""
    nodes = [
        helper.make_node("Sub", ["image", "t"], ["d"]),
        helper.make_node("Mul", ["d", "k"], ["lesion"]),
        helper.make_node("ReduceMax", ["lesion"], ["m"], axes=[2, 3, 4], keepdims=0),
        helper.make_node("Identity", ["m"], ["abnormal"]),
    ]
    inits = [_const("t", (220 + 150) / 400), _const("k", 40.0)]
    return helper.make_graph(nodes, "stage2", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])],
                             [helper.make_tensor_value_info("lesion", TensorProto.FLOAT, ["N", 1, "D", "H", "W"]),
                              helper.make_tensor_value_info("abnormal", TensorProto.FLOAT, ["N", 1])], inits)


def _stage3_graph() -> Any:
    """subtype logits = Gemm(mean over the crop of (ct, lesion_mask))."""
    weights = np.array([np.linspace(-2, 3, 8), np.linspace(4, -1, 8)]) * 5
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "W", "B"], ["subtype"]),
    ]
    inits = [_const("W", weights), _const("B", np.linspace(0, 0.7, 8))]
    return helper.make_graph(nodes, "stage3", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 2, "D", "H", "W"])],
                             [helper.make_tensor_value_info("subtype", TensorProto.FLOAT, ["N", 8])], inits)


def _card(role: str, inputs: list[dict], outputs: list[dict], pre: dict, decision: dict | None = None) -> dict:
    card = {
        "schema_version": 1, "role": role, "name": f"test-{role}", "version": "0.0.1", "file": f"{role}.onnx",
        "inputs": inputs, "outputs": outputs, "preprocessing": pre,
        "intended_use": "tests only", "training_data": "none: an intensity threshold", "licence": "test",
        "not_for_clinical_use": True,
    }
    if decision:
        card["decision"] = decision
    return card


def _input(channels: list[str]) -> dict:
    return {"name": "image", "layout": "NCDHW", "dtype": "float32", "shape": ["N", len(channels), "D", "H", "W"],
            "channels": channels}


def write_test_models(models_dir: Path, *, stage2_patch: bool = True, stage2_margin: bool = False) -> Path:
    """Three tiny ONNX models and their cards, as a models/ directory the pipeline reads.

    Stage 2 crops a fixed box (crop_size) or, with `stage2_margin`, the pancreas box plus a margin."""
    models_dir.mkdir(parents=True, exist_ok=True)
    _save(_stage1_graph(), models_dir / "pancreas.stage1.onnx")
    _save(_stage2_graph(), models_dir / "pancreas.stage2.onnx")
    _save(_stage3_graph(), models_dir / "pancreas.stage3.onnx")
    pre2 = {"normalization": {"type": "hu_window", "low": -150, "high": 250}, "target_spacing_mm": [2.0, 2.0, 2.0],
            "crop_size": [16, 24, 40]}
    if stage2_patch:
        pre2.update(patch_size=[16, 24, 24], overlap=0.5)
    if stage2_margin:
        del pre2["crop_size"]
        pre2["crop_margin_mm"] = [12.0, 12.0, 12.0]
    cards = {
        "pancreas.stage1": _card("pancreas.stage1", [_input(["ct"])],
                                 [{"name": "segmentation", "kind": "segmentation", "activation": "softmax",
                                   "classes": ["background", "pancreas", "liver"]}],
                                 {"normalization": {"type": "hu_window", "low": -200, "high": 300},
                                  "target_spacing_mm": [4.0, 4.0, 4.0], "patch_size": [16, 16, 16], "overlap": 0.5}),
        "pancreas.stage2": _card("pancreas.stage2", [_input(["ct"])],
                                 [{"name": "lesion", "kind": "segmentation", "activation": "sigmoid", "classes": ["lesion"]},
                                  {"name": "abnormal", "kind": "classification", "activation": "sigmoid",
                                   "classes": ["abnormal"]}],
                                 pre2, {"output": "abnormal", "class_name": "abnormal", "threshold": 0.5,
                                        "meaning": "suspicious for a pancreatic lesion"}),
        "pancreas.stage3": _card("pancreas.stage3", [_input(["ct", "lesion_mask"])],
                                 [{"name": "subtype", "kind": "classification", "activation": "softmax", "classes": SUBTYPES}],
                                 {"normalization": {"type": "hu_window", "low": -150, "high": 350},
                                  "target_spacing_mm": [2.0, 2.0, 2.0], "crop_size": [12, 12, 12]}),
    }
    # the toy stage 1 is "validated" on any CT: the gate's own tests state narrower domains
    cards["pancreas.stage1"]["domain"] = {"modality": ["CT"], "source": "tests: any CT series"}
    for role, card in cards.items():
        (models_dir / f"{role}.json").write_text(json.dumps(card, indent=2))
    return models_dir


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_study(tmp_path_factory.mktemp("study") / "ct")


def _analyze(paths: list[Path], out: Path, models: Path, *, gate: Any = None, checkpoint_dir: Path | None = None,
             **settings: Any) -> dict:
    from edgescreen.appliance.pipeline.analyze import AnalysisRequest, AnalysisSettings, analyze_study

    return analyze_study(AnalysisRequest(paths, out, models_dir=models, gate=gate, checkpoint_dir=checkpoint_dir,
                                         settings=AnalysisSettings(**settings)))


def _stable(findings: dict) -> dict:
    """What must not depend on interruptions: everything but timings and the creation time."""
    return {k: v for k, v in findings.items() if k not in ("timings_s", "created_at")}


# ---------------------------------------------------------------------------------------------- units


def test_sliding_window_covers_and_resumes_bitwise(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = {"x": rng.normal(size=(1, 21, 30, 17)).astype(np.float32)}
    calls = []

    def predict(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(inputs["x"]))
        x = inputs["x"]
        return {"seg": np.concatenate([x, -x], axis=1), "cls": x.reshape(len(x), -1).max(axis=1, keepdims=True)}

    spec = WindowSpec((8, 16, 8), 0.5, ("seg",), ("cls",), batch_size=3)
    full = sliding_window(image, predict, spec)
    np.testing.assert_allclose(full["seg"][0], image["x"][0], rtol=1e-6, atol=1e-6)  # identity model: weights cancel
    assert full["cls"][0] == pytest.approx(image["x"].max())
    n_batches = len(calls)
    for stop_at in range(1, n_batches):
        store = CheckpointStore(tmp_path / f"ck{stop_at}", {"k": 1})
        seen: list[str] = []

        def gate(sp: str, seen: list[str] = seen, stop_at: int = stop_at) -> bool:
            seen.append(sp)
            return len(seen) != stop_at

        with pytest.raises(Preempted):
            sliding_window(image, predict, spec, gate=gate, safe_point="t", store=store)
        resumed = sliding_window(image, predict, spec, store=CheckpointStore(tmp_path / f"ck{stop_at}", {"k": 1}),
                                 safe_point="t")
        assert np.array_equal(resumed["seg"], full["seg"]) and np.array_equal(resumed["cls"], full["cls"])


def test_small_volume_is_padded() -> None:
    image = {"x": np.ones((1, 5, 6, 7), np.float32)}
    out = sliding_window(image, lambda i: {"seg": i["x"] * 2}, WindowSpec((8, 8, 8), 0.5, ("seg",), pad_value=-1))
    assert out["seg"].shape == (1, 5, 6, 7) and np.allclose(out["seg"], 2.0)


def test_checkpoint_key_mismatch_discards(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, {"series": "a"})
    store.save("s", {"x": np.arange(3)}, {"m": 1})
    assert CheckpointStore(tmp_path, {"series": "a"}).load("s")[1] == {"m": 1}  # type: ignore[index]
    assert CheckpointStore(tmp_path, {"series": "b"}).load("s") is None
    # a torn npz (sidecar disagrees) reads as absent, never as wrong data
    store = CheckpointStore(tmp_path, {"series": "b"})
    store.save("s", {"x": np.arange(3)}, {})
    (tmp_path / "s.npz").write_bytes(b"garbage")
    assert store.load("s") is None


def test_map_to_grid_roundtrip() -> None:
    grid = Grid.make((30, 40, 50), (2.5, 0.8, 0.8), (10.0, -5.0, 3.0), np.eye(3)[[2, 1, 0]])
    mask = np.zeros(grid.shape, np.float32)
    mask[10:20, 10:30, 15:40] = 1
    coarse, cgrid = resample(mask, grid, (4.0, 4.0, 4.0))
    block, where = map_to_grid(coarse, cgrid, grid, order=1)
    back = np.zeros(grid.shape, np.float32)
    back[where] = block
    agree = ((back >= 0.5) == (mask >= 0.5)).mean()
    assert agree > 0.97
    # a crop sampled from the source equals the crop of the zoomed whole
    z = zoomed_grid(grid, (2.0, 2.0, 2.0))
    whole, _ = resample(mask, grid, (2.0, 2.0, 2.0))
    box = sample_box(mask, grid, z, (3, -2, 5), (8, 10, 12), order=1, fill=-5)
    np.testing.assert_allclose(box[:, 2:, :], whole[3:11, 0:8, 5:17], atol=1e-6)
    assert (box[:, :2, :] == -5).all()


def test_lesion_geometry() -> None:
    from edgescreen.appliance.pipeline.pancreas import longest_diameter_mm, pancreas_axis

    pts = np.array([[0, 0, 0], [0, 3, 4], [12, 0, 0], [1, 1, 1]], float)
    assert longest_diameter_mm(pts) == pytest.approx(np.sqrt(144 + 9 + 16))
    xs = np.linspace(-30, 60, 200)
    gland = pancreas_axis(np.stack([xs, 0.3 * xs, np.zeros_like(xs)], axis=1))  # LPS (x, y, z) points
    assert gland.location(np.array([-20, -6, 0])) == "head"  # patient's right: low LPS x
    assert gland.location(np.array([15, 4.5, 0])) == "body"
    assert gland.location(np.array([50, 15, 0])) == "tail"


# ---------------------------------------------------------------------------------------------- cascade


def test_cascade_findings(tmp_path: Path, models_dir: Path, study: list[Path]) -> None:
    findings = _analyze(study, tmp_path / "out", models_dir)
    assert findings["pipeline"] == "pancreas" and findings["triage"] == "suspicious"
    assert findings["abnormal_probability"] > 0.9 and findings["threshold"] == 0.5
    assert set(findings["organs"]) == {"pancreas", "liver"} and findings["organs"]["liver"] > 50
    # the pancreas ellipsoid is 4/3 pi 10*8*32 mm^3 = 10.7 mL less the lesions; stage 1 sees it at 4 mm
    assert 6.0 < findings["pancreas_volume_ml"] < 14.0
    lesions = findings["lesions"]
    assert [lesion["id"] for lesion in lesions] == ["lesion_1", "lesion_2"]
    head, tail = lesions
    assert head["location"] == "head" and tail["location"] == "tail"
    assert head["longest_diameter_mm"] == pytest.approx(10, abs=3) and tail["longest_diameter_mm"] == pytest.approx(8, abs=3)
    assert head["volume_ml"] == pytest.approx(4 / 3 * np.pi * 125 / 1000, rel=0.35)
    assert head["centre_lps_mm"] == pytest.approx([-64 + 52, -40 + 80, -900 + 50], abs=1.5)
    assert sum(head["subtype_probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert head["top_subtype"] in SUBTYPES and head["key_image"] == "key_lesion_1.png"
    assert {m["role"] for m in findings["models"]} == {"pancreas.stage1", "pancreas.stage2", "pancreas.stage3"}
    assert all(len(m["sha256"]) == 64 and m["backend"] == "onnxruntime" for m in findings["models"])
    assert set(findings["timings_s"]) >= {"load", "stage1", "stage2", "stage3", "outputs", "total"}
    assert "RESEARCH USE ONLY" in findings["disclaimer"]
    written = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert _stable(written) == _stable(findings)
    for name in findings["key_images"]:
        from PIL import Image

        with Image.open(tmp_path / "out" / name) as img:
            assert img.format == "PNG" and img.width >= 384


def test_stage2_crop_by_margin(tmp_path: Path, study: list[Path]) -> None:
    """A card with crop_margin_mm (no fixed crop) crops the pancreas box plus margin and tiles it."""
    models = write_test_models(tmp_path / "models", stage2_margin=True)
    findings, points = _safe_points(study, tmp_path / "out", models)
    assert findings["triage"] == "suspicious" and [les["location"] for les in findings["lesions"]] == ["head", "tail"]
    assert any(p.startswith("pancreas.stage2.tiles@") for p in points)


def test_normal_study_not_suspicious(tmp_path: Path, models_dir: Path) -> None:
    findings = _analyze(write_study(tmp_path / "ct", lesions=0), tmp_path / "out", models_dir)
    assert findings["triage"] == "not_suspicious" and findings["lesions"] == []
    assert findings["abnormal_probability"] < 0.5
    # a site operating point below the study score flips the triage, and is recorded
    low = _analyze(write_study(tmp_path / "ct2", lesions=0), tmp_path / "out2", models_dir, threshold=1e-6)
    assert low["triage"] == "suspicious" and low["threshold"] == 1e-6


def test_no_pancreas_is_indeterminate(tmp_path: Path, models_dir: Path) -> None:
    """Stage 1 finding nothing is not "normal": the study is indeterminate, and says why."""
    fat_only = np.clip(study_hu(0), -1024, 0)  # liver and pancreas gone: only air, fat and lesion-free body
    findings = _analyze(write_series(tmp_path / "ct", fat_only, SPACING), tmp_path / "out", models_dir)
    assert findings["triage"] == "indeterminate" and findings["abnormal_probability"] is None
    assert findings["pancreas_volume_ml"] is None and any("no pancreas" in w for w in findings["warnings"])
    assert findings["key_images"] == ["key_pancreas.png"]


def test_masks_on_source_grid_for_dicom_outputs(tmp_path: Path, models_dir: Path, study: list[Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The DICOM writer gets uint8 masks on the source slices (sorted order), one per lesion."""
    import edgescreen.appliance.pipeline.analyze as analyze_mod

    captured: dict[str, Any] = {}

    def fake_outputs(findings: dict, datasets: list, masks: dict, out_dir: Path, warnings: list, required: bool) -> list:
        captured.update(findings=findings, datasets=datasets, masks=masks)
        return []

    monkeypatch.setattr(analyze_mod, "_dicom_outputs", fake_outputs)
    shuffled = list(reversed(study))
    _analyze(shuffled, tmp_path / "out", models_dir)
    masks, datasets = captured["masks"], captured["datasets"]
    assert set(masks) == {"pancreas", "lesion_1", "lesion_2"}
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, SHAPE[0] + 1))
    truth = study_hu()
    assert all(mask.shape == SHAPE and mask.dtype == np.uint8 for mask in masks.values())
    lesion = masks["lesion_1"].astype(bool)
    bright = truth >= 250
    assert (lesion & bright).sum() / lesion.sum() > 0.6  # on the bright voxels of the head lesion
    assert lesion[:, :, :50].sum() > 0.8 * lesion.sum()  # head lesion sits at x < 50 (patient's right)
    pancreas = masks["pancreas"].astype(bool)
    gland = np.abs(truth.astype(int) - PANCREAS_HU) < 20
    assert (pancreas & gland).sum() / pancreas.sum() > 0.8  # stage 1 at 4 mm erodes the gland, never shifts it
    shift = np.argwhere(pancreas).mean(axis=0) - np.argwhere(gland).mean(axis=0)
    assert np.all(np.abs(shift) < [0.6, 0.8, 1.5]), shift


def _safe_points(paths: list[Path], out: Path, models: Path, **kwargs: Any) -> tuple[dict, list[str]]:
    seen: list[str] = []

    def gate(sp: str) -> bool:
        seen.append(sp)
        return True

    return _analyze(paths, out, models, gate=gate, **kwargs), seen


@pytest.fixture
def no_dicom_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip SEG/SR/PDF writing (its own tests cover it) where a test runs the cascade dozens of times."""
    import edgescreen.appliance.pipeline.analyze as analyze_mod

    monkeypatch.setattr(analyze_mod, "_dicom_outputs", lambda *args, **kwargs: [])


@pytest.mark.usefixtures("no_dicom_outputs")
def test_resume_from_every_safe_point(tmp_path: Path, models_dir: Path, study: list[Path]) -> None:
    """Stop at each safe point in turn, resume, and get exactly the uninterrupted findings."""
    reference, points = _safe_points(study, tmp_path / "ref", models_dir, batch_size=2)
    assert points[:2] == ["pancreas.load", "pancreas.stage1"]
    assert any(p.startswith("pancreas.stage1.tiles@") for p in points)
    assert any(p.startswith("pancreas.stage2.tiles@") for p in points)
    assert "pancreas.stage3.lesion_2" in points and points[-1] == "pancreas.outputs"
    for k, point in enumerate(points):
        ck = tmp_path / f"ck{k}"
        calls: list[str] = []

        def gate(sp: str, calls: list[str] = calls, k: int = k) -> bool:
            calls.append(sp)
            return len(calls) - 1 != k

        with pytest.raises(Preempted) as stopped:
            _analyze(study, tmp_path / f"out{k}", models_dir, gate=gate, checkpoint_dir=ck, batch_size=2)
        assert stopped.value.safe_point == point
        resumed, later = _safe_points(study, tmp_path / f"out{k}", models_dir, checkpoint_dir=ck, batch_size=2)
        assert _stable(resumed) == _stable(reference), f"resume after {point} differs"
        assert len(later) <= len(points)  # finished stages were skipped, not redone
        assert not ck.exists()  # a finished job leaves no checkpoint behind


def test_resume_skips_finished_stage1(tmp_path: Path, models_dir: Path, study: list[Path]) -> None:
    ck = tmp_path / "ck"
    with pytest.raises(Preempted):
        _analyze(study, tmp_path / "o", models_dir, checkpoint_dir=ck, gate=lambda sp: sp != "pancreas.stage2")
    assert (ck / "pancreas.stage1.json").is_file()
    _, later = _safe_points(study, tmp_path / "o", models_dir, checkpoint_dir=ck)
    assert not any(p.startswith("pancreas.stage1") for p in later)


def test_stage1_preempted_mid_tiles_batch1(tmp_path: Path, models_dir: Path, study: list[Path]) -> None:
    ck = tmp_path / "ck"
    reference = _analyze(study, tmp_path / "ref", models_dir)
    with pytest.raises(Preempted) as stopped:
        _analyze(study, tmp_path / "o", models_dir, checkpoint_dir=ck, gate=lambda sp: sp != "pancreas.stage1.tiles@13")
    assert stopped.value.safe_point == "pancreas.stage1.tiles@13"
    saved = json.loads((ck / "pancreas.stage1.tiles.json").read_text())
    assert saved["meta"]["next_tile"] == 13
    assert _stable(_analyze(study, tmp_path / "o", models_dir, checkpoint_dir=ck)) == _stable(reference)


def test_checkpoint_for_other_settings_is_not_used(tmp_path: Path, models_dir: Path, study: list[Path]) -> None:
    ck = tmp_path / "ck"
    with pytest.raises(Preempted):
        _analyze(study, tmp_path / "o", models_dir, checkpoint_dir=ck, gate=lambda sp: sp != "pancreas.stage3")
    _, points = _safe_points(study, tmp_path / "o", models_dir, checkpoint_dir=ck, threshold=0.7)
    assert "pancreas.stage1" in points  # another operating point: the saved stages were discarded, not reused


# ---------------------------------------------------------------------------------------------- reference models


def _reference_models_present() -> bool:
    return all((REPO / "models" / f"pancreas.stage{i}.json").is_file() for i in (1, 2, 3))


@pytest.mark.slow
def test_reference_models_on_ct_phantom(tmp_path: Path) -> None:
    """The shipped models on a 512x512 phantom with a PDAC: the whole cascade runs and reports them.

    How well they find things is models/evaluate.py's business (REPORT.md); here: valid findings, the
    models' identities, the gland found with a plausible volume, and each lesion's location.
    """
    from edgescreen.appliance.modelcard import load_card
    from edgescreen.models.phantom import ct as phantom_ct

    assert _reference_models_present(), "models/pancreas.stage{1,2,3}.json are committed reference models"

    ph = phantom_ct.write_ct_study(tmp_path / "ct", seed=200_003, lesion="pdac")
    findings = _analyze([tmp_path / "ct"], tmp_path / "out", REPO / "models", threshold=0.5)
    assert findings["triage"] in ("suspicious", "not_suspicious", "indeterminate")
    for ref in findings["models"]:
        card = load_card(REPO / "models" / f"{ref['role']}.json")
        assert ref["name"] == card.name and (card.sha256 is None or ref["sha256"] == card.sha256)
    assert set(findings["organs"]) == set(ORGAN_NAMES[1:])
    assert findings["pancreas_volume_ml"] is not None, "stage 1 (held-out Dice 0.89) found no pancreas"
    assert 0.5 * ph.truth["pancreas_volume_ml"] < findings["pancreas_volume_ml"] < 2 * ph.truth["pancreas_volume_ml"]
    for lesion in findings["lesions"]:
        assert lesion["location"] in ("head", "body", "tail") and lesion["top_subtype"] in SUBTYPES
    assert (tmp_path / "out" / "key_pancreas.png").is_file()


@pytest.mark.slow
def test_stage1_matches_training_code_bitwise(tmp_path: Path) -> None:
    """The pipeline's stage 1 (ctload, resample, window, tiles) equals models/train/ct_common exactly."""
    from edgescreen.appliance.pipeline.pancreas import (
        _channel_stack,
        _infer,
        load_canonical,
        load_stage_model,
    )
    from edgescreen.appliance.pipeline.preprocess import normalize, normalized_air
    from edgescreen.models.phantom import ct as phantom_ct
    from edgescreen.models.train import ct_common as cc

    ph = phantom_ct.generate_ct_volume(11, "pdac", slices=48, matrix=160)
    ct = load_canonical(phantom_ct.write_ct_series(ph, tmp_path / "ct", 11))
    np.testing.assert_array_equal(ct.hu, ph.hu)
    model = load_stage_model("pancreas.stage1", REPO / "models" / "pancreas.stage1.json")
    pre = model.card.preprocessing
    volume, _ = resample(ct.hu, ct.grid, pre.target_spacing_mm)
    image = _channel_stack(model.card, {"ct": normalize(volume, pre.normalization)})
    spec = model.card.outputs[0]
    mine = _infer(model, image, pad_value=normalized_air(pre.normalization), gate=None, safe_point="t", store=None,
                  progress=None)[spec.name]
    reference_volume = cc.resample(ph.hu.astype(np.float32), ph.spacing_mm, pre.target_spacing_mm)
    window = cc.window(reference_volume, pre.normalization.low, pre.normalization.high)[None]
    name = model.card.inputs[0].name
    ref = cc.sliding_window(lambda x: model.session.run({name: x})[spec.name], window, pre.patch_size, pre.overlap,
                            len(spec.classes))
    np.testing.assert_array_equal(mine, ref)


def test_label_volume_for_the_viewer_matches_the_seg(tmp_path: Path, models_dir: Path, study: list[Path]) -> None:
    """labels.npz beside findings.json: per source slice, the same pancreas and lesions as the SEG, and stage 1's
    organs; the web viewer draws from it without reading DICOM."""
    import highdicom as hd

    from edgescreen.appliance.pipeline.outputs.labels import read_labels, slice_labels

    findings = _analyze(study, tmp_path / "out", models_dir)
    assert "labels.npz" in findings["outputs"]
    labels = read_labels(tmp_path / "out" / "labels.npz")
    assert labels["organ_classes"] == ["background", "pancreas", "liver"] and len(labels["slice_uids"]) == len(study)
    seg = hd.seg.segread(tmp_path / "out" / "seg.dcm")
    numbers = {s.SegmentLabel: int(s.SegmentNumber) for s in seg.SegmentSequence}
    cited = [str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    pixels = seg.get_pixels_by_source_instance(cited, segment_numbers=[numbers["Pancreas"], numbers["Lesion 1"]],
                                                assert_missing_frames_are_empty=True)
    for uid, frame in zip(cited, pixels, strict=True):
        z = labels["slice_uids"].index(uid)
        drawn = slice_labels(labels, z)
        np.testing.assert_array_equal(drawn["pancreas"], frame[..., 0])
        np.testing.assert_array_equal(drawn["lesions"] == 1, frame[..., 1].astype(bool))
    middle = slice_labels(labels, len(study) // 2)["organs"]
    assert {1, 2} <= set(np.unique(middle).tolist())  # pancreas and liver on the middle slice
