"""The PANDA-style pancreas cascade as a chain of operators with explicit inputs and outputs.

    load -> stage1 (organs; pancreas = largest component) -> stage2 (crop; lesion + abnormality)
         -> stage3 (one crop per lesion; subtype) -> findings

Like a MONAI Deploy application, each operator names what it reads and writes in a shared context,
so the chain can be inspected, tested per operator and resumed: before each operator the gate is
asked (a safe point), and after each inference operator its result is saved in the checkpoint
directory, so a resumed job skips what is done. Stage 1 and, with a patch size, stage 2 also stop
between tile batches (see sliding_window). Every model is fed exactly what its card describes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.modelcard import ModelCard, OutputSpec, load_card, model_path, sha256_file
from edgescreen.appliance.pipeline import activations
from edgescreen.appliance.pipeline.checkpoint import CheckpointStore, Gate, check_gate
from edgescreen.appliance.pipeline.ctload import CtVolume, load_ct_series
from edgescreen.appliance.pipeline.preprocess import (
    AIR_HU,
    Grid,
    Reorientation,
    bbox,
    canonical_orientation,
    crop_box,
    map_to_grid,
    margin_box,
    normalize,
    normalized_air,
    resample,
    sample_box,
    zoomed_grid,
)
from edgescreen.appliance.pipeline.sliding_window import WindowSpec, sliding_window

log = get_logger("edgescreen.appliance.pipeline.pancreas")

PIPELINE_VERSION = "pancreas-cascade/1"
ROLES = ("pancreas.stage1", "pancreas.stage2", "pancreas.stage3")
Progress = Callable[[str, float], None]
_FULL = ndimage.generate_binary_structure(3, 3)  # 26-connectivity: diagonal neighbours belong together


class PipelineError(RuntimeError):
    """A model or card that the cascade cannot use (not the input's fault): the message says which."""


# ----------------------------------------------------------------------------------------------
# models


@dataclass
class StageModel:
    """A card plus a loaded runtime session; `predict` returns activated outputs by name."""

    role: str
    card: ModelCard
    session: Any
    sha256: str
    backend: str
    precision: str
    device: str
    batch_size: int = 1
    window: tuple[tuple[int, int, int], float] | None = None  # the bundle's (patch, overlap); None: the card's
    refused: list[dict[str, str]] = field(default_factory=list)  # runtime choices refused before this one

    def ref(self) -> dict[str, Any]:
        ref: dict[str, Any] = {"role": self.role, "name": self.card.name, "version": self.card.version,
                               "sha256": self.sha256, "backend": self.backend, "precision": self.precision,
                               "device": self.device}
        if self.refused:  # the model does not run as the bundle asked: say why, in every result it makes
            ref["refused"] = self.refused
        return ref

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {spec.name: inputs[spec.name].astype(spec.dtype, copy=False) for spec in self.card.inputs}
        raw = self.session.run(feed)
        return {spec.name: activate(np.asarray(raw[spec.name], dtype=np.float32), spec) for spec in self.card.outputs}


def activate(values: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """The card's activation over the class axis (1), as training computed it (float32)."""
    return activations.activate(values, spec.activation)


_SHA_CACHE: dict[tuple[str, float, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a model file, cached by path, mtime and size (models are large; results must name them)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime, st.st_size)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def load_stage_model(role: str, card_path: Path, *, artifact: Path | None = None, backend: str = "onnxruntime",
                     precision: str = "fp32", device: str = "CPU", threads: int | None = None,
                     batch_size: int = 1, profile_candidates: Sequence[Any] = (),
                     window: dict[str, Any] | None = None) -> StageModel:
    """Load one role's card and model; `artifact` (from a bundle) replaces the card's own ONNX file.

    Loading goes through appliance.runtime.select: should the bundle's artifact fail to load, the hardware
    profile's candidates and then ONNX Runtime FP32 run the card's reference model, and the refusals are
    kept on the StageModel (its `ref()` puts them in the findings). `window` is a tiled model's window
    from the bundle (patch, overlap, tiles per call), gated there on whole volumes; it applies only to
    the bundle's own artifact.
    """
    from edgescreen.appliance.runtime.select import Choice, load_model

    card = load_card(card_path, verify_file=artifact is None)  # a bundle's card names the FP32 file, not its artifact
    if card.role != role:
        raise PipelineError(f"{card_path}: card role is {card.role!r}, expected {role!r}")
    reference = model_path(card_path, card)
    if not reference.is_file():
        raise PipelineError(f"{role}: model file {reference} does not exist")
    path = Path(artifact) if artifact is not None else reference
    first = Choice("bundle" if artifact is not None else "requested", backend, device, precision, path)
    loaded = load_model(role, reference=reference, first=first, profile_candidates=profile_candidates, threads=threads)
    fixed = card.inputs[0].shape[0]
    chosen = loaded.choice
    tiled = window if window and chosen == first and artifact is not None else None
    batch = int(tiled.get("batch") or batch_size) if tiled else batch_size
    return StageModel(role, card, loaded.session, file_sha256(chosen.artifact), chosen.backend, chosen.precision,
                      chosen.device, fixed if isinstance(fixed, int) else max(1, batch),
                      (tuple(tiled["patch"]), float(tiled["overlap"])) if tiled else None,  # type: ignore[arg-type]
                      [r.to_json() for r in loaded.refusals])


# ----------------------------------------------------------------------------------------------
# stage plumbing


def _output(card: ModelCard, kind: str) -> OutputSpec | None:
    return next((o for o in card.outputs if o.kind == kind), None)


def _channel_stack(card: ModelCard, channels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Assemble each input tensor (C, Z, Y, X) from named channels, in the order the card lists them."""
    out = {}
    for spec in card.inputs:
        missing = [c for c in spec.channels if c not in channels]
        if missing:
            raise PipelineError(f"{card.role}: card asks for channel(s) {missing}; this stage provides {sorted(channels)}")
        out[spec.name] = np.stack([channels[c].astype(np.float32, copy=False) for c in spec.channels])
    return out


def _infer(model: StageModel, image: dict[str, np.ndarray], *, pad_value: float, gate: Gate | None,
           safe_point: str, store: CheckpointStore, progress: Callable[[float], None] | None) -> dict[str, np.ndarray]:
    """Sliding window when the card has a patch size, else one pass over the whole (crop) array."""
    pre = model.card.preprocessing
    seg = tuple(o.name for o in model.card.outputs if o.kind in ("segmentation", "heatmap"))
    cls = tuple(o.name for o in model.card.outputs if o.kind == "classification")
    feat = tuple(o.name for o in model.card.outputs if o.kind == "features")
    if pre.patch_size is not None:
        patch, overlap = model.window or (tuple(pre.patch_size), pre.overlap)
        spec = WindowSpec(patch, overlap, seg, cls, model.batch_size, pad_value, feat)  # type: ignore[arg-type]
        return sliding_window(image, model.predict, spec, gate=gate, safe_point=safe_point, store=store,
                              progress=progress)
    outputs = model.predict({k: v[None] for k, v in image.items()})
    return {k: v[0] for k, v in outputs.items()}


def _features(card: ModelCard, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The card's features outputs (F,) from one stage's outputs: what the domain gate's OOD score reads."""
    return {o.name: np.asarray(outputs[o.name], dtype=np.float32).reshape(-1) for o in card.outputs
            if o.kind == "features" and o.name in outputs}


def _class_index(spec: OutputSpec, name: str) -> int | None:
    return spec.classes.index(name) if name in spec.classes else None


def _probability_map(card: ModelCard, outputs: dict[str, np.ndarray], class_name: str) -> np.ndarray | None:
    spec = _output(card, "segmentation")
    if spec is None:
        return None
    index = _class_index(spec, class_name)
    return None if index is None else outputs[spec.name][index]


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=_FULL)
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


# ----------------------------------------------------------------------------------------------
# stage results (what a checkpoint holds)


@dataclass
class Stage1Result:
    grid: Grid
    labels: np.ndarray  # uint8 argmax on the stage-1 grid
    pancreas: np.ndarray  # bool, largest connected pancreas component
    classes: list[str]
    seconds: float
    features: dict[str, np.ndarray] = field(default_factory=dict)  # features outputs, (F,) each

    def dump(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return ({"labels": self.labels, "pancreas": self.pancreas, **{f"features/{k}": v for k, v in self.features.items()}},
                {"grid": self.grid.to_json(), "classes": self.classes, "seconds": self.seconds})

    @classmethod
    def restore(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Stage1Result:
        return cls(Grid.from_json(meta["grid"]), arrays["labels"], arrays["pancreas"].astype(bool), meta["classes"],
                   float(meta["seconds"]), {k[9:]: v for k, v in arrays.items() if k.startswith("features/")})


@dataclass
class Stage2Result:
    grid: Grid | None  # the crop grid; None when there was no pancreas to crop
    lesion_probability: np.ndarray | None
    components: np.ndarray | None  # int16 lesion labels 1..n on the crop grid (0 = none)
    abnormal_probability: float | None
    seconds: float
    warnings: list[str] = field(default_factory=list)
    features: dict[str, np.ndarray] = field(default_factory=dict)

    def dump(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"features/{k}": v for k, v in self.features.items()}
        if self.lesion_probability is not None:
            arrays["lesion_probability"] = self.lesion_probability
        if self.components is not None:
            arrays["components"] = self.components
        return arrays, {"grid": self.grid.to_json() if self.grid else None, "abnormal": self.abnormal_probability,
                        "seconds": self.seconds, "warnings": self.warnings}

    @classmethod
    def restore(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Stage2Result:
        grid = Grid.from_json(meta["grid"]) if meta["grid"] else None
        return cls(grid, arrays.get("lesion_probability"), arrays.get("components"), meta["abnormal"],
                   float(meta["seconds"]), list(meta["warnings"]),
                   {k[9:]: v for k, v in arrays.items() if k.startswith("features/")})

    @property
    def n_lesions(self) -> int:
        return 0 if self.components is None else int(self.components.max(initial=0))


@dataclass
class CascadeSettings:
    """Operating choices that are not the card's: they are part of the checkpoint key."""

    threshold: float | None = None  # None: the stage-2 card's decision threshold
    min_lesion_mm3: float = 30.0
    max_lesions: int = 5
    lesion_probability: float = 0.5  # voxel threshold on the stage-2 lesion map

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "min_lesion_mm3": self.min_lesion_mm3, "max_lesions": self.max_lesions,
                "lesion_probability": self.lesion_probability}


# ----------------------------------------------------------------------------------------------
# operators


@dataclass
class Context:
    """What every operator may use besides its declared inputs: models, gate, checkpoint, progress."""

    models: dict[str, StageModel]
    settings: CascadeSettings
    store: CheckpointStore
    gate: Gate | None
    progress: Progress | None
    log: Any

    def report(self, stage: str, fraction: float) -> None:
        if self.progress is not None:
            self.progress(stage, fraction)


def _threshold(ctx: Context) -> float:
    if ctx.settings.threshold is not None:
        return float(ctx.settings.threshold)
    decision = ctx.models["pancreas.stage2"].card.decision
    if decision is None:
        raise PipelineError("pancreas.stage2: the card has no decision threshold; pass one (--threshold)")
    return float(decision.threshold)


def op_stage1(ctx: Context, hu: np.ndarray, grid: Grid) -> dict[str, Any]:
    """Organ segmentation on the whole volume at the card's spacing; the pancreas is its largest component."""
    t0 = time.perf_counter()
    model = ctx.models["pancreas.stage1"]
    pre = model.card.preprocessing
    spacing = pre.target_spacing_mm or grid.spacing
    volume, grid1 = resample(hu, grid, spacing)
    image = _channel_stack(model.card, {"ct": normalize(volume, pre.normalization)})
    del volume
    outputs = _infer(model, image, pad_value=normalized_air(pre.normalization), gate=ctx.gate,
                     safe_point="pancreas.stage1.tiles", store=ctx.store,
                     progress=lambda f: ctx.report("stage1", f))
    spec = _output(model.card, "segmentation")
    if spec is None:
        raise PipelineError("pancreas.stage1: the card has no segmentation output")
    labels = np.argmax(outputs[spec.name], axis=0).astype(np.uint8)
    index = _class_index(spec, "pancreas")
    if index is None:
        raise PipelineError(f"pancreas.stage1: segmentation classes {spec.classes} have no 'pancreas'")
    result = Stage1Result(grid1, labels, largest_component(labels == index), list(spec.classes),
                          time.perf_counter() - t0, _features(model.card, outputs))
    return {"stage1": result}


def _stage2_box(model: StageModel, s1: Stage1Result, grid: Grid) -> tuple[Grid, tuple[int, ...], tuple[int, ...]]:
    """The stage-2 zoomed grid and the crop box on it: fixed crop_size around the pancreas, or bbox + margin."""
    pre = model.card.preprocessing
    zgrid = zoomed_grid(grid, pre.target_spacing_mm or grid.spacing)
    lo, hi = bbox(s1.pancreas)  # type: ignore[misc]
    corners = s1.grid.to_lps(np.stack([lo, hi]))
    zidx = zgrid.to_index(corners)
    if pre.crop_size is not None:
        centre = np.rint((zidx[0] + zidx[1]) / 2).astype(int)
        return zgrid, crop_box(centre, pre.crop_size), tuple(pre.crop_size)
    start, size = margin_box(zidx[0], zidx[1], zgrid, pre.crop_margin_mm or [20.0, 20.0, 20.0])
    return zgrid, start, size


def _mask_channel(mask: np.ndarray, grid: Grid, target: Grid) -> np.ndarray:
    block, where = map_to_grid(mask.astype(np.uint8), grid, target, order=0)
    out = np.zeros(target.shape, dtype=np.float32)
    if block.size:
        out[where] = block
    return out


def stage1_mask_channels(card: ModelCard, stage1: Stage1Result, target: Grid) -> dict[str, np.ndarray]:
    """Every "<class>_mask" input channel the card asks for, on the target grid (see modelcard.CHANNELS_DOC).

    "pancreas_mask" is stage 1's pancreas after keeping its largest component; any other class is the raw
    argmax label. Only the channels the card names are built.
    """
    out: dict[str, np.ndarray] = {}
    for spec in card.inputs:
        for channel in spec.channels:
            if not channel.endswith("_mask") or channel == "lesion_mask" or channel in out:
                continue
            name = channel[: -len("_mask")]
            if name == "pancreas":
                mask = stage1.pancreas
            elif name in stage1.classes:
                mask = stage1.labels == stage1.classes.index(name)
            else:
                raise PipelineError(f"{card.role}: input channel {channel!r} names {name!r}, not a class of stage 1 "
                                    f"({', '.join(stage1.classes)})")
            out[channel] = _mask_channel(mask, stage1.grid, target)
    return out


def _lesion_components(prob: np.ndarray, grid: Grid, settings: CascadeSettings) -> tuple[np.ndarray, int]:
    """Connected lesion components above the minimum size, labelled 1..n by decreasing volume."""
    labels, n = ndimage.label(prob >= settings.lesion_probability, structure=_FULL)
    out = np.zeros(prob.shape, dtype=np.int16)
    if n == 0:
        return out, 0
    sizes = np.bincount(labels.ravel())[1:]
    min_voxels = settings.min_lesion_mm3 / float(np.prod(grid.spacing))
    keep = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_voxels][: settings.max_lesions]
    for new, old in enumerate(keep, start=1):
        out[labels == old] = new
    return out, len(keep)


def op_stage2(ctx: Context, hu: np.ndarray, grid: Grid, stage1: Stage1Result) -> dict[str, Any]:
    """Lesion segmentation and the abnormality score on a crop around the pancreas."""
    t0 = time.perf_counter()
    if not stage1.pancreas.any():
        warning = "stage 1 found no pancreas: no lesion analysis was possible"
        return {"stage2": Stage2Result(None, None, None, None, time.perf_counter() - t0, [warning])}
    model = ctx.models["pancreas.stage2"]
    pre = model.card.preprocessing
    zgrid, start, size = _stage2_box(model, stage1, grid)
    crop_grid = zgrid.sub(start, size)
    ct = sample_box(hu, grid, zgrid, start, size, order=1, fill=AIR_HU)
    channels = {"ct": normalize(ct, pre.normalization), **stage1_mask_channels(model.card, stage1, crop_grid)}
    outputs = _infer(model, _channel_stack(model.card, channels), pad_value=normalized_air(pre.normalization),
                     gate=ctx.gate, safe_point="pancreas.stage2.tiles", store=ctx.store,
                     progress=lambda f: ctx.report("stage2", f))
    prob = _probability_map(model.card, outputs, "lesion")
    if prob is None:
        raise PipelineError("pancreas.stage2: the segmentation output has no 'lesion' class")
    abnormal = _abnormal_probability(model.card, outputs, prob)
    warnings: list[str] = []
    components = np.zeros(prob.shape, dtype=np.int16)
    if abnormal >= _threshold(ctx):
        components, n = _lesion_components(prob, crop_grid, ctx.settings)
        if n == 0:
            warnings.append("stage 2 scored the pancreas abnormal but segmented no lesion above the minimum size")
    return {"stage2": Stage2Result(crop_grid, prob.astype(np.float32), components, abnormal,
                                   time.perf_counter() - t0, warnings, _features(model.card, outputs))}


def _abnormal_probability(card: ModelCard, outputs: dict[str, np.ndarray], prob: np.ndarray) -> float:
    decision = card.decision
    if decision is not None and decision.output in outputs:
        spec = card.output(decision.output)
        values = np.asarray(outputs[decision.output], dtype=np.float32)
        index = spec.classes.index(decision.class_name)
        return float(values.reshape(len(spec.classes), -1)[index].max())
    return float(prob.max(initial=0.0))  # no classification head: the strongest lesion voxel


def op_stage3(ctx: Context, hu: np.ndarray, grid: Grid, stage1: Stage1Result, stage2: Stage2Result) -> dict[str, Any]:
    """Subtype probabilities for every lesion from a lesion-centred crop (one safe point per lesion)."""
    model = ctx.models["pancreas.stage3"]
    spec = _output(model.card, "classification")
    if spec is None:
        raise PipelineError("pancreas.stage3: the card has no classification output")
    results: list[dict[str, float]] = []
    seconds = 0.0
    for k in range(1, stage2.n_lesions + 1):
        name = f"pancreas.stage3.lesion_{k}"
        saved = ctx.store.load(name)
        if saved is not None:
            results.append({c: float(p) for c, p in zip(spec.classes, saved[0]["probabilities"], strict=True)})
            seconds += float(saved[1]["seconds"])
            continue
        check_gate(ctx.gate, name)
        t0 = time.perf_counter()
        probs = _classify_lesion(model, hu, grid, stage1, stage2, k)
        elapsed = time.perf_counter() - t0
        ctx.store.save(name, {"probabilities": probs}, {"seconds": elapsed})
        results.append({c: float(p) for c, p in zip(spec.classes, probs, strict=True)})
        seconds += elapsed
        ctx.report("stage3", k / stage2.n_lesions)
    return {"stage3": {"subtypes": results, "seconds": seconds}}


def _classify_lesion(model: StageModel, hu: np.ndarray, grid: Grid, stage1: Stage1Result, stage2: Stage2Result,
                     k: int) -> np.ndarray:
    pre = model.card.preprocessing
    if pre.crop_size is None:
        raise PipelineError("pancreas.stage3: the card needs a crop_size (a lesion-centred box)")
    if stage2.grid is None or stage2.components is None:
        raise PipelineError(f"pancreas.stage3: stage 2 reported lesion {k} without a lesion map to crop it from")
    zgrid = zoomed_grid(grid, pre.target_spacing_mm or grid.spacing)
    lo, hi = bbox(stage2.components == k)  # type: ignore[misc]
    centre = np.rint(zgrid.to_index(stage2.grid.to_lps((lo + hi) / 2.0))).astype(int)
    start, size = crop_box(centre, pre.crop_size), tuple(pre.crop_size)
    box_grid = zgrid.sub(start, size)
    ct = sample_box(hu, grid, zgrid, start, size, order=1, fill=AIR_HU)
    channels = {"ct": normalize(ct, pre.normalization),
                "lesion_mask": _mask_channel(stage2.components == k, stage2.grid, box_grid),
                **stage1_mask_channels(model.card, stage1, box_grid)}
    outputs = model.predict({k2: v[None] for k2, v in _channel_stack(model.card, channels).items()})
    spec = _output(model.card, "classification")
    if spec is None:
        raise PipelineError(f"{model.card.role}: the card declares no classification output; stage 3 needs one")
    return np.asarray(outputs[spec.name], dtype=np.float32).reshape(-1)


# ----------------------------------------------------------------------------------------------
# measurements


def _points(mask: np.ndarray, grid: Grid) -> np.ndarray:
    return grid.to_lps(np.argwhere(mask))


def longest_diameter_mm(points: np.ndarray) -> float:
    """Largest distance between two voxel centres of a lesion (3D, physical space)."""
    if len(points) < 2:
        return 0.0
    candidates = points
    if len(points) > 64:
        try:
            from scipy.spatial import ConvexHull

            candidates = points[ConvexHull(points).vertices]
        except Exception:  # flat or degenerate lesions (qhull refuses them): a subsample is close enough
            candidates = points[:: max(1, len(points) // 2000)]
    diff = candidates[:, None, :] - candidates[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).max())


@dataclass(frozen=True)
class PancreasAxis:
    """The gland's principal axis, oriented from the patient's right (head) to left (tail)."""

    centre: np.ndarray
    axis: np.ndarray
    t_min: float
    t_max: float

    def location(self, point: np.ndarray) -> str:
        t = float(np.dot(point - self.centre, self.axis))
        f = (t - self.t_min) / max(self.t_max - self.t_min, 1e-6)
        return "head" if f < 1 / 3 else ("body" if f < 2 / 3 else "tail")


def pancreas_axis(points: np.ndarray) -> PancreasAxis:
    centre = points.mean(axis=0)
    _, _, vt = np.linalg.svd(points - centre, full_matrices=False)
    axis = vt[0] if vt[0][0] >= 0 else -vt[0]  # LPS +x is the patient's left: head (right) comes first
    t = (points - centre) @ axis
    return PancreasAxis(centre, axis, float(t.min()), float(t.max()))


def measure(stage1: Stage1Result, stage2: Stage2Result, stage3: dict[str, Any]) -> dict[str, Any]:
    """Organ volumes, pancreas volume and the lesion list of the findings document."""
    voxel = stage1.grid.voxel_ml
    counts = np.bincount(stage1.labels.ravel(), minlength=len(stage1.classes))
    organs = {name: round(float(counts[i]) * voxel, 3) for i, name in enumerate(stage1.classes) if name != "background"}
    pancreas_ml = round(float(stage1.pancreas.sum()) * voxel, 3)
    lesions = []
    if stage2.n_lesions and stage2.grid is not None and stage2.components is not None:
        gland = pancreas_axis(_points(stage1.pancreas, stage1.grid))
        for k in range(1, stage2.n_lesions + 1):
            mask = stage2.components == k
            pts = _points(mask, stage2.grid)
            subtypes = stage3["subtypes"][k - 1] if k - 1 < len(stage3["subtypes"]) else {}
            top = max(subtypes, key=subtypes.get) if subtypes else None  # type: ignore[arg-type]
            lesions.append({
                "id": f"lesion_{k}",
                "location": gland.location(pts.mean(axis=0)),
                "centre_lps_mm": [round(float(v), 2) for v in pts.mean(axis=0)],
                "longest_diameter_mm": round(longest_diameter_mm(pts), 2),
                "volume_ml": round(float(mask.sum()) * stage2.grid.voxel_ml, 4),
                "abnormal_probability": round(float(stage2.lesion_probability[mask].max()), 6)  # type: ignore[index]
                if stage2.lesion_probability is not None else 0.0,
                "subtype_probabilities": {c: round(p, 6) for c, p in subtypes.items()},
                "top_subtype": top,
                "top_subtype_probability": round(subtypes[top], 6) if top else None,
            })
    return {"organs": organs, "pancreas_volume_ml": pancreas_ml if stage1.pancreas.any() else None, "lesions": lesions}


# ----------------------------------------------------------------------------------------------
# the chain


@dataclass(frozen=True)
class Operator:
    """One step of the chain: reads `inputs` from the context, returns exactly `outputs`."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    run: Callable[..., dict[str, Any]]
    restore: Callable[[dict[str, np.ndarray], dict[str, Any]], Any] | None = None  # checkpointed when set


CHAIN: tuple[Operator, ...] = (
    Operator("pancreas.stage1", ("hu", "grid"), ("stage1",), op_stage1, Stage1Result.restore),
    Operator("pancreas.stage2", ("hu", "grid", "stage1"), ("stage2",), op_stage2, Stage2Result.restore),
    Operator("pancreas.stage3", ("hu", "grid", "stage1", "stage2"), ("stage3",), op_stage3),
)


def _run_operator(op: Operator, ctx: Context, values: dict[str, Any]) -> None:
    if op.restore is not None:
        saved = ctx.store.load(op.name)
        if saved is not None:
            values[op.outputs[0]] = op.restore(*saved)
            ctx.log.info("stage restored from checkpoint", stage=op.name)
            return
    check_gate(ctx.gate, op.name)
    produced = op.run(ctx, **{name: values[name] for name in op.inputs})
    if set(produced) != set(op.outputs):
        raise PipelineError(f"operator {op.name} produced {sorted(produced)}, declared {list(op.outputs)}")
    values.update(produced)
    if op.restore is not None:
        ctx.store.save(op.name, *produced[op.outputs[0]].dump())
        ctx.store.drop(f"{op.name}.tiles")
    ctx.log.info("stage done", stage=op.name)


@dataclass
class CanonicalCt:
    """The loaded series and its LPS-canonical view (no copy): what the operators and outputs share."""

    volume: CtVolume
    reorientation: Reorientation
    grid: Grid

    @property
    def hu(self) -> np.ndarray:
        return self.reorientation.apply(self.volume.hu)

    @property
    def source_grid(self) -> Grid:
        """The source slices' grid (sorted order): the volume's grid with one slice per source image."""
        v = self.volume
        return Grid.make((len(v.slices), *v.hu.shape[1:]), v.spacing_mm, v.origin, v.direction)

    @property
    def slice_uids(self) -> list[str]:
        """Per source slice (sorted order): its SOPInstanceUID, with the frame number for a multi-frame image."""
        v = self.volume
        return [v.sop_instance_uids[s.dataset_index] + (f"#{s.frame + 1}" if s.frame is not None else "")
                for s in v.slices]

    def to_source(self, canonical: np.ndarray) -> np.ndarray:
        """A canonical-grid array back onto the source slices, in the sorted order of the datasets."""
        return np.ascontiguousarray(self.volume.to_source_grid(self.reorientation.invert(canonical)))


def load_canonical(paths: list[Path], *, progress: Progress | None = None, **load_args: Any) -> CanonicalCt:
    volume = load_ct_series(paths, progress=(lambda f: progress("load", f)) if progress else None, **load_args)
    grid0 = Grid.make(volume.hu.shape, volume.spacing_mm, volume.origin, volume.direction)
    try:
        reo, grid, oblique = canonical_orientation(grid0)
    except ValueError as exc:
        from edgescreen.appliance.pipeline.ctload import SeriesError

        raise SeriesError(f"{exc}; need an axial, coronal or sagittal CT series") from exc
    if oblique > 10.0:
        volume.warnings.append(f"series is {oblique:.0f} degrees oblique to the patient axes; analysed as if aligned")
    return CanonicalCt(volume, reo, grid)


def checkpoint_key(ct: CanonicalCt, models: dict[str, StageModel], settings: CascadeSettings) -> dict[str, Any]:
    """What a checkpoint is valid for: these images, these models, these settings, this pipeline."""
    sops = hashlib.sha256("|".join(ct.volume.sop_instance_uids).encode())  # from the loader: no header re-parse
    return {"pipeline": PIPELINE_VERSION, "series": ct.volume.series_uid, "images": sops.hexdigest(),
            "models": {role: m.sha256 for role, m in sorted(models.items())}, "settings": settings.to_json()}


@dataclass
class CascadeResult:
    ct: CanonicalCt
    stage1: Stage1Result
    stage2: Stage2Result
    stage3: dict[str, Any]
    measurements: dict[str, Any]
    threshold: float
    timings: dict[str, float]
    warnings: list[str]
    in_domain: bool = True  # set by the validated-domain gate: outside it there is no all-clear

    @property
    def triage(self) -> str:
        if self.stage2.abnormal_probability is None or not self.in_domain:
            return "indeterminate"
        return "suspicious" if self.stage2.abnormal_probability >= self.threshold else "not_suspicious"


def run_cascade(ct: CanonicalCt, models: dict[str, StageModel], *, settings: CascadeSettings | None = None,
                checkpoint_dir: Path | None = None, gate: Gate | None = None,
                progress: Progress | None = None) -> CascadeResult:
    """Run (or resume) the chain on a loaded series; raise `Preempted` when the gate says stop."""
    settings = settings or CascadeSettings()
    missing = [r for r in ROLES if r not in models]
    if missing:
        raise PipelineError(f"missing model(s) for {missing}")
    bound = log.bind(study=ct.volume.study_uid, series=ct.volume.series_uid)
    store = CheckpointStore(checkpoint_dir, checkpoint_key(ct, models, settings))
    ctx = Context(models, settings, store, gate, progress, bound)
    values: dict[str, Any] = {"hu": ct.hu, "grid": ct.grid}
    for op in CHAIN:
        _run_operator(op, ctx, values)
    s1, s2, s3 = values["stage1"], values["stage2"], values["stage3"]
    timings = {"stage1": s1.seconds, "stage2": s2.seconds, "stage3": s3["seconds"]}
    return CascadeResult(ct, s1, s2, s3, measure(s1, s2, s3), _threshold(ctx), timings,
                         list(ct.volume.warnings) + list(s2.warnings))


# ----------------------------------------------------------------------------------------------
# masks for outputs


def _canonical_mask(values: np.ndarray, grid: Grid, target: Grid) -> np.ndarray:
    """A 0/1 mask on a stage grid, interpolated linearly onto the canonical grid and cut at 0.5 (smooth).

    Only the mask's bounding box (plus one voxel) is resampled: a pancreas is a few percent of a scan.
    """
    out = np.zeros(target.shape, dtype=np.uint8)
    box = bbox(values)
    if box is None:
        return out
    lo = np.maximum(box[0] - 1, 0)
    hi = np.minimum(box[1] + 2, np.asarray(values.shape))
    sub = values[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))].astype(np.float32)
    block, where = map_to_grid(sub, grid.sub(lo, sub.shape), target, order=1)
    if block.size:
        out[where] = block >= 0.5
    return out


def canonical_masks(result: CascadeResult) -> dict[str, np.ndarray]:
    """uint8 masks on the canonical full-resolution grid: "pancreas" and "lesion_1", "lesion_2", ..."""
    grid = result.ct.grid
    masks: dict[str, np.ndarray] = {}
    if result.stage1.pancreas.any():
        masks["pancreas"] = _canonical_mask(result.stage1.pancreas, result.stage1.grid, grid)
    s2 = result.stage2
    if s2.components is not None and s2.grid is not None:
        for k in range(1, s2.n_lesions + 1):
            masks[f"lesion_{k}"] = _canonical_mask(s2.components == k, s2.grid, grid)
    return masks
