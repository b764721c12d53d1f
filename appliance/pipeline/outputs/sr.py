"""TID 1500 Measurement Report (Comprehensive 3D SR): the numbers in coded form for a PACS or registry.

Each lesion is linked to its SEG segment and the source images; the study's triage, whether the study
lay within the models' validated domain (and if not, why), and the operating point in force are
qualitative evaluations at document level, so a reader of the SR alone sees why a result is
`indeterminate` and which threshold made it.

What the SR cites: each finding the images it lies on (a segment's slices; a lesion without a mask the
slices within its extent), the study-level group the slices with findings (the series' first, middle and
last slice when nothing was segmented), a mammogram group its image and the exam group the exam's
images. The evidence lists exactly those images and the SEG. Citing every slice of a 300-slice series
in every group cost highdicom and pydicom work per item and a parse of every header, and said no more:
each cited image names the series.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from edgescreen.appliance import RESEARCH_USE_BANNER
from edgescreen.appliance.pipeline.outputs.codes import (
    DOMAIN_REASON,
    EXAM_SCORE,
    IN_DOMAIN,
    LONG_AXIS,
    MANUFACTURER,
    NEOPLASM,
    OPERATING_POINT,
    OUT_OF_DOMAIN,
    P_ABNORMAL,
    PANCREAS,
    PANCREAS_PARTS,
    PROBABILITY_OF_CANCER,
    QUALITATIVE_EVALUATIONS,
    SERIES_NUMBERS,
    STUDY_SCORE,
    THRESHOLD,
    TOP_SUBTYPE,
    TRIAGE,
    UNIT_ML,
    UNIT_MM,
    UNIT_NONE,
    VALIDATED_DOMAIN,
    VOLUME,
    coding_schemes,
    probability_code,
    subtype,
    triage_code,
)
from edgescreen.appliance.pipeline.outputs.context import DicomOutputError, OutputContext
from edgescreen.appliance.pipeline.outputs.seg import Segment
from edgescreen.appliance.pipeline.outputs.text import domain_lines, operating_point_text

Group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
_LATERALITY = {"L": codes.SCT.Left, "R": codes.SCT.Right}
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


def _algorithm_id(ctx: OutputContext, role: str) -> hd.sr.AlgorithmIdentification:
    model = ctx.model(role)
    return hd.sr.AlgorithmIdentification(name=str(model.get("name"))[:64], version=str(model.get("version"))[:64])


def _num(name: Code, value: float, unit: Code, ctx: OutputContext | None = None, role: str | None = None) -> hd.sr.Measurement:
    """A TID 300 measurement; with a role, it names the model that produced the value."""
    algorithm = _algorithm_id(ctx, role) if ctx is not None and role is not None else None
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=algorithm)


def _tracking(ctx: OutputContext, label: str, uid: str | None = None) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=uid or ctx.uid("tracking", label), identifier=label[:64])


class _Citations:
    """The source images the SR cites, each once, in the order first cited: its evidence and the PDF's sources."""

    def __init__(self, sources: Sequence[Dataset]) -> None:
        self.sources = sources
        self._by_uid: dict[str, Dataset] = {}

    def __call__(self, datasets: Iterable[Dataset]) -> list[Dataset]:
        cited = list(datasets)
        for ds in cited:
            self._by_uid.setdefault(str(ds.SOPInstanceUID), ds)
        return cited

    def slices(self, indices: Iterable[int]) -> list[Dataset]:
        return self(self.sources[i] for i in indices)

    @property
    def images(self) -> list[Dataset]:
        return list(self._by_uid.values())


def _group(ctx: OutputContext, label: str, seg: hd.seg.Segmentation | None, segment: Segment | None,
           cite: _Citations, images: Sequence[int], **content: Any) -> Group:
    """TID 1411 linked to the SEG segment when there is one; else TID 1501 citing the slices `images`."""
    if seg is not None and segment is not None:
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(ctx, label, segment.tracking_uid),
            referenced_segment=_referenced_segment(seg, segment, cite), **content)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(ctx, label),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in cite.slices(images)],
        **content)


def _referenced_segment(seg: hd.seg.Segmentation, segment: Segment, cite: _Citations) -> hd.sr.ReferencedSegment:
    """The SEG segment and the CT slices it lies on.

    Built from what we know rather than with ReferencedSegment.from_segmentation, which (highdicom
    0.28) looks for the segment number in per-frame groups and fails on a one-segment SEG, where
    highdicom itself moves it to the shared functional groups.
    """
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=segment.number,
        source_images=[hd.sr.SourceImageForSegmentation.from_source_image(ds) for ds in cite.slices(segment.slices)])


def _study_slices(n: int, segments: dict[str, Segment]) -> list[int]:
    """What a study-level group cites: the slices with findings (any segment), else the series' extent
    (its first, middle and last slice) when nothing was segmented."""
    found = sorted({z for s in segments.values() for z in s.slices})
    return found or sorted({0, n // 2, n - 1})


def _lesion_slices(sources: Sequence[Dataset], lesion: dict[str, Any]) -> list[int] | None:
    """The slices within a lesion's extent along the slice normal (centre +- half its longest diameter);
    the nearer slice when it lies between two; None when the findings or headers cannot say where.

    The sources are in mask z order, ascending along the slice normal (as the loader sorts them), so a
    bisection finds the range reading about log2(n) headers besides the cited ones.
    """
    centre, diameter = lesion.get("centre_lps_mm"), lesion.get("longest_diameter_mm") or 0.0
    if not centre:
        return None
    try:
        orientation = [float(v) for v in sources[0].ImageOrientationPatient]
        normal = np.cross(orientation[:3], orientation[3:])
        c = float(np.dot([float(v) for v in centre], normal))
        r = max(float(diameter), 0.0) / 2
    except (AttributeError, TypeError, ValueError):
        return None
    n = len(sources)

    def position(i: int) -> float:
        return float(np.dot([float(v) for v in sources[i].ImagePositionPatient], normal))

    try:
        lo = bisect_left(range(n), c - r, key=position)
        hi = bisect_right(range(n), c + r, key=position)
        if lo < hi:
            return list(range(lo, hi))
        if lo in (0, n):  # wholly before the first or after the last slice: not in this series
            return None
        return [lo - 1 if c - position(lo - 1) <= position(lo) - c else lo]
    except (AttributeError, TypeError, ValueError):
        return None


def _lesion_group(ctx: OutputContext, lesion: dict[str, Any], seg: hd.seg.Segmentation | None,
                  segments: dict[str, Segment], cite: _Citations) -> Group:
    """Diameter, volume, P(abnormal) and every subtype probability, the top subtype as a code."""
    key = str(lesion.get("id") or "lesion")
    measurements = []
    if lesion.get("longest_diameter_mm") is not None:
        measurements.append(_num(LONG_AXIS, lesion["longest_diameter_mm"], UNIT_MM))
    if lesion.get("volume_ml") is not None:
        measurements.append(_num(VOLUME, lesion["volume_ml"], UNIT_ML))
    if lesion.get("abnormal_probability") is not None:
        measurements.append(_num(P_ABNORMAL, lesion["abnormal_probability"], UNIT_NONE, ctx, "pancreas.stage2"))
    for name, p in sorted((lesion.get("subtype_probabilities") or {}).items()):
        measurements.append(_num(probability_code(name), p, UNIT_NONE, ctx, "pancreas.stage3"))
    evaluations = []
    if lesion.get("top_subtype"):
        evaluations.append(hd.sr.QualitativeEvaluation(TOP_SUBTYPE, subtype(str(lesion["top_subtype"]))[1]))
    part = PANCREAS_PARTS.get(str(lesion.get("location") or "").lower())
    segment = segments.get(key)
    images = ([] if seg is not None and segment is not None
              else _lesion_slices(cite.sources, lesion) or _study_slices(len(cite.sources), segments))
    return _group(ctx, key, seg, segment, cite, images, finding_type=NEOPLASM,
                  finding_category=codes.SCT.MorphologicallyAbnormalStructure,
                  algorithm_id=_algorithm_id(ctx, "pancreas.stage2"), finding_sites=[hd.sr.FindingSite(part or PANCREAS)],
                  measurements=measurements or None, qualitative_evaluations=evaluations or None)


def _score_measurements(ctx: OutputContext, findings: dict[str, Any], role: str) -> list[hd.sr.Measurement]:
    """The study score and the threshold it was triaged against, so the SR explains the triage."""
    out = []
    if findings.get("abnormal_probability") is not None:
        out.append(_num(STUDY_SCORE, findings["abnormal_probability"], UNIT_NONE, ctx, role))
    if findings.get("threshold") is not None:
        out.append(_num(THRESHOLD, findings["threshold"], UNIT_NONE))
    return out


def _pancreas_group(ctx: OutputContext, findings: dict[str, Any], seg: hd.seg.Segmentation | None,
                    segments: dict[str, Segment], cite: _Citations) -> Group:
    """The gland: its volume, and the study triage as a qualitative evaluation."""
    measurements = []
    if findings.get("pancreas_volume_ml") is not None:
        measurements.append(_num(VOLUME, findings["pancreas_volume_ml"], UNIT_ML))
    measurements += _score_measurements(ctx, findings, "pancreas.stage2")
    triage = hd.sr.QualitativeEvaluation(TRIAGE, triage_code(str(findings.get("triage") or "")))
    return _group(ctx, "pancreas", seg, segments.get("pancreas"), cite, _study_slices(len(cite.sources), segments),
                  finding_type=PANCREAS,
                  finding_category=codes.SCT.AnatomicalStructure, algorithm_id=_algorithm_id(ctx, "pancreas.stage1"),
                  measurements=measurements or None, qualitative_evaluations=[triage])


def _match_images(images: list[dict[str, Any]], sources: Sequence[Dataset]) -> list[Dataset]:
    """The source dataset of each findings image: by SOP Instance UID, else by file name, else by order.

    The mammography pipeline identifies images by file name (its input may be PNGs as well as DICOM);
    the worker passes the headers of those same files in the same order.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    by_name = {Path(str(getattr(ds, "filename", "") or "")).name: ds for ds in sources}
    matched: list[Dataset] = []
    for index, image in enumerate(images):
        uid, name = str(image.get("sop_instance_uid") or ""), Path(str(image.get("path") or "")).name
        if uid in by_uid:
            matched.append(by_uid[uid])
        elif name and name in by_name:
            matched.append(by_name[name])
        elif len(images) == len(sources) and not uid:
            matched.append(sources[index])
        else:
            raise DicomOutputError(
                f"findings image {index} ({uid or name or 'unnamed'}) is not among the {len(sources)} source images")
    return matched


def _mammo_groups(ctx: OutputContext, findings: dict[str, Any], cite: _Citations) -> list[Group]:
    """One TID 1501 group per image (referencing it), plus one for the exam as a whole (referencing the
    exam's images)."""
    mammo = findings.get("mammo") or {}
    images = list(mammo.get("images") or [])
    matched = cite(_match_images(images, cite.sources))
    groups: list[Group] = []
    for index, (image, ds) in enumerate(zip(images, matched, strict=True)):
        laterality = _LATERALITY.get(str(image.get("laterality") or "").upper())
        measurements = [
            _num(P_ABNORMAL, image.get("abnormal_probability", 0.0), UNIT_NONE, ctx, "mammo"),
            _num(PROBABILITY_OF_CANCER, image.get("malignant_probability", 0.0), UNIT_NONE, ctx, "mammo"),
        ]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(ctx, f"image {index + 1} {image.get('laterality', '')} {image.get('view', '')}"),
            finding_sites=[hd.sr.FindingSite(codes.SCT.Breast, laterality=laterality)],
            algorithm_id=_algorithm_id(ctx, "mammo"), measurements=measurements,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)]))
    exam = [_num(EXAM_SCORE, mammo.get("exam_score") or 0.0, UNIT_NONE, ctx, "mammo")]
    exam += [m for m in _score_measurements(ctx, findings, "mammo") if m.name.value == THRESHOLD.value]
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(ctx, "exam"), finding_sites=[hd.sr.FindingSite(codes.SCT.Breast)],
        algorithm_id=_algorithm_id(ctx, "mammo"), measurements=exam,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(TRIAGE, triage_code(str(findings.get("triage") or "")))],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in matched]))
    return groups


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:10240], relationship_type=_CONTAINS)


def _document_evaluations(findings: dict[str, Any]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the triage, the validated domain (and each reason it failed), the operating point
    in force, and the research-use banner, at document level."""
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=_CONTAINS)
    items: list[Any] = [hd.sr.CodeContentItem(name=TRIAGE, value=triage_code(str(findings.get("triage") or "")),
                                              relationship_type=_CONTAINS)]
    domain = findings.get("domain")
    if domain is not None:
        in_domain = bool(domain.get("in_domain"))
        items.append(hd.sr.CodeContentItem(name=VALIDATED_DOMAIN, value=IN_DOMAIN if in_domain else OUT_OF_DOMAIN,
                                           relationship_type=_CONTAINS))
        items += [_text(DOMAIN_REASON, reason) for reason in domain_lines(findings)[1:]]
    op = operating_point_text(findings)
    if op:
        items.append(_text(OPERATING_POINT, op))
    items.append(_text(codes.DCM.Comment, RESEARCH_USE_BANNER))
    disclaimer = str(findings.get("disclaimer") or "").strip()
    if disclaimer and disclaimer != RESEARCH_USE_BANNER:
        items.append(_text(codes.DCM.Comment, disclaimer))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_sr(ctx: OutputContext, findings: dict[str, Any], sources: Sequence[Dataset],
             seg: hd.seg.Segmentation | None, segments: list[Segment]) -> tuple[hd.sr.Comprehensive3DSR, list[Dataset]]:
    """TID 1500 Measurement Report, observed by this device, with AIR model identity; and the source
    images it cites (its evidence besides the SEG), which the PDF names as its sources too."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["edgescreen-device", ctx.device_serial]), name="edgescreen",
            manufacturer_name=MANUFACTURER, model_name="edgescreen appliance", serial_number=ctx.device_serial),
    )
    by_key = {s.key: s for s in segments}
    cite = _Citations(sources)
    if ctx.pipeline == "pancreas":
        groups = [_pancreas_group(ctx, findings, seg, by_key, cite)]
        groups += [_lesion_group(ctx, les, seg, by_key, cite) for les in findings.get("lesions") or []]
        procedure = codes.cid100.CTUnspecifiedBodyRegion
    else:
        groups = _mammo_groups(ctx, findings, cite)
        procedure = codes.cid100.XRUnspecifiedBodyRegion
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=procedure, imaging_measurements=groups)
    report[0].ContentSequence.append(_document_evaluations(findings))
    images = cite.images  # highdicom copies patient and study from the first: a completed source header
    evidence = [*images, *([seg] if seg is not None else [])]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=ctx.uid("sr-series"),
        series_number=SERIES_NUMBERS["sr"], sop_instance_uid=ctx.uid("sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True,
        is_final=False,  # nobody accountable has verified an automatic screening result
        is_verified=False, series_description=ctx.series_description("SR"),
        manufacturer_model_name="edgescreen appliance", software_versions=ctx.software_versions,
        device_serial_number=ctx.device_serial, contributing_equipment=ctx.contributing_equipment(),
        coding_schemes=coding_schemes(), content_date=ctx.local.date(), content_time=ctx.local.time(),
    )
    return sr, images
