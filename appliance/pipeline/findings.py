"""The findings document: what one analysis found, which models found it, and how long it took.

It is the contract between the pipeline and everything after it (the UI, the DICOM SR/PDF writer, the
cloud sync), so it is a versioned schema validated before it is written: a reader checks
``schema_version`` and a field never changes meaning within a version. Every document carries the
research-use disclaimer and the identity (name, version, sha256, backend, precision) of each model.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgescreen.appliance import RESEARCH_USE_BANNER
from edgescreen.appliance.pipeline.checkpoint import atomic_write_bytes

SCHEMA_VERSION = 1
Triage = Literal["suspicious", "not_suspicious", "indeterminate"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RefusedBackend(_Strict):
    """A runtime choice that could not load the model (appliance.runtime.select), and why."""

    source: str  # bundle | profile | requested | reference
    backend: str
    device: str
    precision: str
    artifact: str
    reason: str


class ModelRef(_Strict):
    role: str
    name: str
    version: str
    sha256: str
    backend: str
    precision: str
    device: str
    refused: list[RefusedBackend] = Field(default_factory=list)  # empty: runs as the bundle (or caller) asked


class Lesion(_Strict):
    """One lesion found by stage 2 and typed by stage 3."""

    id: str  # "lesion_1", ... : the same key names the lesion's mask in the DICOM SEG
    location: Literal["head", "body", "tail"]
    centre_lps_mm: list[float]
    longest_diameter_mm: float
    volume_ml: float
    abnormal_probability: float
    subtype_probabilities: dict[str, float]
    top_subtype: str | None
    top_subtype_probability: float | None
    key_image: str | None = None


class MammoImage(_Strict):
    path: str
    laterality: str
    view: str
    abnormal_probability: float
    malignant_probability: float
    key_image: str | None = None
    heatmap: str | None = None  # transparent PNG overlay with the view's geometry (keyimages.mammo_heatmap_overlay)
    notes: list[str] = Field(default_factory=list)


class MammoFindings(_Strict):
    images: list[MammoImage]
    breasts: dict[str, float]
    exam_score: float


class DomainVerdict(_Strict):
    """Whether the study lies within the models' validated domain, and if not, every reason why.

    `checks` says for each check ("dicom", "intensity", "anatomy", "ood:<role>") whether it "passed",
    was "flagged", or why it was "not checked: ..."; `measured` holds the figures behind the verdict.
    """

    in_domain: bool
    reasons: list[str] = Field(default_factory=list)
    checks: dict[str, str] = Field(default_factory=dict)
    measured: dict[str, float] = Field(default_factory=dict)


class OperatingPointInForce(_Strict):
    """The threshold the triage used and where it came from: a card's operating point, or a hand-set one."""

    name: str  # the card's operating point name, or "custom" for a threshold set by hand
    target: Literal["specificity", "sensitivity"] | None = None
    target_value: float | None = None
    threshold: float
    calibration_set: str | None = None
    source: Literal["card", "site", "override"]


class Findings(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    pipeline: Literal["pancreas", "mammo"]
    triage: Triage
    abnormal_probability: float | None  # the study score compared against `threshold`
    threshold: float
    lesions: list[Lesion] = Field(default_factory=list)
    pancreas_volume_ml: float | None = None
    organs: dict[str, float] = Field(default_factory=dict)  # stage-1 organ volumes, mL
    mammo: MammoFindings | None = None
    timings_s: dict[str, float]
    domain: DomainVerdict | None = None  # always written by the pipeline; None only in documents from before the gate
    operating_point: OperatingPointInForce | None = None
    models: list[ModelRef]
    bundle: str | None = None
    study_uid: str
    series_uid: str | None
    key_images: list[str] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    disclaimer: str = RESEARCH_USE_BANNER
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))


def validate_findings(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a findings dict against the schema; return it as plain JSON types."""
    return Findings.model_validate(raw).model_dump(mode="json")


def write_findings(path: Path, findings: dict[str, Any]) -> Path:
    """Validate, then write atomically (temp file, fsync, rename): a reader never sees half a document."""
    clean = validate_findings(findings)
    atomic_write_bytes(Path(path), (json.dumps(clean, indent=2, allow_nan=False) + "\n").encode())
    return Path(path)


def read_findings(path: Path) -> dict[str, Any]:
    return validate_findings(json.loads(Path(path).read_text()))


def summary_lines(findings: dict[str, Any]) -> list[str]:
    """A few human lines for the CLI and logs: the triage, each lesion, each timing."""
    score = findings.get("abnormal_probability")
    lines = [f"{findings['pipeline']}: {findings['triage'].upper()}"
             + (f" (score {score:.3f}, threshold {findings['threshold']:.3f})" if score is not None else "")]
    if findings.get("pancreas_volume_ml") is not None:
        lines.append(f"  pancreas volume {findings['pancreas_volume_ml']:.1f} mL")
    for lesion in findings.get("lesions", []):
        subtype = (f"{lesion['top_subtype']} {lesion['top_subtype_probability']:.2f}"
                   if lesion.get("top_subtype") else "subtype n/a")
        lines.append(f"  {lesion['id']}: {lesion['location']}, {lesion['longest_diameter_mm']:.1f} mm, "
                     f"{lesion['volume_ml']:.2f} mL, p(abnormal) {lesion['abnormal_probability']:.3f}, {subtype}")
    mammo = findings.get("mammo")
    if mammo:
        for image in mammo["images"]:
            lines.append(f"  {image['laterality']} {image['view']}: p(abnormal) {image['abnormal_probability']:.3f}, "
                         f"p(malignant) {image['malignant_probability']:.3f}")
    domain = findings.get("domain")
    if domain is not None and not domain.get("in_domain"):
        lines.append("  OUTSIDE the validated domain (result indeterminate):")
        lines += [f"    - {reason}" for reason in domain.get("reasons", [])]
    op = findings.get("operating_point")
    if op:
        lines.append(f"  operating point {op['name']} (threshold {op['threshold']:.4f}, from the {op['source']})")
    for warning in findings.get("warnings", []):
        lines.append(f"  warning: {warning}")
    timings = ", ".join(f"{k} {v:.2f}" for k, v in findings.get("timings_s", {}).items())
    lines.append(f"  timings (s): {timings}")
    lines.append(f"  {findings['disclaimer']}")
    return lines
