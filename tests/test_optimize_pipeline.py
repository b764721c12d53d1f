"""The optimiser end to end on tiny models: candidates, gates, benchmarks, selection, signed bundle, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgescreen.appliance.bundle import ensure_signing_key, load_public_key, verify_bundle
from edgescreen.appliance.config import load_profile
from edgescreen.optimize import run as run_mod
from edgescreen.optimize.candidates import Attempt, CandidateSpec
from edgescreen.optimize.cli import build_and_sign, parse_candidates
from edgescreen.optimize.gate import Thresholds
from edgescreen.optimize.run import Options, fixed_input_shapes
from edgescreen.optimize.toymodels import ToySpec, perturb_onnx, toy_case, toy_volume, write_toy_model
from tests.conftest import run_cli

SEG = ToySpec("pancreas.stage1", "seg3d", (16, 24, 24), 4)
FAST = "openvino/CPU/int8,openvino/CPU/fp32,onnxruntime/CPU/fp32"


def _options(**overrides: object) -> Options:
    builder = {SEG.role: lambda card, seed, lesion: toy_case(SEG, seed)}
    volumes = {SEG.role: lambda card, seed, lesion: toy_volume(SEG, seed)}
    base = {"profile": load_profile("x86-cpu"), "n_calibration": 6, "n_heldout": 8, "builders": builder,
            "candidates": parse_candidates(FAST), "bench_runs": 10, "bench_warmup": 1, "batches": (1,),
            "volume_cases": 0, "volume_builders": volumes}
    return Options(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("optimize")
    return write_toy_model(SEG, root / "models"), ensure_signing_key(root / "data")


def test_signed_bundle_with_gates_and_same_run_ratios(toy: tuple[Path, Path], tmp_path: Path) -> None:
    card, key = toy
    out = tmp_path / "bundle"
    report, code = build_and_sign([card], _options(batches=(1, 2), volume_cases=2), out, key)
    assert code == 0
    manifest = verify_bundle(out, [load_public_key(key.with_suffix(".pub"))])
    entry = manifest.models[SEG.role]
    model = report["models"][0]
    by_name = {c["candidate"]: c for c in model["candidates"]}
    # every candidate was gated on the same held-out cases, disjoint from calibration
    assert model["calibration"]["seeds"][1] < model["heldout"]["seeds"][0]
    assert all(c["gate"]["heldout_cases"] == 8 for c in by_name.values())
    chosen = by_name[model["selected"]]
    assert chosen["status"] == "selected" and chosen["gate"]["passed"]
    # selection is the fastest passing candidate the profile lists
    passing = [c for c in by_name.values() if c["status"] in ("passed", "selected")]
    assert chosen["bench"]["latency_ms_p50"] == min(c["bench"]["latency_ms_p50"] for c in passing)
    assert by_name["onnxruntime/CPU/fp32"]["speedup"] == pytest.approx(1.0)
    # the manifest carries what the analysis pipeline and the interface need
    raw = json.loads((out / "manifest.json").read_text())["models"][SEG.role]
    for field in ("backend", "precision", "sha256", "latency_ms_p50", "latency_ms_p95", "baseline_latency_ms_p50",
                  "speedup", "peak_rss_mb", "energy_j_per_inference", "energy_estimated", "gate", "card", "artifact"):
        assert field in raw, field
    assert entry.gate.passed and entry.energy_estimated  # no meter on the CI box: the profile estimate, flagged
    assert entry.speedup == pytest.approx(entry.baseline_latency_ms_p50 / entry.latency_ms_p50, rel=1e-2)
    assert entry.peak_rss_mb > 10
    assert raw["input_shapes"] == {"image": [1, 1, *SEG.patch]}
    assert (out / "report.md").read_text().count("|") > 20 and (out / "report.json").is_file()
    # a tiled model: tiles per call measured for every candidate, the baseline kept at its own best
    assert all({b["batch"] for b in c["batches"]} == {1, 2} for c in passing)
    assert raw["batch"] == chosen["bench"]["batch"] in (1, 2)
    # ...and its window gated and timed on whole volumes against ORT FP32 as the card tiles
    window = model["window"]
    assert window["reference"] == {"patch": list(SEG.patch), "overlap": 0.5, "batch": 1}
    assert len(window["cases"]) == 2 and window["volume_shape"] == [2 * p for p in SEG.patch]
    passed = [o for o in window["options"] if o["gate"] and o["gate"]["passed"]]
    chosen_option = next(o for o in window["options"] if {k: o[k] for k in ("patch", "overlap", "batch")} == raw["window"])
    assert chosen_option in passed
    assert chosen_option["seconds_per_volume"] == min(o["seconds_per_volume"] for o in passed)
    assert raw["volume_speedup"] == pytest.approx(raw["baseline_volume_ms"] / raw["volume_ms"], rel=1e-2)
    assert raw["window_gate"]["passed"] and raw["window_gate"]["heldout_cases"] == 2
    assert "Window (whole held-out volumes" in (out / "report.md").read_text()


def test_a_window_that_changes_the_answer_is_refused(toy: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Tile size is gated like a quantiser: an option whose volumes disagree with FP32 is never chosen."""
    from edgescreen.optimize import window as window_mod

    card, _ = toy
    real = window_mod.run_cases

    def lying(predict, card_, cases, win):  # noqa: ANN001, ANN202 - the signature of run_cases
        outputs, seconds = real(predict, card_, cases, win)
        if win.patch != SEG.patch:  # every larger tile: pretend it is fast and wrong
            outputs = [{k: (v + 1) % SEG.n_classes if v.ndim == 3 else v for k, v in o.items()} for o in outputs]
            seconds = 1e-6
        return outputs, seconds

    monkeypatch.setattr(window_mod, "run_cases", lying)
    outcome = run_mod.optimise_model(card, _options(candidates=parse_candidates("openvino/CPU/fp32,onnxruntime/CPU/fp32"),
                                                    volume_cases=2), tmp_path)
    assert outcome.window is not None and outcome.window.chosen.patch == SEG.patch
    refused = [o for o in outcome.window.options if o.window.patch != SEG.patch]
    assert refused and all(not o.gate.passed and "dice_vs_fp32" in o.gate.reasons[0] for o in refused)


def test_broken_candidate_is_reported_and_never_selected(toy: tuple[Path, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    card, key = toy
    real_attempts = run_mod.attempts

    def with_broken(spec: CandidateSpec, role: str, src: Path, *args: object, **kwargs: object) -> list[Attempt]:
        if spec.backend == "openvino" and spec.precision == "fp32":
            # the artifact an overeager optimisation would produce: weights perturbed
            def build(work: Path) -> tuple[Path, list[Path]]:
                broken = perturb_onnx(src, work / "broken.onnx", 0.3)
                return broken, [broken]
            return [Attempt("perturbed", build)]
        return real_attempts(spec, role, src, *args, **kwargs)

    monkeypatch.setattr(run_mod, "attempts", with_broken)
    report, code = build_and_sign([card], _options(candidates=parse_candidates("openvino/CPU/fp32,onnxruntime/CPU/fp32")),
                                  tmp_path / "bundle", key)
    assert code == 0
    broken = next(c for c in report["models"][0]["candidates"] if c["candidate"] == "openvino/CPU/fp32")
    assert broken["status"] == "failed-gate" and not broken["selected"] and broken["bench"] is None
    assert broken["gate"]["dice_vs_fp32"] < 0.98 and "dice_vs_fp32" in broken["detail"]
    assert report["models"][0]["selected"] == "onnxruntime/CPU/fp32"
    assert "failed-gate" in (tmp_path / "bundle" / "report.md").read_text()


def test_unavailable_candidates_are_listed_with_the_reason(toy: tuple[Path, Path], tmp_path: Path) -> None:
    card, key = toy
    opts = _options(candidates=parse_candidates("tensorrt/GPU/int8,openvino/NPU/int8,onnxruntime/CPU/fp32"))
    outcome = run_mod.optimise_model(card, opts, tmp_path)
    status = {c.spec.name: (c.status, c.detail) for c in outcome.candidates}
    assert status["tensorrt/GPU/int8"][0] == "unavailable" and status["tensorrt/GPU/int8"][1]
    assert status["openvino/NPU/int8"][0] == "unavailable" and "NPU" in status["openvino/NPU/int8"][1]
    assert outcome.selected is not None and outcome.selected.spec.name == "onnxruntime/CPU/fp32"


def test_no_passing_candidate_writes_no_bundle(toy: tuple[Path, Path], tmp_path: Path) -> None:
    card, key = toy
    impossible = Thresholds(dice_vs_fp32_min=1.01)
    report, code = build_and_sign([card], _options(candidates=parse_candidates("onnxruntime/CPU/fp32"),
                                                   thresholds=impossible), tmp_path / "bundle", key)
    assert code == 1 and not (tmp_path / "bundle").exists()
    assert report["models"][0]["candidates"][0]["status"] == "failed-gate"


def test_fixed_input_shapes_come_from_the_card(toy: tuple[Path, Path]) -> None:
    from edgescreen.appliance.modelcard import load_card

    assert fixed_input_shapes(load_card(toy[0])) == {"image": [1, 1, 16, 24, 24]}


def test_cli_optimize_writes_a_verifiable_bundle(toy: tuple[Path, Path], tmp_path: Path, data_dir: Path) -> None:
    """The real command: phantom held-out cases, a clinic's own calibration tensors, a two-candidate profile."""
    card, _ = toy
    profile = tmp_path / "two.toml"
    text = (Path(__file__).resolve().parents[1] / "firmware_config/profiles/x86-cpu.toml").read_text()
    start, end = text.index("candidates = ["), text.index("]\n", text.index("candidates = [")) + 2
    profile.write_text(text[:start] + 'candidates = [\n  { backend = "openvino", device = "CPU", precision = "int8" },\n'
                       '  { backend = "onnxruntime", device = "CPU", precision = "fp32" },\n]\n' + text[end:])
    calib = tmp_path / "calib" / SEG.role
    calib.mkdir(parents=True)
    for i in range(4):
        np.savez(calib / f"{i}.npz", image=toy_case(SEG, 100 + i).inputs["image"])
    out = tmp_path / "bundle"
    proc = run_cli("optimize", "--profile", str(profile), "--models", str(card.parent), "--out", str(out),
                   "--calibration", str(tmp_path / "calib"), "--calibration-cases", "4", "--heldout-cases", "3",
                   "--no-accuracy-control", "--batches", "1", "--volume-cases", "0", data_dir=data_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "selected" in proc.stdout and "pancreas.stage1" in proc.stdout
    assert run_cli("bundle", "verify", str(out), data_dir=data_dir).returncode == 0
    report = json.loads((out / "report.json").read_text())
    assert report["models"][0]["calibration"]["source"].startswith("dir:")
    assert report["models"][0]["heldout"]["source"] == "phantom:ct"


def test_select_energy_prefers_the_lowest_joules() -> None:
    from edgescreen.optimize.benchmark import BenchResult

    def outcome(name: str, p50: float, joules: float) -> run_mod.CandidateOutcome:
        bench = BenchResult(p50, p50, p50, 1000 / p50, 10, 1, 0.1, 100.0, joules, True, "estimate")
        return run_mod.CandidateOutcome(CandidateSpec(*name.split("/")), True, "passed", bench=bench)

    fast_hot, slow_cool = outcome("tensorrt/GPU/int8", 5.0, 2.0), outcome("openvino/CPU/int8", 9.0, 0.5)
    run_mod._select([fast_hot, slow_cool], _options(select="energy"))
    assert slow_cool.status == "selected" and fast_hot.status == "passed"
    fast_hot.status = slow_cool.status = "passed"
    run_mod._select([fast_hot, slow_cool], _options(select="latency"))
    assert fast_hot.status == "selected"


def test_accuracy_control_is_tried_near_the_gate_and_skipped_far_from_it() -> None:
    """Accuracy control costs minutes: one or two flipped decisions are worth it, a quarter of them is not."""
    from edgescreen.optimize.gate import GateResult

    near = GateResult(passed=False, decision_agreement=23 / 24, auc_drop=0.0234)
    far = GateResult(passed=False, decision_agreement=18 / 24, dice_vs_fp32=0.972)
    blurred = GateResult(passed=False, dice_vs_fp32=0.93)
    assert run_mod._too_far_for_accuracy_control(near) is None
    assert "flips 25%" in run_mod._too_far_for_accuracy_control(far)
    assert "Dice vs FP32 0.9300" in run_mod._too_far_for_accuracy_control(blurred)
