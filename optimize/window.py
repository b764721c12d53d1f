"""How a tiled model (stage 1) is run over a whole volume: tiles per call, tile size, overlap; gated per volume.

Why a separate search: a sliding-window model's cost per study is (tiles) x (cost per call) / (tiles
per call), and on two cores the per-call figure is not the only lever. Measured on this project's
stage 1 (see bench/REPORT.md and /work/notes/speed.md): OpenVINO INT8 runs two or four 32x64x64 tiles
per call ~1.3x faster per tile than one (the second core idles between the small layers of one tile),
and a larger tile needs fewer, better-filled calls (a 3 mm abdomen is 2-3 tiles of 64x128x128 instead
of 63 of 32x64x64). Tile size and overlap change the *answer* of a network whose normalisation sees
the whole tile (InstanceNorm), so they are gated like a quantiser: the candidate's label map over whole
held-out phantom volumes must agree with ONNX Runtime FP32 run as the card says (its patch, its
overlap, one tile per call), with the same thresholds as the per-tile gate (Dice vs FP32 per class,
pooled, >= 0.98; Dice vs truth drop <= 0.01). Tiles per call never changes the answer beyond float
rounding, but it is gated the same way, because nothing is taken on trust.

The volume gate is also where a tiled model's features are judged: the appliance scores the mean of
the tiles' features over the study, so the in-domain flag rate of the card's OOD statistic is measured
on these volumes (optimize.gate explains the rule).

Held-out volumes use seeds 350_000 + i: apart from training (0-99_999), calibration (100_000+), the
trainers' evaluation (200_000+) and the per-tile gate (300_000+).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.modelcard import ModelCard
from edgescreen.appliance.pipeline.preprocess import normalize, normalized_air
from edgescreen.appliance.pipeline.sliding_window import WindowSpec, sliding_window
from edgescreen.optimize import gate
from edgescreen.optimize.calibration import LESION_CLASSES

log = get_logger(__name__)

VOLUME_SEED_BASE = 350_000
BATCHES: tuple[int, ...] = (1, 2, 4)


@dataclass(frozen=True)
class Window:
    """How the appliance tiles a volume for this model."""

    patch: tuple[int, int, int]
    overlap: float
    batch: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"patch": list(self.patch), "overlap": self.overlap, "batch": self.batch}

    @classmethod
    def of_card(cls, card: ModelCard, batch: int = 1) -> Window:
        pre = card.preprocessing
        assert pre.patch_size is not None
        return cls(tuple(int(p) for p in pre.patch_size), float(pre.overlap), batch)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.patch))}/overlap {self.overlap:g}/batch {self.batch}"


@dataclass
class VolumeCase:
    """A whole held-out phantom volume at the card's spacing, normalised, with the organ label map."""

    seed: int
    lesion: str | None
    image: dict[str, np.ndarray]  # input name -> (C, Z, Y, X)
    truth: np.ndarray  # label map in the card's segmentation class indices


@dataclass
class OptionResult:
    window: Window
    gate: gate.GateResult | None = None
    seconds_per_volume: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.window.to_dict(), "gate": self.gate.to_dict() if self.gate else None,
                "seconds_per_volume": None if self.seconds_per_volume is None else round(self.seconds_per_volume, 3),
                "error": self.error}


@dataclass
class WindowResult:
    """The chosen window for the selected candidate, with every option tried and its figures."""

    chosen: Window
    reference: Window
    cases: list[dict[str, Any]]
    volume_shape: list[int]
    options: list[OptionResult] = field(default_factory=list)
    reference_seconds_per_volume: float | None = None

    @property
    def chosen_option(self) -> OptionResult | None:
        return next((o for o in self.options if o.window == self.chosen), None)

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen_option
        return {"chosen": self.chosen.to_dict(), "reference": self.reference.to_dict(), "cases": self.cases,
                "volume_shape": self.volume_shape, "gate": chosen.gate.to_dict() if chosen and chosen.gate else None,
                "reference_seconds_per_volume": None if self.reference_seconds_per_volume is None
                else round(self.reference_seconds_per_volume, 3),
                "options": [o.to_dict() for o in self.options]}


# ------------------------------------------------------------------------------------------------ cases


def _render_volume(card: ModelCard, seed: int, lesion: str | None) -> VolumeCase:
    """The seed's whole abdomen rendered on a grid of about the card's spacing (what stage 1 sees after
    the pipeline resamples a series), normalised by the pipeline's own code."""
    from edgescreen.models.phantom import ct

    pre = card.preprocessing
    assert pre.target_spacing_mm is not None
    probe = ct.generate_ct_volume(seed, lesion, matrix=48, slices=48)
    dz, _, dx = (float(s) for s in probe.spacing_mm)
    extent_z, fov = probe.hu.shape[0] * dz, probe.hu.shape[2] * dx
    matrix = max(16, int(round(fov / pre.target_spacing_mm[2])))
    slices = max(8, int(round(extent_z / pre.target_spacing_mm[0])))
    ph = ct.generate_ct_volume(seed, lesion, slices=slices, matrix=matrix)
    hu = np.asarray(ph.hu, dtype=np.float32)
    spec = next(o for o in card.outputs if o.kind == "segmentation")
    organ_ids = {"background": 0, **{k.lower(): v for k, v in ct.ORGAN_LABELS.items()}}
    lut = np.zeros(256, dtype=np.uint8)
    for index, name in enumerate(c.lower() for c in spec.classes):
        if name in organ_ids:
            lut[organ_ids[name]] = index
    image = {inp.name: normalize(hu, pre.normalization)[None] for inp in card.inputs}  # 'ct' only: volume_cases
    return VolumeCase(seed, lesion, image, lut[np.asarray(ph.labels)])


VolumeBuilder = Callable[[ModelCard, int, "str | None"], VolumeCase]


def volume_cases(card: ModelCard, n: int, cache_dir: Path | None = None,
                 builder: VolumeBuilder | None = None) -> list[VolumeCase]:
    """``n`` held-out volumes: a third normal, the rest with lesions of every class in turn (phantom volumes
    cached as .npz; tests pass their own builder)."""
    if builder is None and any(list(inp.channels) != ["ct"] for inp in card.inputs):
        log.info("no phantom volumes for a model that takes more than the CT; the card's window is kept",
                 role=card.role, channels=[list(i.channels) for i in card.inputs])
        return []
    out = []
    seed = VOLUME_SEED_BASE
    while len(out) < n and seed < VOLUME_SEED_BASE + 10 * n + 10:
        i = len(out)
        lesion = None if i % 3 == 0 else LESION_CLASSES[(i - i // 3 - 1) % len(LESION_CLASSES)]
        try:
            out.append(builder(card, seed, lesion) if builder is not None else _cached(card, seed, lesion, cache_dir))
        except ValueError as exc:  # the phantom refuses a lesion that does not fit this patient
            log.info("phantom refused a volume seed; using the next one", seed=seed, lesion=lesion, error=str(exc)[:120])
        seed += 1
    return out


def _cached(card: ModelCard, seed: int, lesion: str | None, cache_dir: Path | None) -> VolumeCase:
    if cache_dir is None:
        return _render_volume(card, seed, lesion)
    key = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{card.role}-volumes-{card.sha256 or card.version}"[:80])
    path = cache_dir / key / f"{seed}-{lesion or 'normal'}.npz"
    if path.is_file():
        with np.load(path) as z:
            return VolumeCase(seed, lesion, {k[3:]: z[k] for k in z.files if k.startswith("in.")}, z["truth"])
    case = _render_volume(card, seed, lesion)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, truth=case.truth, **{f"in.{k}": v for k, v in case.image.items()})
    os.replace(tmp, path)
    return case


# ---------------------------------------------------------------------------------------------- running


def predictor(session: Any, card: ModelCard) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """What the pipeline's StageModel.predict does: feed the card's inputs, activate each output as the card says."""
    from edgescreen.appliance.pipeline.activations import activate

    def predict(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raw = session.run({spec.name: inputs[spec.name].astype(spec.dtype, copy=False) for spec in card.inputs})
        return {spec.name: activate(np.asarray(raw[spec.name], dtype=np.float32), spec.activation)
                for spec in card.outputs}

    return predict


def window_spec(card: ModelCard, window: Window) -> WindowSpec:
    seg = tuple(o.name for o in card.outputs if o.kind in ("segmentation", "heatmap"))
    cls = tuple(o.name for o in card.outputs if o.kind == "classification")
    feat = tuple(o.name for o in card.outputs if o.kind == "features")
    return WindowSpec(window.patch, window.overlap, seg, cls, window.batch,
                      normalized_air(card.preprocessing.normalization), features=feat)


def run_volume(predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], card: ModelCard,
               image: dict[str, np.ndarray], window: Window) -> dict[str, np.ndarray]:
    return sliding_window(image, predict, window_spec(card, window))


def _compact(card: ModelCard, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep what the gate reads: the label map (not 8 float channels of a whole volume) and the features."""
    out = {}
    for spec in card.outputs:
        if spec.kind == "segmentation" and spec.activation == "softmax":
            out[spec.name] = np.argmax(outputs[spec.name], axis=0).astype(np.uint8)
        elif spec.kind == "segmentation":
            out[spec.name] = outputs[spec.name] > 0.5
        elif spec.kind == "features":
            out[spec.name] = np.asarray(outputs[spec.name], dtype=np.float32).reshape(-1)
    return out


def run_cases(predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], card: ModelCard,
              cases: Sequence[VolumeCase], window: Window) -> tuple[list[dict[str, np.ndarray]], float]:
    """Compact outputs per case and the mean seconds per volume."""
    outputs, start = [], time.perf_counter()
    for case in cases:
        outputs.append(_compact(card, run_volume(predict, card, case.image, window)))
    return outputs, (time.perf_counter() - start) / max(len(cases), 1)


# ------------------------------------------------------------------------------------------------- gate


def evaluate(card: ModelCard, cases: Sequence[VolumeCase], reference: Sequence[dict[str, np.ndarray]],
             candidate: Sequence[dict[str, np.ndarray]], thresholds: gate.Thresholds) -> gate.GateResult:
    """The per-tile gate's rules on whole volumes: Dice per class pooled over volumes, truth drop, and the
    in-domain flag rate of the study-wide features."""
    result = gate.GateResult(passed=True, heldout_cases=len(cases))
    for spec in card.outputs:
        if spec.kind == "segmentation" and spec.activation == "softmax":
            names = spec.classes[1:]
            vs_ref, ref_truth, cand_truth = gate.PooledDice(names), gate.PooledDice(names), gate.PooledDice(names)
            for case, ref, cand in zip(cases, reference, candidate, strict=True):
                r = np.stack([ref[spec.name] == c for c in range(1, len(spec.classes))])
                c_ = np.stack([cand[spec.name] == c for c in range(1, len(spec.classes))])
                t = np.stack([case.truth == c for c in range(1, len(spec.classes))])
                vs_ref.add(r, c_)
                ref_truth.add(r, t)
                cand_truth.add(c_, t)
            dice, worst = vs_ref.mean()
            result.dice_vs_fp32 = dice
            if worst is not None:
                result.dice_vs_fp32_worst_class = f"{spec.name}:{worst}={vs_ref.per_class()[worst]:.4f}"
            d_ref, d_cand = ref_truth.mean()[0], cand_truth.mean()[0]
            result.dice_vs_truth_fp32, result.dice_vs_truth = d_ref, d_cand
            if d_ref is not None and d_cand is not None:
                result.dice_vs_truth_drop = d_ref - d_cand
        elif spec.kind == "features":
            ref_f = [r[spec.name] for r in reference]
            cand_f = [c[spec.name] for c in candidate]
            result.features_rel_error, result.features_cosine_min = gate.features_drift(ref_f, cand_f)
            rates = gate.ood_flag_rates(card, spec.name, ref_f, cand_f)
            if rates is not None:
                result.ood_flag_rate, result.ood_flag_rate_fp32, result.ood_target_flag_rate = rates
    t = thresholds
    if result.dice_vs_fp32 is not None and result.dice_vs_fp32 < t.dice_vs_fp32_min:
        result.passed = False
        result.reasons.append(f"volume dice_vs_fp32 {result.dice_vs_fp32:.4f} (needs >= {t.dice_vs_fp32_min}; worst "
                              f"{result.dice_vs_fp32_worst_class})")
    if result.dice_vs_truth_drop is not None and result.dice_vs_truth_drop > t.dice_vs_truth_drop_max:
        result.passed = False
        result.reasons.append(f"volume dice_vs_truth_drop {result.dice_vs_truth_drop:.4f} "
                              f"(needs <= {t.dice_vs_truth_drop_max})")
    if result.ood_flag_rate is not None and not gate.flag_rate_ok(result.ood_flag_rate, result.ood_flag_rate_fp32 or 0.0,
                                                                  result.ood_target_flag_rate or 0.0):
        result.passed = False
        result.reasons.append(f"volume ood_flag_rate {result.ood_flag_rate:.4f} (needs <= "
                              f"{result.ood_target_flag_rate:.4f}; FP32 {result.ood_flag_rate_fp32:.4f})")
    if not len(cases):
        result.passed = False
        result.reasons.append("no held-out volumes")
    return result


# ----------------------------------------------------------------------------------------------- search


def options(card: ModelCard, batch: int, divisor: int = 16, extra: Sequence[Window] = ()) -> list[Window]:
    """The windows worth trying, cheapest expected first is not assumed: every one is gated and timed.

    The card's window at the best measured tiles-per-call; the card's patch doubled in-plane, and doubled
    on every axis (each a multiple of the network's divisor), at the card's overlap, one tile per call
    (a large tile fills both cores by itself); the card's patch at overlap 0.25.
    """
    base = Window.of_card(card, batch)
    z, y, x = base.patch

    def fit(v: int) -> int:
        return max(divisor, int(round(v / divisor)) * divisor)

    found = [base,
             Window((z, fit(2 * y), fit(2 * x)), base.overlap, 1),
             Window((fit(2 * z), fit(2 * y), fit(2 * x)), base.overlap, 1)]
    if base.overlap > 0.25:
        found.append(Window(base.patch, 0.25, batch))
    found += list(extra)
    unique: list[Window] = []
    for w in found:
        if w not in unique:
            unique.append(w)
    return unique


@dataclass
class Reference:
    """ONNX Runtime FP32 run as the card tiles: what every option is gated and timed against."""

    window: Window
    outputs: list[dict[str, np.ndarray]]
    seconds_per_volume: float


def reference_outputs(card: ModelCard, session: Any, cases: Sequence[VolumeCase]) -> Reference:
    win = Window.of_card(card, 1)
    outputs, seconds = run_cases(predictor(session, card), card, cases, win)
    return Reference(win, outputs, seconds)


def search(card: ModelCard, candidate_session: Any, cases: Sequence[VolumeCase], reference: Reference, *,
           batch: int, thresholds: gate.Thresholds, extra: Sequence[Window] = ()) -> WindowResult:
    """Gate and time every option with the candidate; choose the fastest that passes (the card's window at
    `batch` when none does, which then carries its failing figures for the report)."""
    result = WindowResult(chosen=Window.of_card(card, batch), reference=reference.window,
                          cases=[{"seed": c.seed, "lesion": c.lesion, "shape": list(c.truth.shape)} for c in cases],
                          volume_shape=list(cases[0].truth.shape) if cases else [],
                          reference_seconds_per_volume=reference.seconds_per_volume)
    predict = predictor(candidate_session, card)
    for win in options(card, batch, extra=extra):
        option = OptionResult(win)
        try:
            outputs, seconds = run_cases(predict, card, cases, win)
        except Exception as exc:  # noqa: BLE001 - a shape the artifact refuses is a finding, not a crash
            option.error = f"{type(exc).__name__}: {exc}"[:300]
            result.options.append(option)
            continue
        option.gate = evaluate(card, cases, reference.outputs, outputs, thresholds)
        option.seconds_per_volume = seconds
        result.options.append(option)
        log.info("window option", role=card.role, window=win.label, passed=option.gate.passed,
                 dice_vs_fp32=option.gate.dice_vs_fp32, seconds=round(seconds, 2))
    passing = [o for o in result.options if o.gate is not None and o.gate.passed and o.seconds_per_volume is not None]
    if passing:
        result.chosen = min(passing, key=lambda o: o.seconds_per_volume or 0.0).window
    return result
