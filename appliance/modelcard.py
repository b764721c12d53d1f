"""The model contract: one card per model, reference or a clinic's own.

A clinic replaces a reference model by dropping in an ONNX file and a card that says how to feed it
(spacing, orientation, intensity normalisation, patch size) and how to read it (outputs, classes).
The pipeline reads only the card, so no code changes when the model changes. Cards are validated on
load; an unknown key or a wrong type is refused with the key, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1

# Input channels: "ct" (the CT, normalised as the card says), "mammogram", "lesion_mask" (the lesion
# being classified, stage 3), or "<class>_mask": the binary mask of a class of stage 1's segmentation
# output ("pancreas_mask" is stage 1's pancreas, its largest component; "liver_mask", ...), cropped and
# resampled onto the same grid as the CT channel with nearest-neighbour interpolation, values 0.0 / 1.0.
CHANNELS_DOC = ("a channel is 'ct', 'mammogram', 'lesion_mask' or '<class>_mask' with <class> a class of "
                "stage 1's segmentation output (e.g. 'pancreas_mask')")
_CHANNEL = re.compile(r"ct|mammogram|lesion_mask|[a-z][a-z0-9_]*_mask")

Role = Literal["pancreas.stage1", "pancreas.stage2", "pancreas.stage3", "mammo"]
ROLES: tuple[str, ...] = ("pancreas.stage1", "pancreas.stage2", "pancreas.stage3", "mammo")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input tensor. Dims are ints (fixed) or names (dynamic), in the order `layout` names them."""

    name: str
    layout: Literal["NCDHW", "NCHW"]
    dtype: Literal["float32", "float16", "uint8", "int8"] = "float32"
    shape: list[int | str]
    channels: list[str] = Field(min_length=1, description=CHANNELS_DOC)

    @model_validator(mode="after")
    def _shape_matches_layout(self) -> TensorSpec:
        if len(self.shape) != len(self.layout):
            raise ValueError(f"shape {self.shape} has {len(self.shape)} dims but layout {self.layout} has {len(self.layout)}")
        if isinstance(self.shape[1], int) and self.shape[1] != len(self.channels):
            raise ValueError(f"shape says {self.shape[1]} channels but channels lists {len(self.channels)}")
        bad = [c for c in self.channels if not _CHANNEL.fullmatch(c)]
        if bad:
            raise ValueError(f"channel(s) {bad} unknown: {CHANNELS_DOC}")
        return self


class OutputSpec(_Strict):
    """How to read one output: what it is, which activation turns it into probabilities, what each index means.

    kind "features" is the model's own description of its input, (N, F): the deepest encoder features,
    globally average-pooled. It has no classes and no activation; the validated-domain gate measures how
    far a study's features lie from the training distribution (`domain.ood`).
    """

    name: str
    kind: Literal["segmentation", "classification", "heatmap", "features"]
    activation: Literal["softmax", "sigmoid", "none"]
    classes: list[str] = Field(default_factory=list)
    size: int | None = Field(default=None, ge=1, description="features: F, the length of one feature vector")

    @model_validator(mode="after")
    def _classes_fit_kind(self) -> OutputSpec:
        if self.kind == "features":
            if self.classes or self.activation != "none":
                raise ValueError("a features output has no classes and activation 'none'")
        elif not self.classes:
            raise ValueError(f"a {self.kind} output needs at least one class")
        elif self.size is not None:
            raise ValueError("size is for features outputs only")
        return self


class HuWindow(_Strict):
    type: Literal["hu_window"]
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> HuWindow:
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        return self


class ZScore(_Strict):
    type: Literal["zscore"]
    mean: float
    std: float = Field(gt=0)
    clip_low: float | None = None
    clip_high: float | None = None


class Percentile(_Strict):
    """Per-image percentile scaling to [0, 1]: robust to an unknown detector's bit depth (mammography)."""

    type: Literal["percentile"]
    low: float = Field(ge=0, le=100)
    high: float = Field(ge=0, le=100)


Normalization = Annotated[HuWindow | ZScore | Percentile, Field(discriminator="type")]


class Preprocessing(_Strict):
    """What the pipeline does to a series or image before the network sees it."""

    normalization: Normalization
    target_spacing_mm: list[float] | None = Field(default=None, description="(z, y, x) for 3D, (y, x) for 2D")
    orientation: Literal["LPS", "RAS", "mammo-chest-wall-left"] = "LPS"
    patch_size: list[int] | None = None
    overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    input_size_px: list[int] | None = Field(default=None, description="fixed (H, W) resize for 2D models")
    crop_margin_mm: list[float] | None = None
    crop_size: list[int] | None = Field(default=None, description="fixed crop (z, y, x) around a centre")


class Decision(_Strict):
    """The operating point a card ships with; the site config may override it."""

    output: str
    class_name: str
    threshold: float = Field(ge=0.0, le=1.0)
    meaning: str


class Interval(_Strict):
    """A closed range; an open end is None."""

    min: float | None = None
    max: float | None = None

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"[{lo}, {hi}]"


class StatisticRange(_Strict):
    """One intensity statistic of the training data: its distribution and the range accepted as in-domain."""

    mean: float
    std: float = Field(ge=0)
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> StatisticRange:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")
        return self


INTENSITY_STATISTICS: dict[str, tuple[str, ...]] = {
    # CT, on the body (the largest connected region above -500 HU), in HU unless a fraction
    "body": ("body_hu_p05", "body_hu_p25", "body_hu_p50", "body_hu_p75", "body_hu_p95", "fat_fraction",
             "soft_tissue_fraction", "bone_fraction", "metal_fraction", "noise_hu", "noise_texture", "body_area_fraction",
             "body_edge_fraction", "body_width_mm"),
    # mammography, on the breast (above the background), on the percentile-scaled image in [0, 1]
    "breast": ("breast_fraction", "breast_p25", "breast_p50", "breast_p75", "grey_levels"),
}


class IntensityDomain(_Strict):
    """Intensity statistics of the region the model sees, as measured on its training distribution."""

    region: Literal["body", "breast"]
    statistics: dict[str, StatisticRange] = Field(min_length=1)
    source: str = Field(min_length=1, description="the data the statistics were measured on")

    @model_validator(mode="after")
    def _known(self) -> IntensityDomain:
        unknown = sorted(set(self.statistics) - set(INTENSITY_STATISTICS[self.region]))
        if unknown:
            raise ValueError(f"unknown {self.region} statistic(s) {unknown}; known: {list(INTENSITY_STATISTICS[self.region])}")
        return self


class Relation(_Strict):
    """Where one organ's centre must lie relative to another's, in the patient's frame (LPS)."""

    subject: str
    relation: Literal["anterior_to", "posterior_to", "left_of", "right_of", "above", "below", "level_with"]
    reference: str
    margin_mm: float = Field(default=0.0, ge=0, description="level_with: the largest allowed axial distance")


class AnatomyDomain(_Strict):
    """Plausibility of a segmentation output's organs (stage 1): volumes, connectedness, relations."""

    output: str = Field(description="the segmentation output whose classes are checked")
    organ_volume_ml: dict[str, Interval] = Field(default_factory=dict)
    organ_hu_median: dict[str, Interval] = Field(
        default_factory=dict, description="median HU inside each organ: contrast raises it whatever the tags say")
    single_component: list[str] = Field(default_factory=list, description="organs that must be one component")
    component_min_fraction: float = Field(default=0.2, gt=0, le=1,
                                          description="a second component at least this fraction of the largest counts")
    relations: list[Relation] = Field(default_factory=list)
    present_at_level_of: dict[str, list[str]] = Field(
        default_factory=dict, description="organ -> organs that must appear on the axial slices through its centre")
    source: str = Field(min_length=1, description="where the ranges come from (published adult figures, ...)")


class OodDomain(_Strict):
    """A Mahalanobis distance on a features output, in a principal subspace of the training features.

    d2 = sum_k ((f - mean) . components[k])^2 / variances[k]  (+ |residual|^2 / residual_variance when
    the subspace is smaller than F). `threshold` is set so that at most the stated fraction of held-out
    in-domain studies exceed it.
    """

    output: str
    mean: list[float] = Field(min_length=1)
    components: list[list[float]] = Field(min_length=1)
    variances: list[float] = Field(min_length=1)
    residual_variance: float | None = Field(default=None, gt=0)
    threshold: float = Field(gt=0)
    calibration: str = Field(min_length=1, description="the in-domain set the threshold was set on")
    target_flag_rate: float = Field(default=0.01, gt=0, lt=1)

    @model_validator(mode="after")
    def _shapes(self) -> OodDomain:
        f = len(self.mean)
        if len(self.components) != len(self.variances):
            raise ValueError(f"{len(self.components)} components but {len(self.variances)} variances")
        if any(len(c) != f for c in self.components):
            raise ValueError(f"every component must have {f} values (the length of mean)")
        if any(v <= 0 for v in self.variances):
            raise ValueError("variances must be positive")
        if len(self.components) < f and self.residual_variance is None:
            raise ValueError("a subspace smaller than F needs residual_variance")
        return self


KERNEL_FAMILIES = ("soft", "standard", "sharp", "bone", "lung")
CONTRAST_PHASES = ("non_contrast", "arterial", "portal_venous", "delayed", "contrast_unspecified")


class Domain(_Strict):
    """The domain the model was validated on; a study outside it is triaged `indeterminate`, never clear."""

    modality: list[str] = Field(min_length=1)
    body_part: list[str] | None = Field(default=None, description="accepted BodyPartExamined values (when present)")
    slice_thickness_mm: Interval | None = None
    slice_spacing_mm: Interval | None = None
    pixel_spacing_mm: Interval | None = None
    kernel_family: list[Literal["soft", "standard", "sharp", "bone", "lung"]] | None = None
    contrast_phase: list[Literal["non_contrast", "arterial", "portal_venous", "delayed", "contrast_unspecified"]] | None = None
    detector_type: list[str] | None = Field(default=None, description="mammography: DetectorType values, FILM for digitised film")
    bits_stored: Interval | None = None
    intensity: IntensityDomain | None = None
    anatomy: AnatomyDomain | None = None
    ood: OodDomain | None = None
    source: str = Field(min_length=1, description="the data this domain describes")


class Contralateral(_Strict):
    """Read each image against the same view of the other breast, as radiologists read asymmetry (issue 14.4).

    The decision score of an image is sigmoid(logit(p) - weight x logit(p_other)), p_other the mean of the
    other breast's images of the same view in the exam; a view with no counterpart is set against
    ``lone_view_logit`` (a typical breast of the development data) and the result says so. Operating
    points and the decision threshold of such a card are calibrated on that paired score.
    """

    weight: float = Field(ge=0.0, le=2.0)
    lone_view_logit: float
    calibration: str = Field(min_length=1, description="how the weight and the lone-view logit were chosen")


class OperatingPoint(_Strict):
    """A threshold on the decision output calibrated for one target, on a named calibration set."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    target: Literal["specificity", "sensitivity"]
    target_value: float = Field(gt=0, le=1)
    threshold: float = Field(ge=0.0, le=1.0)
    calibration_set: str = Field(min_length=1)
    measured: dict[str, float] = Field(default_factory=dict,
                                       description="sensitivity/specificity/n_* at this threshold on the calibration set")


class ModelCard(_Strict):
    schema_version: Literal[1] = 1
    role: Role
    name: str
    version: str
    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="ONNX file name beside the card (no path)")
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[OutputSpec] = Field(min_length=1)
    preprocessing: Preprocessing
    decision: Decision | None = None
    operating_points: list[OperatingPoint] = Field(default_factory=list)
    default_operating_point: str | None = None
    domain: Domain | None = None
    contralateral: Contralateral | None = None
    intended_use: str
    training_data: str
    licence: str
    citation: str | None = None
    not_for_clinical_use: bool
    metrics: dict[str, float | str | dict] = Field(default_factory=dict)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _decision_names_an_output(self) -> ModelCard:
        if self.decision is not None:
            out = {o.name: o for o in self.outputs}.get(self.decision.output)
            if out is None:
                raise ValueError(f"decision.output {self.decision.output!r} is not one of the outputs {[o.name for o in self.outputs]}")
            if self.decision.class_name not in out.classes:
                raise ValueError(f"decision.class_name {self.decision.class_name!r} is not one of {out.classes}")
        return self

    @model_validator(mode="after")
    def _operating_points_fit(self) -> ModelCard:
        names = [op.name for op in self.operating_points]
        if len(set(names)) != len(names):
            raise ValueError(f"operating point names must be unique: {names}")
        if self.operating_points and self.decision is None:
            raise ValueError("operating_points need a decision (the output and class they threshold)")
        if self.default_operating_point is not None:
            if self.default_operating_point not in names:
                raise ValueError(f"default_operating_point {self.default_operating_point!r} is not one of {names}")
            op = self.operating_point(self.default_operating_point)
            if self.decision is not None and abs(op.threshold - self.decision.threshold) > 1e-6:
                raise ValueError(f"decision.threshold {self.decision.threshold} differs from the default operating "
                                 f"point {op.name!r} ({op.threshold})")
        return self

    @model_validator(mode="after")
    def _domain_names_outputs(self) -> ModelCard:
        if self.domain is None:
            return self
        by_name = {o.name: o for o in self.outputs}
        ood = self.domain.ood
        if ood is not None:
            out = by_name.get(ood.output)
            if out is None or out.kind != "features":
                raise ValueError(f"domain.ood.output {ood.output!r} is not a features output of this card")
            if out.size is not None and out.size != len(ood.mean):
                raise ValueError(f"domain.ood.mean has {len(ood.mean)} values; output {out.name!r} has size {out.size}")
        anatomy = self.domain.anatomy
        if anatomy is not None:
            out = by_name.get(anatomy.output)
            if out is None or out.kind != "segmentation":
                raise ValueError(f"domain.anatomy.output {anatomy.output!r} is not a segmentation output of this card")
            named = set(anatomy.organ_volume_ml) | set(anatomy.organ_hu_median) | set(anatomy.single_component)
            named |= set(anatomy.present_at_level_of)
            named |= {o for v in anatomy.present_at_level_of.values() for o in v}
            named |= {r.subject for r in anatomy.relations} | {r.reference for r in anatomy.relations}
            unknown = sorted(named - set(out.classes))
            if unknown:
                raise ValueError(f"domain.anatomy names {unknown}, not classes of {out.name!r} {out.classes}")
        return self

    def operating_point(self, name: str) -> OperatingPoint:
        for op in self.operating_points:
            if op.name == name:
                return op
        raise KeyError(f"model {self.role} has no operating point {name!r}; it has {[o.name for o in self.operating_points]}")

    def output(self, name: str) -> OutputSpec:
        for out in self.outputs:
            if out.name == name:
                return out
        raise KeyError(f"model {self.role} has no output {name!r}; it has {[o.name for o in self.outputs]}")


class CardError(ValueError):
    """A card that cannot be used; the message names the file, the key and what is allowed."""


def _format_validation(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    value = first.get("input")
    shown = json.dumps(value)[:80] if not isinstance(value, dict) else "{...}"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{path}: {key} = {shown}: {first['msg']}{more}"


def load_card(path: Path | str, *, verify_file: bool = True) -> ModelCard:
    """Load and validate a card; with verify_file, the ONNX file must exist and match sha256 if given."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CardError(f"{path}: model card not found") from exc
    except json.JSONDecodeError as exc:
        raise CardError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise CardError(_format_validation(path, exc)) from None
    if verify_file:
        model_path = path.parent / card.file
        if not model_path.is_file():
            raise CardError(f"{path}: file = {card.file!r}: {model_path} does not exist")
        if card.sha256 is not None and sha256_file(model_path) != card.sha256:
            raise CardError(f"{model_path}: sha256 does not match the card {path.name}; the model file was changed or damaged")
    return card


def model_path(card_path: Path | str, card: ModelCard) -> Path:
    return Path(card_path).parent / card.file


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
