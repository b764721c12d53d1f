"""The model contract: one card per model, reference or a clinic's own.

A clinic replaces a reference model by dropping in an ONNX file and a card that says how to feed it
(spacing, orientation, intensity normalisation, patch size) and how to read it (outputs, classes).
The pipeline reads only the card, so no code changes when the model changes. Cards are validated on
load; an unknown key or a wrong type is refused with the key, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1

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
    channels: list[Literal["ct", "lesion_mask", "pancreas_mask", "mammogram"]]

    @model_validator(mode="after")
    def _shape_matches_layout(self) -> TensorSpec:
        if len(self.shape) != len(self.layout):
            raise ValueError(f"shape {self.shape} has {len(self.shape)} dims but layout {self.layout} has {len(self.layout)}")
        if isinstance(self.shape[1], int) and self.shape[1] != len(self.channels):
            raise ValueError(f"shape says {self.shape[1]} channels but channels lists {len(self.channels)}")
        return self


class OutputSpec(_Strict):
    """How to read one output: what it is, which activation turns it into probabilities, what each index means."""

    name: str
    kind: Literal["segmentation", "classification", "heatmap"]
    activation: Literal["softmax", "sigmoid", "none"]
    classes: list[str] = Field(min_length=1)


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
