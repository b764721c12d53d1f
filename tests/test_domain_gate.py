"""The validated-domain gate: never an all-clear for a study the models were not validated on (issue 14.1).

Every check is exercised through the real pipeline (`analyze_study` on DICOM files, tiny ONNX models
from tests/test_pancreas_pipeline.py) with a card that states a domain: (a) DICOM attributes, (b) body
intensity statistics, (c) stage 1's anatomy, (d) a Mahalanobis distance on a features output added to
the model graph. A flagged study reads `indeterminate` with its reasons in findings.json, the SR and the
PDF. The units below check each rule on its own; tests/test_domain_gate_sets.py measures the gate on
the phantom generator's shifted acquisitions with the reference models.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from edgescreen.appliance.modelcard import AnatomyDomain, Domain, IntensityDomain, OodDomain
from edgescreen.appliance.pipeline.domain import anatomy, attributes, intensity, ood
from edgescreen.appliance.pipeline.domain.verdict import DomainReport
from edgescreen.appliance.pipeline.preprocess import Grid
from tests.test_ctload import write_series
from tests.test_pancreas_pipeline import SPACING, study_hu, write_test_models

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

PDFTOTEXT = shutil.which("pdftotext")


# ------------------------------------------------------------------------------------------ (a) attributes


@pytest.mark.parametrize(("kernel", "family"), [
    ("STANDARD", "standard"), ("SOFT", "soft"), ("BONE", "bone"), ("LUNG", "lung"), ("B30f", "standard"),
    ("Br40d", "standard"), ("B70f", "bone"), ("I26f", "soft"), ("B60f", "sharp"), ("FC08", "standard"),
    ("FC51", "bone"), ("YC", "sharp"), ("B", "standard"), (["STANDARD", "AIDR"], "standard"), ("XYZ-42", None), ("", None),
])
def test_kernel_family(kernel: Any, family: str | None) -> None:
    assert attributes.kernel_family(kernel) == family


@pytest.mark.parametrize(("tags", "phase"), [
    ({"ContrastBolusAgent": "", "StudyDescription": "CT ABDOMEN WO CONTRAST"}, "non_contrast"),
    ({"ContrastBolusAgent": "Iomeron 350"}, "contrast_unspecified"),
    ({"SeriesDescription": "Abd ARTERIAL 1.25mm"}, "arterial"),
    ({"ProtocolName": "PANCREAS PORTAL VENOUS"}, "portal_venous"),
    ({"SeriesDescription": "Axial 3mm"}, None),
])
def test_contrast_phase_from_tags(tags: dict[str, str], phase: str | None) -> None:
    ds = pydicom.Dataset()
    for k, v in tags.items():
        setattr(ds, k, v)
    assert attributes.contrast_phase(ds)[0] == phase


def _domain(**extra: Any) -> Domain:
    return Domain.model_validate({"modality": ["CT"], "source": "test", "slice_thickness_mm": {"min": 1, "max": 5},
                                  "pixel_spacing_mm": {"min": 0.5, "max": 1.0}, "kernel_family": ["standard"],
                                  "contrast_phase": ["non_contrast"], "body_part": ["ABDOMEN"], **extra})


def test_attributes_flag_what_contradicts_the_domain_and_skip_what_is_absent() -> None:
    ds = pydicom.Dataset()
    ds.Modality, ds.SliceThickness, ds.ConvolutionKernel, ds.BodyPartExamined = "CT", "0.6", "B70f", "ABDOMEN"
    report = DomainReport()
    attributes.check_ct(_domain(), ds, (0.6, 0.7, 0.7), report)
    assert not report.in_domain
    assert any("slice thickness 0.6 mm is outside the validated range [1, 5] mm" in r for r in report.reasons)
    assert any("kernel B70f (bone)" in r for r in report.reasons)
    assert report.checks["dicom.contrast"].startswith("not checked")  # no tag: the densities judge it
    clean = pydicom.Dataset()
    clean.Modality, clean.SliceThickness, clean.ConvolutionKernel = "CT", "3.0", "STANDARD"
    ok = DomainReport()
    attributes.check_ct(_domain(), clean, (3.0, 0.7, 0.7), ok)
    assert ok.in_domain and ok.checks["dicom"] == "passed" and "dicom.body_part" in ok.checks


def test_a_spacing_at_the_edge_of_the_range_with_float_noise_is_inside() -> None:
    """Slice spacing comes from differences of float positions: 5 mm spacing reads 5.000000000002."""
    ds = pydicom.Dataset()
    ds.Modality, ds.SliceThickness, ds.ConvolutionKernel = "CT", "5.0", "STANDARD"
    domain = _domain(slice_spacing_mm={"min": 0.8, "max": 5.0})
    edge = DomainReport()
    attributes.check_ct(domain, ds, (5.0 + 2e-12, 0.7, 0.7), edge)
    assert edge.in_domain, edge.reasons
    beyond = DomainReport()
    attributes.check_ct(domain, ds, (5.01, 0.7, 0.7), beyond)
    assert any("slice spacing 5.01 mm is outside" in r for r in beyond.reasons)


def test_mammography_attributes() -> None:
    domain = Domain.model_validate({"modality": ["MG"], "source": "mini-MIAS", "pixel_spacing_mm": {"min": 0.15, "max": 0.25},
                                    "detector_type": ["FILM"], "bits_stored": {"min": 8, "max": 8}})
    ffdm = pydicom.Dataset()
    ffdm.Modality, ffdm.ImagerPixelSpacing, ffdm.DetectorType, ffdm.BitsStored = "MG", [0.07, 0.07], "DIRECT", 14
    report = DomainReport()
    attributes.check_mg(domain, ffdm, report)
    assert len(report.reasons) == 3 and any("detector type DIRECT" in r for r in report.reasons)
    film = pydicom.Dataset()
    film.Modality, film.PixelSpacing, film.DetectorType, film.BitsStored = "MG", [0.2, 0.2], "FILM", 8
    fine = DomainReport()
    attributes.check_mg(domain, film, fine)
    assert fine.in_domain


# ------------------------------------------------------------------------------------------ (b) intensity


def test_body_statistics_see_contrast_noise_metal_truncation_and_size() -> None:
    base = np.pad(study_hu(0).astype(np.float32), ((0, 0), (16, 16), (16, 16)), constant_values=-1000.0)
    stats = intensity.ct_statistics(base, SPACING)
    assert 0.0 <= stats["fat_fraction"] <= 1.0 and stats["metal_fraction"] == 0.0 and stats["body_edge_fraction"] == 0.0
    noisy = base + np.random.default_rng(1).normal(0, 40, base.shape).astype(np.float32)
    assert intensity.ct_statistics(noisy, SPACING)["noise_hu"] > 3 * stats["noise_hu"]
    metal = base.copy()
    metal[:, 46:50, 40:44] = 3071
    assert intensity.ct_statistics(metal, SPACING)["metal_fraction"] > 0
    truncated = base[:, 24:72, 24:72]
    assert intensity.ct_statistics(truncated, SPACING)["body_edge_fraction"] > 0.3
    assert intensity.ct_statistics(base, (2.5, 1.0, 1.0))["body_width_mm"] < stats["body_width_mm"]


def test_intensity_check_flags_a_statistic_outside_its_range() -> None:
    domain = IntensityDomain.model_validate({"region": "body", "source": "t", "statistics": {
        "noise_hu": {"mean": 10, "std": 2, "low": 4, "high": 20}, "metal_fraction": {"mean": 0, "std": 0, "low": 0, "high": 1e-4}}})
    report = DomainReport()
    intensity.check(domain, {"noise_hu": 31.0, "metal_fraction": 0.0}, report)
    assert report.reasons == ["image noise (HU) 31 is outside the training range [4, 20] (+10.5 SD from the training mean)"]
    assert report.measured["noise_hu"] == 31.0


# ------------------------------------------------------------------------------------------ (c) anatomy


CLASSES = ["background", "pancreas", "liver", "spleen", "left_kidney", "aorta"]
GRID = Grid.make((30, 40, 40), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]]))  # (z, y, x) -> LPS


def _abdomen(pancreas_z: slice = slice(12, 16), split: bool = False) -> np.ndarray:
    """Labels on GRID (z, y, x; LPS): liver at low x (patient's right), spleen at high x, aorta behind."""
    lab = np.zeros(GRID.shape, np.uint8)
    lab[6:24, 8:26, 2:14] = 2  # liver
    lab[8:20, 14:24, 30:37] = 3  # spleen
    lab[10:18, 24:30, 18:22] = 5  # aorta (posterior: larger y)
    lab[8:18, 26:34, 26:32] = 4  # left kidney, posterior
    lab[pancreas_z, 16:20, 14:30] = 1
    if split:
        lab[pancreas_z, 16:20, 21:24] = 0
    return lab


RULES = AnatomyDomain.model_validate({
    "output": "organs", "source": "test",
    "organ_volume_ml": {"liver": {"min": 200, "max": 3000}, "pancreas": {"min": 5, "max": 300}},
    "single_component": ["pancreas"],
    "relations": [{"subject": "pancreas", "relation": "anterior_to", "reference": "aorta"},
                  {"subject": "pancreas", "relation": "left_of", "reference": "liver"},
                  {"subject": "pancreas", "relation": "right_of", "reference": "spleen"},
                  {"subject": "pancreas", "relation": "anterior_to", "reference": "left_kidney"}],
    "present_at_level_of": {"pancreas": ["liver"]},
})


def test_a_plausible_abdomen_passes() -> None:
    report = DomainReport()
    anatomy.check(RULES, _abdomen(), CLASSES, GRID, report)
    assert report.in_domain, report.reasons
    assert report.measured["volume_ml_liver"] == pytest.approx(18 * 18 * 12 * 0.064)


def test_a_pancreas_below_the_liver_in_pieces_is_flagged() -> None:
    """What the phantom-trained stage 1 did on real CT: a 'pancreas' far below the gland, in pieces."""
    report = DomainReport()
    anatomy.check(RULES, _abdomen(pancreas_z=slice(26, 29), split=True), CLASSES, GRID, report)
    assert not report.in_domain
    assert any("no liver at the level of the pancreas" in r for r in report.reasons)
    assert any("pancreas is in 2 separate pieces" in r for r in report.reasons)


def test_a_child_sized_liver_and_a_missing_organ_are_flagged() -> None:
    lab = _abdomen()
    lab[lab == 2] = 0
    lab[10:14, 10:16, 4:10] = 2  # a small liver
    lab[lab == 5] = 0  # no aorta
    report = DomainReport()
    anatomy.check(RULES, lab, CLASSES, GRID, report)
    assert any(r.startswith("liver volume 9 mL is outside the adult range [200, 3000]") for r in report.reasons)
    assert any("aorta not found" in r for r in report.reasons)


def test_organ_density_flags_contrast() -> None:
    rules = AnatomyDomain.model_validate({"output": "organs", "source": "t", "organ_hu_median": {"aorta": {"min": 20, "max": 70}}})
    report = DomainReport()
    anatomy.check(rules, _abdomen(), CLASSES, GRID, report, hu_at=lambda lps: np.full(len(lps), 260.0))
    assert report.reasons == ["aorta density 260 HU is outside the validated range [20, 70] HU (contrast enhancement?)"]


# ------------------------------------------------------------------------------------------ (d) OOD


def test_mahalanobis_in_a_principal_subspace() -> None:
    rng = np.random.default_rng(0)
    scale = np.linspace(3, 0.2, 12)
    train = rng.normal(0, 1, (300, 12)) * scale
    card = OodDomain(output="features", threshold=6.0, calibration="t", **ood.fit(train))  # full rank
    inside = [ood.distance(v, card) for v in rng.normal(0, 1, (300, 12)) * scale]
    assert np.mean(np.asarray(inside) > 6.0) <= 0.02
    far = np.zeros(12)
    far[-1] = 3.0  # small in absolute terms, but along a direction the training data hardly varies
    assert ood.distance(far, card) > 6.0
    report = DomainReport()
    ood.check(card, far, report, "pancreas.stage1")
    assert not report.in_domain and "Mahalanobis" in report.reasons[0]
    sub = OodDomain(output="features", threshold=6.0, calibration="t", **ood.fit(train, k=4))  # 4 components + residual
    assert len(sub.components) == 4 and sub.residual_variance is not None
    assert np.mean(np.asarray([ood.distance(v, sub) for v in rng.normal(0, 1, (300, 12)) * scale]) > 6.0) <= 0.02
    far[-1] = 10.0
    assert ood.distance(far, sub) > 6.0


def test_features_outputs_are_declared_without_classes() -> None:
    from edgescreen.appliance.modelcard import OutputSpec

    OutputSpec(name="features", kind="features", activation="none", size=64)
    with pytest.raises(ValueError, match="no classes and activation 'none'"):
        OutputSpec(name="features", kind="features", activation="sigmoid")
    with pytest.raises(ValueError, match="needs at least one class"):
        OutputSpec(name="x", kind="segmentation", activation="softmax")


# ------------------------------------------------------------------------------------------ the pipeline


def _with_features(src: Path, dst: Path) -> None:
    """The toy stage 1 plus a features output (N, 3): mean, mean square and mean cube of its input patch.

    Stands in for the pooled encoder features of a real model (see test_features_surgery_on_the_reference_model)."""
    model = onnx.load(src)
    g = model.graph
    g.node.extend([
        helper.make_node("Mul", ["image", "image"], ["sq"]),
        helper.make_node("Mul", ["sq", "image"], ["cube"]),
        helper.make_node("Concat", ["image", "sq", "cube"], ["stack"], axis=1),
        helper.make_node("GlobalAveragePool", ["stack"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
    ])
    g.output.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3]))
    onnx.checker.check_model(model)
    onnx.save(model, dst)


def add_pooled_features(src: Path, dst: Path, name: str = "features") -> int:
    """Copy an ONNX U-Net adding output `name` (N, F): the bottleneck (the input of the first ConvTranspose,
    else of the first Resize) globally average-pooled. Returns F. For tests and development only: the
    MODELS engineer exports this output from training."""
    from onnx import numpy_helper, shape_inference

    model = onnx.load(src)
    g = model.graph
    first_up = next(n for n in g.node if n.op_type in ("ConvTranspose", "Resize"))
    bottleneck = first_up.input[0]
    inferred = shape_inference.infer_shapes(model)
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    channels = None
    if bottleneck in known:
        dims = known[bottleneck].type.tensor_type.shape.dim
        channels = dims[1].dim_value if len(dims) > 1 and dims[1].dim_value else None
    if channels is None:  # the producing Conv's weight says how many channels it makes
        producer = next(n for n in g.node if bottleneck in n.output)
        while producer.op_type != "Conv":
            producer = next(n for n in g.node if producer.input[0] in n.output)
        weight = next(i for i in g.initializer if i.name == producer.input[1])
        channels = int(numpy_helper.to_array(weight).shape[0])
    g.node.extend([helper.make_node("GlobalAveragePool", [bottleneck], [f"{name}_pooled"]),
                   helper.make_node("Flatten", [f"{name}_pooled"], [name], axis=1)])
    g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels]))
    onnx.checker.check_model(model)
    onnx.save(model, dst)
    return int(channels)


def _analyze(paths: list[Path] | Path, out: Path, models: Path, **settings: Any) -> dict:
    from edgescreen.appliance.pipeline.analyze import AnalysisRequest, AnalysisSettings, analyze_study

    paths = [paths] if isinstance(paths, Path) else paths
    return analyze_study(AnalysisRequest(paths, out, models_dir=models, settings=AnalysisSettings(**settings)))


def _set_domain(models: Path, domain: dict[str, Any]) -> None:
    path = models / "pancreas.stage1.json"
    card = json.loads(path.read_text())
    card["domain"] = domain
    path.write_text(json.dumps(card, indent=2))


def _stage1_domain(models: Path, studies: list[list[Path]]) -> dict[str, Any]:
    """A domain for the toy stage 1 measured on toy studies, as `edgescreen models domain-calibrate` does."""
    from edgescreen.appliance.pipeline.analyze import ModelChoice, load_models
    from edgescreen.models.domain_calibrate import CT_ROLES, intensity_domain, measure_ct_study, ood_domain

    choices = {r: ModelChoice(r, models / f"{r}.json", None, "onnxruntime", "fp32", "CPU") for r in CT_ROLES}
    loaded = load_models(choices, None, 1)
    rows = [measure_ct_study(files, loaded) for files in studies]
    return {
        "source": "toy studies", "modality": ["CT"], "slice_thickness_mm": {"min": 1.0, "max": 3.0},
        "kernel_family": ["standard", "soft"], "contrast_phase": ["non_contrast"],
        "intensity": intensity_domain(rows, "toy studies"),
        "anatomy": {"output": "segmentation", "source": "toy", "organ_volume_ml": {"liver": {"min": 50, "max": 2000}},
                    "present_at_level_of": {"pancreas": ["liver"]},
                    "relations": [{"subject": "pancreas", "relation": "left_of", "reference": "liver"}]},
        "ood": ood_domain([r["features"]["pancreas.stage1"]["features"] for r in rows], "features", "toy studies", k=3),
    }


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(models with a calibrated toy domain, a folder of in-domain studies' parent)."""
    root = tmp_path_factory.mktemp("gate")
    models = write_test_models(root / "models")
    _with_features(models / "pancreas.stage1.onnx", models / "pancreas.stage1.onnx")
    card = json.loads((models / "pancreas.stage1.json").read_text())
    card["outputs"].append({"name": "features", "kind": "features", "activation": "none", "size": 3})
    (models / "pancreas.stage1.json").write_text(json.dumps(card))
    studies = [write_series(root / f"cal{s}", study_hu(lesions=s % 3, seed=s), SPACING, origin=(-64.0, -40.0, -900.0),
                            edit=_tags()) for s in range(10)]
    _set_domain(models, _stage1_domain(models, studies))
    return models, root


def _tags(**values: Any):  # noqa: ANN202
    def edit(ds: pydicom.Dataset, k: int) -> None:
        ds.ConvolutionKernel, ds.BodyPartExamined, ds.StudyDescription = "STANDARD", "ABDOMEN", "CT ABDOMEN WO CONTRAST"
        for key, value in values.items():
            setattr(ds, key, value)
    return edit


def test_an_in_domain_study_is_triaged_and_says_so(gated, tmp_path: Path) -> None:
    models, _ = gated
    study = write_series(tmp_path / "ct", study_hu(lesions=0, seed=99), SPACING, origin=(-64.0, -40.0, -900.0), edit=_tags())
    findings = _analyze(study, tmp_path / "out", models)
    assert findings["domain"]["in_domain"] is True, findings["domain"]
    assert findings["triage"] == "not_suspicious"
    checks = findings["domain"]["checks"]
    assert checks["dicom"] == checks["intensity"] == checks["anatomy"] == checks["ood:pancreas.stage1"] == "passed"
    assert "ood_distance_pancreas.stage1" in findings["domain"]["measured"]


def _assert_indeterminate_everywhere(findings: dict, out: Path, expected: str) -> None:
    assert findings["triage"] == "indeterminate" and findings["domain"]["in_domain"] is False
    assert any(expected in r for r in findings["domain"]["reasons"]), findings["domain"]["reasons"]
    on_disk = json.loads((out / "findings.json").read_text())
    assert on_disk["domain"] == findings["domain"] and on_disk["triage"] == "indeterminate"
    sr = pydicom.dcmread(out / "sr.dcm")
    texts = [str(i.TextValue) for i in _items(sr) if i.get("ValueType") == "TEXT"]
    assert any(expected in t for t in texts)
    if PDFTOTEXT:
        ds = pydicom.dcmread(out / "report.dcm")
        (out / "r.pdf").write_bytes(bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)])
        text = " ".join(subprocess.run([PDFTOTEXT, str(out / "r.pdf"), "-"], capture_output=True, text=True).stdout.split())
        assert "Result: INDETERMINATE" in text and "OUTSIDE the validated domain" in text
        assert expected.split(" (")[0][:40] in text


def _items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out += _items(item)
    return out


@pytest.mark.parametrize(("name", "tags", "expected"), [
    ("thin slices", {"SliceThickness": 0.6}, "slice thickness 0.6 mm is outside the validated range"),
    ("contrast", {"ContrastBolusAgent": "Iomeron 350"}, "contrast phase contrast_unspecified"),
    ("bone kernel", {"ConvolutionKernel": "BONEPLUS"}, "reconstruction kernel BONEPLUS (bone)"),
    ("modality", {"Modality": "PT"}, "modality PT"),
])
def test_attributes_outside_the_domain_give_indeterminate(gated, tmp_path: Path, name: str, tags: dict, expected: str) -> None:
    models, _ = gated
    if name == "modality":  # a PET series is not analysed at all: series acceptance refuses it first
        from edgescreen.appliance.pipeline.analyze import InputError

        study = write_series(tmp_path / "ct", study_hu(0, seed=7), SPACING, edit=_tags(**tags))
        with pytest.raises(InputError, match="no CT or MG image series"):
            _analyze(study, tmp_path / "out", models)
        return
    study = write_series(tmp_path / "ct", study_hu(0, seed=7), SPACING, origin=(-64.0, -40.0, -900.0), edit=_tags(**tags))
    findings = _analyze(study, tmp_path / "out", models)
    _assert_indeterminate_everywhere(findings, tmp_path / "out", expected)


def test_shifted_intensities_give_indeterminate_even_with_clean_tags(gated, tmp_path: Path) -> None:
    """Contrast with its tags stripped: no attribute says so, the image does (statistics and features)."""
    models, _ = gated
    hu = study_hu(0, seed=8).astype(np.float32)
    body = hu > -500
    hu[body] += 120.0  # everything enhanced
    study = write_series(tmp_path / "ct", np.clip(hu, -1024, 3071).astype(np.int16), SPACING, origin=(-64.0, -40.0, -900.0),
                         edit=_tags())
    findings = _analyze(study, tmp_path / "out", models)
    assert findings["domain"]["checks"]["dicom"] == "passed"
    _assert_indeterminate_everywhere(findings, tmp_path / "out", "is outside the training range")
    assert findings["domain"]["checks"]["ood:pancreas.stage1"] == "flagged"


def test_an_abdomen_without_its_liver_at_the_gland_gives_indeterminate(gated, tmp_path: Path) -> None:
    """Stage 1's organs are not an adult abdomen (the liver ends above the 'pancreas')."""
    models, _ = gated
    hu = study_hu(0, seed=9)
    z = np.arange(hu.shape[0])[:, None, None] * SPACING[0]
    liver = (hu > 20) & (hu < 60)
    hu[liver & (z < 75)] = -100  # the liver now ends 15 mm above the gland (which lies at 40-60 mm)
    study = write_series(tmp_path / "ct", hu, SPACING, origin=(-64.0, -40.0, -900.0), edit=_tags())
    findings = _analyze(study, tmp_path / "out", models)
    # the toy stage 1 labels the partial-volume rim of the gland "liver" (40 HU lies between fat and gland),
    # so here the liver's volume speaks; the level rule itself: test_a_pancreas_below_the_liver_in_pieces_is_flagged
    _assert_indeterminate_everywhere(findings, tmp_path / "out", "liver volume")
    assert findings["domain"]["checks"]["anatomy"] == "flagged"


def test_a_card_without_a_domain_never_clears(tmp_path: Path) -> None:
    models = write_test_models(tmp_path / "models")
    card = json.loads((models / "pancreas.stage1.json").read_text())
    del card["domain"]
    (models / "pancreas.stage1.json").write_text(json.dumps(card))
    study = write_series(tmp_path / "ct", study_hu(0), SPACING, origin=(-64.0, -40.0, -900.0))
    findings = _analyze(study, tmp_path / "out", models)
    assert findings["triage"] == "indeterminate"
    assert "states no validated domain" in findings["domain"]["reasons"][0]


def test_features_surgery_on_the_reference_model(tmp_path: Path) -> None:
    """The features output the MODELS engineer exports, made here by graph surgery on a copy of the shipped
    stage 1 (pooled bottleneck = the input of the first ConvTranspose): the card accepts it and the
    sliding window averages it over tiles. The shipped model is not changed."""
    from edgescreen.appliance.modelcard import load_card
    from edgescreen.appliance.pipeline.analyze import ModelChoice, load_models

    repo = Path(__file__).resolve().parent.parent / "models"
    card = json.loads((repo / "pancreas.stage1.json").read_text())
    name = "features" if not any(o["kind"] == "features" for o in card["outputs"]) else "features_dev"
    size = add_pooled_features(repo / card["file"], tmp_path / card["file"], name)
    card["outputs"].append({"name": name, "kind": "features", "activation": "none", "size": size})
    card.pop("sha256", None)
    (tmp_path / "pancreas.stage1.json").write_text(json.dumps(card))
    load_card(tmp_path / "pancreas.stage1.json")
    model = load_models({"pancreas.stage1": ModelChoice("pancreas.stage1", tmp_path / "pancreas.stage1.json", None,
                                                        "onnxruntime", "fp32", "CPU")}, 1, 1)["pancreas.stage1"]
    patch = np.full((1, 1, 32, 64, 64), 0.4, np.float32)
    out = model.predict({"ct": patch})
    assert out[name].shape == (1, size) and size >= 16 and np.isfinite(out[name]).all()
    assert out["organs"].shape == (1, 8, 32, 64, 64)
    for spec in model.card.outputs:  # a features output the trainer exported matches its card
        if spec.kind == "features" and spec.size is not None:
            assert out[spec.name].shape == (1, spec.size)
