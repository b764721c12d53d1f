"""The optimiser's main loop: per model, build every candidate, gate it, benchmark the survivors, choose.

Order of work per model, and why:
1. calibration and held-out cases (disjoint seeds) at the card's fixed input shape;
2. the FP32 reference: ONNX Runtime on the CPU runs the held-out cases once; every candidate is gated
   against these outputs (and the truth), never against its own float path;
3. each candidate of the profile, in order: attempts until one passes the gate (INT8 escalates from
   plain quantisation to accuracy-controlled quantisation / another calibration method); an attempt
   that fails is kept in the report with its figures;
4. benchmarks in fresh processes: the ORT FP32 baseline, then every passing candidate, so each ratio
   is same-run; a candidate over the profile's memory ceiling is refused. A tiled model (the card has a
   patch size: stage 1) is measured at 1, 2 and 4 tiles per call and keeps its best, the baseline too
   (so the ratio is never flattered by batching only one side); figures are per tile;
5. the fastest passing candidate (or the lowest energy one) that the profile lists is selected;
6. a tiled model's window (tiles per call, tile size, overlap) is searched and gated on whole held-out
   volumes (optimize.window); a candidate whose every window fails the volume gate is refused and the
   next fastest is tried.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgescreen.appliance.config.profile import HardwareProfile
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.modelcard import ModelCard, load_card, model_path, sha256_file
from edgescreen.appliance.runtime import get_backend
from edgescreen.optimize import benchmark, gate, window
from edgescreen.optimize.calibration import Case, CaseBuilder, CaseSet, build_cases, directory_cases
from edgescreen.optimize.candidates import (
    BASELINE,
    BuildOptions,
    CandidateSpec,
    attempts,
    availability,
    candidates_for,
)
from edgescreen.optimize.report import Progress

log = get_logger(__name__)


@dataclass
class Options:
    profile: HardwareProfile
    n_calibration: int = 16
    n_heldout: int = 24
    bench_runs: int = 10
    bench_warmup: int = 2
    select: str = "latency"  # or "energy"
    thresholds: gate.Thresholds = field(default_factory=gate.Thresholds)
    ort_methods: Sequence[str] = ("minmax",)
    ov_presets: Sequence[str] = ("performance", "mixed")
    accuracy_control: bool = True
    static_shapes: bool = True
    calibration_dir: Path | None = None
    cache_dir: Path | None = None
    builders: dict[str, CaseBuilder] = field(default_factory=dict)
    candidates: list[CandidateSpec] | None = None  # None: the profile's
    threads: int | None = None  # None: the profile's inference threads
    batches: Sequence[int] = window.BATCHES  # tiles per call tried for a tiled model
    volume_cases: int = 3  # held-out volumes for a tiled model's window search; 0: keep the card's window
    windows: Sequence[window.Window] = ()  # extra windows to try (a site's own tile sizes)
    volume_builders: dict[str, window.VolumeBuilder] = field(default_factory=dict)  # tests: role -> volumes


@dataclass
class CandidateOutcome:
    spec: CandidateSpec
    selectable: bool
    status: str = "pending"  # unavailable | build-failed | failed-gate | passed | over-memory | bench-failed | selected
    method: str | None = None
    detail: str | None = None
    artifact: Path | None = None
    files: list[Path] = field(default_factory=list)
    gate: gate.GateResult | None = None
    bench: benchmark.BenchResult | None = None
    speedup: float | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)  # per tiles-per-call benchmark of a tiled model

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.spec.name, "backend": self.spec.backend, "device": self.spec.device,
            "precision": self.spec.precision, "in_profile": self.selectable, "status": self.status,
            "selected": self.status == "selected", "method": self.method, "detail": self.detail,
            "gate": self.gate.to_dict() if self.gate else None, "bench": self.bench.to_dict() if self.bench else None,
            "speedup": None if self.speedup is None else truncated(self.speedup), "attempts": self.attempts,
            "batches": self.batches,
        }


@dataclass
class ModelOutcome:
    role: str
    card_path: Path
    card: ModelCard
    input_shapes: dict[str, list[int]]
    calibration: CaseSet
    heldout: CaseSet
    candidates: list[CandidateOutcome]
    baseline: benchmark.BenchResult | None
    elapsed_s: float
    window: window.WindowResult | None = None

    @property
    def volume_speedup(self) -> float | None:
        """The whole-volume ratio of a tiled model: ORT FP32 as the card tiles against the chosen window."""
        chosen = self.window.chosen_option if self.window else None
        if not chosen or not chosen.seconds_per_volume or not self.window.reference_seconds_per_volume:
            return None
        return self.window.reference_seconds_per_volume / chosen.seconds_per_volume

    @property
    def selected(self) -> CandidateOutcome | None:
        return next((c for c in self.candidates if c.status == "selected"), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role, "card": {"name": self.card.name, "version": self.card.version,
                                        "sha256": self.card.sha256, "file": self.card.file},
            "input_shapes": self.input_shapes, "calibration": self.calibration.describe(),
            "heldout": self.heldout.describe(), "elapsed_s": round(self.elapsed_s, 1),
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "selected": self.selected.spec.name if self.selected else None,
            "candidates": [c.to_dict() for c in self.candidates],
            "window": self.window.to_dict() if self.window else None,
            "volume_speedup": None if self.volume_speedup is None else truncated(self.volume_speedup),
        }


# --------------------------------------------------------------------------------------------- helpers


def truncated(value: float, digits: int = 3) -> float:
    """A ratio as measured, truncated: 4.9996x is reported 4.999x, never 5.0x."""
    return math.trunc(value * 10**digits) / 10**digits


def fixed_input_shapes(card: ModelCard) -> dict[str, list[int]]:
    """The shape the pipeline always feeds: batch 1, the card's channels, its patch / crop / image size."""
    pre = card.preprocessing
    spatial = pre.patch_size or pre.crop_size or pre.input_size_px
    shapes = {}
    for spec in card.inputs:
        dims = [d if isinstance(d, int) else None for d in spec.shape]
        dims[0] = 1
        dims[1] = len(spec.channels)
        rest = dims[2:]
        if any(d is None for d in rest):
            if spatial is None or len(spatial) != len(rest):
                raise ValueError(f"{card.role}: input {spec.name} has dynamic dims {spec.shape} and the card fixes "
                                 "no patch_size / crop_size / input_size_px")
            rest = [int(s) for s in spatial]
        shapes[spec.name] = [int(d) for d in dims[:2]] + [int(d) for d in rest]
    return shapes


def run_cases(session: Any, cases: Sequence[Case], label: str | None = None) -> list[dict[str, np.ndarray]]:
    progress = Progress(label, len(cases)) if label else None
    outputs = []
    for i, case in enumerate(cases):
        outputs.append(session.run(case.inputs))
        if progress:
            progress(i + 1)
    return outputs


def _load(spec: CandidateSpec, artifact: Path, threads: int | None) -> Any:
    return get_backend(spec.backend).load(artifact, device=spec.device, precision=spec.precision, threads=threads)


def _case_score(card: ModelCard, cases: Sequence[Case], reference: Sequence[dict], thresholds: gate.Thresholds):  # noqa: ANN202
    """Per-case agreement with FP32 for NNCF's accuracy control: the worst of Dice, 1 - mean absolute
    probability change and heatmap r. Continuous on purpose: decisions alone stay at 1.0 while the
    scores drift enough to reorder cases and cost AUC, and the restorer must see that drift."""

    def score(index: int, outputs: dict) -> float:
        result = gate.evaluate(card, [cases[index]], [reference[index]], [outputs], thresholds)
        mae = None if result.prob_mae is None else 1.0 - result.prob_mae
        values = [v for v in (result.dice_vs_fp32, mae, result.heatmap_corr) if v is not None]
        return float(min(values)) if values else 1.0

    return score


def _accuracy_control_drop(card: ModelCard, t: gate.Thresholds) -> float:
    kinds = {o.kind for o in card.outputs}
    margins = []
    if "segmentation" in kinds:
        margins.append(1.0 - t.dice_vs_fp32_min)
    if "classification" in kinds:
        margins.append(t.auc_drop_max)  # mean |probability change| of at most this much
    if "heatmap" in kinds:
        margins.append(1.0 - t.heatmap_corr_min)
    return max(min(margins), 1e-3) if margins else 0.01


# ------------------------------------------------------------------------------------------- one model


def optimise_model(card_path: Path, opts: Options, work_dir: Path) -> ModelOutcome:
    """Build, gate, benchmark and choose for one model; never raises for a candidate's failure."""
    started = time.monotonic()
    card = load_card(card_path)
    src = model_path(card_path, card)
    role = card.role
    rlog = log.bind(role=role)
    threads = opts.threads or opts.profile.threads.inference
    shapes = fixed_input_shapes(card)
    work = work_dir / role
    work.mkdir(parents=True, exist_ok=True)
    builder = opts.builders.get(role)

    if opts.calibration_dir is not None:
        calibration = directory_cases(card, opts.calibration_dir, opts.n_calibration)
    else:
        calibration = build_cases(card, "calibration", opts.n_calibration, builder, opts.cache_dir,
                                  Progress(f"{role}: calibration cases", opts.n_calibration))
    heldout = build_cases(card, "heldout", opts.n_heldout, builder, opts.cache_dir,
                          Progress(f"{role}: held-out cases", opts.n_heldout))
    for case in [*calibration.cases, *heldout.cases]:
        for name, want in shapes.items():
            if list(case.inputs[name].shape) != want:
                raise ValueError(f"{role}: case {case.seed} input {name} has shape {list(case.inputs[name].shape)}, "
                                 f"the card fixes {want}")
    rlog.info("cases ready", calibration=len(calibration.cases), heldout=len(heldout.cases))

    with _load(BASELINE, src, threads) as ref_session:
        reference = run_cases(ref_session, heldout.cases, f"{role}: FP32 reference")
    calib_reference: list[dict] = []

    def calib_score(index: int, outputs: dict) -> float:
        """Agreement with FP32 on a calibration case (for NNCF's accuracy control); FP32 runs on first use."""
        if not calib_reference:
            with _load(BASELINE, src, threads) as session:
                calib_reference.extend(run_cases(session, calibration.cases))
        return _case_score(card, calibration.cases, calib_reference, opts.thresholds)(index, outputs)

    build_opts = BuildOptions(
        ort_methods=opts.ort_methods, ov_presets=opts.ov_presets, accuracy_control=opts.accuracy_control,
        accuracy_control_max_drop=_accuracy_control_drop(card, opts.thresholds),
        input_shapes=shapes, static_shapes=opts.static_shapes,
        cache_dir=opts.cache_dir or work,
    )
    profile_specs = opts.candidates if opts.candidates is not None else candidates_for(opts.profile)
    specs = list(profile_specs) + ([BASELINE] if BASELINE not in profile_specs else [])
    outcomes = [
        _gate_candidate(spec, spec in profile_specs, role, src, calibration.cases, heldout.cases, reference, card,
                        build_opts, calib_score, opts, threads, work)
        for spec in specs
    ]
    tiled = card.preprocessing.patch_size is not None
    baseline = _benchmark_all(role, outcomes, shapes, heldout.cases[0], opts, threads, work, src,
                              batches=tuple(opts.batches) if tiled else (1,))
    win = None
    if tiled and opts.volume_cases > 0:
        win = _select_with_window(card, src, outcomes, opts, threads, work)
    else:
        _select(outcomes, opts)
    chosen = next((c for c in outcomes if c.status == "selected"), None)
    rlog.info("selected", candidate=chosen.spec.name if chosen else None,
              speedup=round(chosen.speedup, 2) if chosen and chosen.speedup else None,
              window=win.chosen.label if win else None)
    return ModelOutcome(role, card_path, card, shapes, calibration, heldout, outcomes, baseline,
                        time.monotonic() - started, win)


def _gate_candidate(spec: CandidateSpec, selectable: bool, role: str, src: Path, calibration: Sequence[Case],
                    heldout: Sequence[Case], reference: list[dict[str, np.ndarray]], card: ModelCard,
                    build_opts: BuildOptions, calib_score: Any, opts: Options, threads: int,
                    work: Path) -> CandidateOutcome:
    """Build a candidate's attempts in order until one passes the gate; every attempt is recorded."""
    outcome = CandidateOutcome(spec, selectable=selectable)
    clog = log.bind(role=role, candidate=spec.name)
    ok, why = availability(spec)
    if not ok:
        outcome.status, outcome.detail = "unavailable", why
        clog.info("candidate unavailable", reason=why)
        return outcome
    for attempt in attempts(spec, role, src, calibration, build_opts, calib_score):
        record: dict[str, Any] = {"method": attempt.method}
        outcome.attempts.append(record)
        far = _too_far_for_accuracy_control(outcome.gate) if attempt.method.endswith("accuracy-control") else None
        if far:
            record["skipped"] = far
            clog.info("accuracy control skipped", reason=far)
            continue
        t0 = time.monotonic()
        try:
            artifact, files = attempt.build(work)
            record["build_s"] = round(time.monotonic() - t0, 1)
            if spec == BASELINE:  # the reference *is* this candidate's output; do not run it twice
                outputs = reference
            else:
                with _load(spec, artifact, threads) as session:
                    outputs = run_cases(session, heldout, f"{role}: gate {spec.name} {attempt.method}")
        except Exception as exc:  # noqa: BLE001 - one candidate's failure must not stop the others
            record["error"] = f"{type(exc).__name__}: {exc}"[:500]
            clog.warning("candidate attempt failed", method=attempt.method, error=record["error"])
            continue
        result = gate.evaluate(card, heldout, reference, outputs, opts.thresholds)
        record["gate"] = result.to_dict()
        outcome.gate, outcome.method, outcome.artifact, outcome.files = result, attempt.method, artifact, files
        clog.info("gate", method=attempt.method, passed=result.passed, dice_vs_fp32=result.dice_vs_fp32,
                  auc_drop=result.auc_drop, agreement=result.decision_agreement, reasons="; ".join(result.reasons))
        if result.passed:
            outcome.status = "passed"
            return outcome
    if outcome.gate is None:
        outcome.status = "build-failed"
        outcome.detail = "; ".join(f"{a['method']}: {a.get('error', '?')}" for a in outcome.attempts)
    else:
        outcome.status = "failed-gate"
        outcome.detail = "; ".join(outcome.gate.reasons)
    return outcome


# Accuracy control reverts a handful of layer groups (MAX_RESTORE_ITERATIONS) after ranking all of them, which
# costs minutes per model on two cores. It rescues a model one or two decisions away from the gate (mammography:
# one flip in 24 -> passed with 3 convolutions in float); it has never rescued one this far (stage 2: 6 flips in
# 24 before and after 14 minutes of it). Beyond these, the candidate is left to the next precision.
FAR_AGREEMENT = 0.9
FAR_DICE = 0.95


def _too_far_for_accuracy_control(result: gate.GateResult | None) -> str | None:
    """Why the plain INT8 attempts are too far outside the gate for accuracy control to bring back, or None."""
    if result is None:
        return None
    if result.decision_agreement is not None and result.decision_agreement < FAR_AGREEMENT:
        return (f"plain INT8 flips {1 - result.decision_agreement:.0%} of the held-out decisions (accuracy control is "
                f"tried below {1 - FAR_AGREEMENT:.0%})")
    if result.dice_vs_fp32 is not None and result.dice_vs_fp32 < FAR_DICE:
        return f"plain INT8 Dice vs FP32 {result.dice_vs_fp32:.4f} (accuracy control is tried from {FAR_DICE})"
    return None


def _benchmark_all(role: str, outcomes: list[CandidateOutcome], shapes: dict[str, list[int]], case: Case, opts: Options,
                   threads: int, work: Path, src: Path, batches: Sequence[int] = (1,)) -> benchmark.BenchResult | None:
    """The baseline first, then each passing candidate, each in its own process, at every tiles-per-call in
    `batches`; each keeps its fastest per item. The baseline keeps its fastest too: a ratio against a
    baseline held at one tile per call while the candidate batches would credit batching to the artifact."""
    inputs = {name: case.inputs[name] for name in shapes}
    to_run = [c for c in outcomes if c.status == "passed"]
    base = next((c for c in to_run if c.spec == BASELINE), None)
    order = ([base] if base else []) + [c for c in to_run if c is not base]
    progress = Progress(f"{role}: benchmarks", (len(order) + (0 if base else 1)) * len(batches))
    done = 0

    def bench(artifact: Path, spec: CandidateSpec, batch: int) -> benchmark.BenchResult:
        return benchmark.run_in_subprocess(
            artifact, spec.backend, spec.device, spec.precision, threads, inputs, runs=opts.bench_runs,
            warmup=opts.bench_warmup, estimate_w=opts.profile.watts.get(spec.backend, 0.0), work_dir=work, batch=batch)

    baseline_result: benchmark.BenchResult | None = None
    if base is None:  # the baseline failed its own load: measure it anyway for the ratios
        for batch in batches:
            try:
                result = bench(src, BASELINE, batch)
                if baseline_result is None or result.latency_ms_p50 < baseline_result.latency_ms_p50:
                    baseline_result = result
            except RuntimeError as exc:
                log.warning("baseline benchmark failed", role=role, batch=batch, error=str(exc))
            done += 1
            progress(done)
    for cand in order:
        assert cand.artifact is not None
        for batch in batches:
            try:
                result = bench(cand.artifact, cand.spec, batch)
            except RuntimeError as exc:
                cand.batches.append({"batch": batch, "error": str(exc)[:300]})
                log.warning("benchmark failed", role=role, candidate=cand.spec.name, batch=batch, error=str(exc))
                done += 1
                progress(done)
                continue
            cand.batches.append({"batch": batch, "latency_ms_p50": round(result.latency_ms_p50, 3),
                                 "peak_rss_mb": round(result.peak_rss_mb, 1)})
            if cand.bench is None or result.latency_ms_p50 < cand.bench.latency_ms_p50:
                cand.bench = result
            done += 1
            progress(done)
        if cand.bench is None:
            cand.status, cand.detail = "bench-failed", "; ".join(b.get("error", "") for b in cand.batches)[:500]
        if cand is base and cand.bench is not None:
            baseline_result = cand.bench
        if cand.bench and cand.bench.peak_rss_mb > opts.profile.memory_ceiling_mb:
            cand.status = "over-memory"
            cand.detail = f"peak RSS {cand.bench.peak_rss_mb:.0f} MB over the profile's {opts.profile.memory_ceiling_mb} MB"
    if baseline_result is not None:
        for cand in outcomes:
            if cand.bench is not None:
                cand.speedup = baseline_result.latency_ms_p50 / cand.bench.latency_ms_p50
    return baseline_result


def _select(outcomes: list[CandidateOutcome], opts: Options) -> None:
    """Fastest (or least energy) among passing candidates that the profile lists."""
    eligible = [c for c in outcomes if c.status == "passed" and c.selectable and c.bench is not None]
    if not eligible:
        return

    def key(c: CandidateOutcome) -> float:
        assert c.bench is not None
        if opts.select == "energy" and c.bench.energy_j_per_inference is not None:
            return c.bench.energy_j_per_inference
        return c.bench.latency_ms_p50

    min(eligible, key=key).status = "selected"


def _select_with_window(card: ModelCard, src: Path, outcomes: list[CandidateOutcome], opts: Options, threads: int,
                        work: Path) -> window.WindowResult | None:
    """Select as `_select` does, then search the selected candidate's window on whole held-out volumes; a
    candidate none of whose windows passes the volume gate is refused and the next is searched."""
    cases = window.volume_cases(card, opts.volume_cases, opts.cache_dir, opts.volume_builders.get(card.role))
    if not cases:
        _select(outcomes, opts)
        return None
    with _load(BASELINE, src, threads) as ref_session:
        reference = window.reference_outputs(card, ref_session, cases)
    while True:
        _select(outcomes, opts)
        chosen = next((c for c in outcomes if c.status == "selected"), None)
        if chosen is None:
            return None
        assert chosen.artifact is not None and chosen.bench is not None
        with _load(chosen.spec, chosen.artifact, threads) as session:
            result = window.search(card, session, cases, reference, batch=chosen.bench.batch,
                                   thresholds=opts.thresholds, extra=opts.windows)
        option = result.chosen_option
        if option is not None and option.gate is not None and option.gate.passed:
            return result
        chosen.status = "failed-gate"
        chosen.detail = "whole-volume gate: " + "; ".join(option.gate.reasons if option and option.gate else
                                                          [option.error if option and option.error else "no result"])
        log.warning("candidate refused on whole volumes", role=card.role, candidate=chosen.spec.name,
                    reasons=chosen.detail)


# ------------------------------------------------------------------------------------------ all models


def find_cards(models_dir: Path, roles: Sequence[str] | None = None) -> list[Path]:
    """Cards in ``models_dir`` (``<role>.json`` beside their ONNX), optionally only some roles."""
    found = []
    for path in sorted(models_dir.glob("*.json")):
        try:
            card = load_card(path, verify_file=False)
        except Exception:  # noqa: BLE001 - other JSON files (reports, configs) are not cards
            continue
        if roles is None or card.role in roles:
            found.append(path)
    return found


def optimise(card_paths: Sequence[Path], opts: Options,
             work_dir: Path | None = None) -> tuple[list[ModelOutcome], dict[str, Any], Path]:
    """Run every model; returns the outcomes, the report dict and the work dir where the artifacts are
    (the caller copies the chosen ones into the bundle, then removes it with `cleanup`)."""
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="edgescreen-optimize-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    outcomes = [optimise_model(p, opts, work) for p in card_paths]
    report = {
        "profile": opts.profile.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpu": platform.processor() or _cpu_name(), "cores": os.cpu_count(), "machine": platform.machine()},
        "elapsed_s": round(time.monotonic() - started, 1),
        "select": opts.select,
        "thresholds": asdict(opts.thresholds),
        "settings": {"calibration_cases": opts.n_calibration, "heldout_cases": opts.n_heldout,
                     "bench_runs": opts.bench_runs, "bench_warmup": opts.bench_warmup,
                     "ort_methods": list(opts.ort_methods), "ov_presets": list(opts.ov_presets),
                     "accuracy_control": opts.accuracy_control, "static_shapes": opts.static_shapes,
                     "threads": opts.threads or opts.profile.threads.inference, "batches": list(opts.batches),
                     "volume_cases": opts.volume_cases},
        "models": [o.to_dict() for o in outcomes],
    }
    return outcomes, report, work


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def manifest_entry(model: ModelOutcome, threads: int) -> dict[str, Any]:
    """The manifest's figures for a model's selected candidate (see appliance.bundle.BundleModel)."""
    chosen = model.selected
    assert chosen is not None and chosen.bench is not None and chosen.gate is not None
    bench = chosen.bench
    return {
        "backend": chosen.spec.backend, "device": chosen.spec.device, "precision": chosen.spec.precision,
        "method": chosen.method, "threads": threads, "input_shapes": model.input_shapes,
        "latency_ms_p50": round(bench.latency_ms_p50, 3), "latency_ms_p95": round(bench.latency_ms_p95, 3),
        "throughput_per_s": round(bench.throughput_per_s, 3),
        "baseline_latency_ms_p50": round(model.baseline.latency_ms_p50, 3) if model.baseline else None,
        "speedup": truncated(chosen.speedup) if chosen.speedup else None,
        "peak_rss_mb": round(bench.peak_rss_mb, 1),
        "energy_j_per_inference": None if bench.energy_j_per_inference is None else round(bench.energy_j_per_inference, 4),
        "energy_estimated": bench.energy_estimated, "energy_source": bench.energy_source,
        "gate": chosen.gate.to_dict(), "batch": bench.batch,
        "calibration": model.calibration.describe(), "heldout": model.heldout.describe(),
        "source_sha256": model.card.sha256 or sha256_file(model_path(model.card_path, model.card)),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **_window_entry(model),
    }


def _window_entry(model: ModelOutcome) -> dict[str, Any]:
    """A tiled model's window for the pipeline (patch, overlap, tiles per call) and its whole-volume figures."""
    win = model.window
    if win is None:
        return {}
    option = win.chosen_option
    return {
        "window": win.chosen.to_dict(),
        "window_gate": option.gate.to_dict() if option and option.gate else None,
        "volume_ms": None if option is None or option.seconds_per_volume is None
        else round(option.seconds_per_volume * 1000, 1),
        "baseline_volume_ms": None if win.reference_seconds_per_volume is None
        else round(win.reference_seconds_per_volume * 1000, 1),
        "volume_speedup": None if model.volume_speedup is None else truncated(model.volume_speedup),
        "volume_shape": win.volume_shape,
    }


def cleanup(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
