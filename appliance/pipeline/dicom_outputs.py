"""DICOM results for PACS and viewers: a SEG, a TID 1500 measurement report (Comprehensive 3D SR)
and an Encapsulated PDF summary, all in the source study.

Why three objects (MONAI Deploy and IHE AI Results do the same):
- SEG (binary, one segment per structure) lets a SEG-capable viewer overlay the pancreas and every
  lesion on the CT.
- The SR carries the numbers (longest diameter, volume, probabilities, subtype) in coded form, each
  lesion linked to its SEG segment and the source images, so a PACS or registry can read them.
- The Encapsulated PDF is for sites without a SEG/SR-capable viewer: any PACS stores it and any
  workstation opens it; the clinic can print it for the doctor.

Rules every output follows: the source StudyInstanceUID, new series, patient module copied from the
source, Manufacturer "edgescreen", "RESEARCH USE ONLY" in the SeriesDescription, the research-use
banner in the document body, and the identity of every model that contributed in the
ContributingEquipmentSequence (IHE AIR: Manufacturer, Manufacturer's Model Name = model name,
Software Versions = model version; Purpose of Reference (DCM, 109102, "Processing Equipment"), the
member of CID 7005 for equipment that processed the images into new content).

Source images: ``source_datasets`` are the CT slice headers in the order of the mask's z axis. They
may be read with ``stop_before_pixels=True``: highdicom only needs geometry and identifiers
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing, FrameOfReferenceUID, Rows, Columns,
UIDs) to derive a SEG and to reference images from an SR, never the pixel data.

UIDs are derived from the findings document (study, series, pipeline, created_at, kind) rather than
random: writing the outputs of the same findings again (a retried output step, a re-export from the
stored findings.json) yields the same SOP instances, so a PACS sees one result, not two. A new
analysis has a new created_at and therefore new instances. All three objects are built before any is
written; each is written to a temp name, fsynced and renamed (nothing half-written is ever sent).
"""

from __future__ import annotations

import datetime as dt
import io
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance import RESEARCH_USE_BANNER, __version__
from appliance.logs import get_logger
from appliance.store.files import atomic_write

log = get_logger(__name__)

MANUFACTURER = "edgescreen"
RESEARCH_TAG = "RESEARCH USE ONLY"
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
SERIES_NUMBERS = {"seg": 9701, "sr": 9702, "pdf": 9703}

# ------------------------------------------------------------------------------------------ codes
# Standard codes come from pydicom's copy of PS3.16 where it has them; the pancreas parts are SNOMED CT
# body structures (checked against public SNOMED-coded value sets). Concepts that have no standard code
# (our triage, the non-PDAC subtypes) use the private scheme 99EDGS, declared in every object's
# CodingSchemeIdentificationSequence as PS3.3 C.12.1.1.2 requires for private schemes.
LOCAL_SCHEME = "99EDGS"
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment  # (109102, DCM) - CID 7005
PANCREAS = codes.SCT.Pancreas  # (15776009, SCT)
PANCREAS_PARTS: dict[str, Code] = {
    "head": Code("64163001", "SCT", "Head of pancreas"),
    "body": Code("40133006", "SCT", "Body of pancreas"),
    "tail": Code("73239005", "SCT", "Tail of pancreas"),
}
NEOPLASM = codes.SCT.Neoplasm  # (108369006, SCT)
LONG_AXIS = codes.SCT.LongAxis  # (103339001, SCT): the longest diameter
VOLUME = codes.SCT.Volume  # (118565006, SCT)
PROBABILITY_OF_CANCER = codes.DCM.ProbabilityOfCancer  # (111047, DCM)
UNIT_MM = Code("mm", "UCUM", "millimeter")
UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_NONE = Code("1", "UCUM", "no units")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
DIAGNOSTIC_IMAGING_REPORT = codes.LN.DiagnosticImagingReport  # (18748-4, LN), CID 7020

TRIAGE = Code("ES-TRIAGE", LOCAL_SCHEME, "Screening triage")
TOP_SUBTYPE = Code("ES-SUBTYPE", LOCAL_SCHEME, "Most likely lesion subtype")
P_ABNORMAL = Code("ES-PABN", LOCAL_SCHEME, "Probability of abnormality")
EXAM_SCORE = Code("ES-EXAM", LOCAL_SCHEME, "Exam abnormality score")
STUDY_SCORE = Code("ES-SCORE", LOCAL_SCHEME, "Study abnormality score")
THRESHOLD = Code("ES-THRESH", LOCAL_SCHEME, "Triage threshold")
# normalised class name -> (short id for derived local codes, code of the subtype itself)
SUBTYPES: dict[str, tuple[str, Code]] = {
    "pdac": ("PDAC", codes.SCT.AdenocarcinomaOfPancreas),  # (700423003, SCT)
    "pnet": ("PNET", Code("ES-PNET", LOCAL_SCHEME, "Pancreatic neuroendocrine tumour")),
    "spt": ("SPT", Code("ES-SPT", LOCAL_SCHEME, "Solid pseudopapillary tumour")),
    "ipmn": ("IPMN", Code("ES-IPMN", LOCAL_SCHEME, "Intraductal papillary mucinous neoplasm")),
    "mcn": ("MCN", Code("ES-MCN", LOCAL_SCHEME, "Mucinous cystic neoplasm")),
    "scn": ("SCN", Code("ES-SCN", LOCAL_SCHEME, "Serous cystic neoplasm")),
    "cp": ("CP", Code("ES-CP", LOCAL_SCHEME, "Chronic pancreatitis")),
    "chronic_pancreatitis": ("CP", Code("ES-CP", LOCAL_SCHEME, "Chronic pancreatitis")),
    "other": ("OTHER", Code("ES-OTHER", LOCAL_SCHEME, "Other pancreatic lesion")),
}
TRIAGE_CODES: dict[str, Code] = {
    "suspicious": Code("ES-SUSP", LOCAL_SCHEME, "Suspicious"),
    "not_suspicious": Code("ES-NSUSP", LOCAL_SCHEME, "Not suspicious"),
    "indeterminate": Code("ES-INDET", LOCAL_SCHEME, "Indeterminate"),
}
SEGMENT_COLOURS = {"pancreas": "yellow", "lesion": "red"}

# Patient and study attributes copied verbatim onto the PDF (highdicom copies them for SEG and SR).
_PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence",
    "PatientAge", "PatientSize", "PatientWeight", "PatientIdentityRemoved", "DeidentificationMethod",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "StudyDescription",
)


class DicomOutputError(ValueError):
    """The findings, masks and source images do not fit together; the message says how."""


# ------------------------------------------------------------------------------------------ context


@dataclass(frozen=True)
class _Context:
    """Everything shared by the three objects: identity, time, models, deterministic UIDs."""

    pipeline: str
    study_uid: str
    created: dt.datetime
    models: list[dict[str, Any]]
    device_serial: str
    seed: str  # entropy for deterministic UIDs

    @property
    def local(self) -> dt.datetime:
        """The creation time as naive local time: DICOM dates and times are local to the device."""
        return self.created.astimezone().replace(tzinfo=None) if self.created.tzinfo else self.created

    def uid(self, *parts: str) -> str:
        return generate_uid(entropy_srcs=[self.seed, *parts])

    def model(self, role: str) -> dict[str, Any]:
        """The model that played `role`, or a placeholder that still says which role it was."""
        for model in self.models:
            if model.get("role") == role:
                return model
        return {"role": role, "name": f"unknown-{role}", "version": "unknown"}


def _parse_created(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            log.warning("findings.created_at is not ISO 8601; using now", created_at=value)
    return dt.datetime.now(dt.UTC)


def normalise_findings(findings: dict[str, Any]) -> dict[str, Any]:
    """The findings in the shape of appliance.pipeline.findings (schema 1), accepting older aliases.

    Aliases: ``study_instance_uid``/``series_instance_uid`` for ``study_uid``/``series_uid``, and a
    mammography result at top level (``images``, ``breasts``, ``exam_score``) instead of under ``mammo``.
    """
    out = dict(findings)
    out["study_uid"] = findings.get("study_uid") or findings.get("study_instance_uid")
    out["series_uid"] = findings.get("series_uid") or findings.get("series_instance_uid")
    if not out.get("mammo") and any(k in findings for k in ("images", "breasts", "exam_score")):
        out["mammo"] = {k: findings.get(k) for k in ("images", "breasts", "exam_score")}
    return out


def _context(findings: dict[str, Any], sources: Sequence[Dataset], device_serial: str | None = None) -> _Context:
    if not sources:
        raise DicomOutputError("no source datasets: outputs must reference the images they were derived from")
    study_uids = {str(ds.StudyInstanceUID) for ds in sources}
    if len(study_uids) != 1:
        raise DicomOutputError(f"source datasets span {len(study_uids)} studies: {sorted(study_uids)}")
    study_uid = study_uids.pop()
    claimed = findings.get("study_uid")
    if claimed and str(claimed) != study_uid:
        # A mismatch would file one patient's results into another patient's study: refuse.
        raise DicomOutputError(f"findings are for study {claimed} but the source images are from study {study_uid}")
    pipeline = str(findings.get("pipeline") or "")
    if pipeline not in ("pancreas", "mammo"):
        raise DicomOutputError(f"findings.pipeline must be 'pancreas' or 'mammo', not {pipeline!r}")
    created = _parse_created(findings.get("created_at"))
    serial = str(device_serial or findings.get("device_id") or platform.node() or "unknown")[:64]
    seed = "|".join([study_uid, str(findings.get("series_uid") or ""), pipeline, created.isoformat()])
    return _Context(pipeline, study_uid, created, list(findings.get("models") or []), serial, seed)


def _coding_schemes() -> list[CodingSchemeIdentificationItem]:
    return [
        CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME,
            name="edgescreen local codes",
            responsible_organization="edgescreen",
        )
    ]


def _contributing_equipment(ctx: _Context) -> list[hd.ContributingEquipment]:
    """One item per model, as IHE AIR asks: who made the result, with which model and version."""
    items = []
    for model in ctx.models:
        details = " ".join(
            f"{key}={model[key]}" for key in ("role", "backend", "precision", "device", "sha256") if model.get(key)
        )
        items.append(
            hd.ContributingEquipment(
                manufacturer=MANUFACTURER,
                purpose_of_reference=PROCESSING_EQUIPMENT,
                manufacturer_model_name=str(model.get("name") or "unknown")[:64],
                software_versions=str(model.get("version") or "unknown")[:64],
                device_serial_number=ctx.device_serial,
                contribution_datetime=ctx.local,
                contribution_description=details[:1024] or None,
            )
        )
    return items


def _series_description(ctx: _Context, kind: str) -> str:
    what = {"pancreas": "pancreas CT", "mammo": "mammography"}[ctx.pipeline]
    return f"{RESEARCH_TAG} edgescreen {what} {kind}"[:64]


def _software_versions(findings: dict[str, Any]) -> str:
    bundle = findings.get("bundle")
    bundle_id = (bundle.get("id") or bundle.get("name")) if isinstance(bundle, dict) else bundle
    return (f"edgescreen {__version__}" + (f" bundle {bundle_id}" if bundle_id else ""))[:64]


# ------------------------------------------------------------------------------------------ SEG


@dataclass(frozen=True)
class _Segment:
    key: str  # "pancreas" or "lesion_<n>"
    number: int  # 1-based segment number in the SEG
    tracking_uid: str
    voxels: int
    slices: tuple[int, ...]  # indices into the source datasets where this segment has voxels


def _segment_order(key: str) -> tuple[int, int]:
    return (0, 0) if key == "pancreas" else (1, int(key[7:]))


def _mask_stack(
    masks: dict[str, np.ndarray], shape: tuple[int, int, int]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, occupied slice indices, (slices, y, x, n) bool) for the non-empty masks.

    Segment order is pancreas first, then lesions by number. Only slices where some mask is set are
    stacked: a 300-slice 512x512 CT with four segments would otherwise need ~300 MB of booleans,
    too much beside the models on a 4 GB Jetson; omit_empty_frames drops those frames anyway.
    """
    keys: list[str] = []
    for key, mask in masks.items():
        if key != "pancreas" and not (key.startswith("lesion_") and key[7:].isdigit()):
            raise DicomOutputError(f"mask key {key!r} is not 'pancreas' or 'lesion_<n>'")
        if mask.shape != shape:
            raise DicomOutputError(f"mask {key!r} has shape {mask.shape}; the source grid is {shape} (z, y, x)")
        if np.any(mask):
            keys.append(key)
        else:
            log.info("empty mask left out of the SEG", segment=key)
    keys.sort(key=_segment_order)
    occupied = np.zeros(shape[0], dtype=bool)
    for key in keys:
        occupied |= masks[key].any(axis=(1, 2))
    z = np.flatnonzero(occupied)
    stack = np.stack([masks[k][z] != 0 for k in keys], axis=-1) if keys else np.zeros((0, *shape[1:], 0), bool)
    return keys, z, stack


def _algorithm(ctx: _Context, role: str) -> hd.AlgorithmIdentificationSequence:
    model = ctx.model(role)
    return hd.AlgorithmIdentificationSequence(
        name=str(model.get("name"))[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=str(model.get("version"))[:64],
        source=MANUFACTURER,
    )


def _segment_description(ctx: _Context, key: str, number: int, tracking_uid: str,
                         lesion: dict[str, Any] | None) -> hd.seg.SegmentDescription:
    if key == "pancreas":
        return hd.seg.SegmentDescription(
            segment_number=number,
            segment_label="Pancreas",
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=PANCREAS,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(ctx, "pancreas.stage1"),
            tracking_uid=tracking_uid,
            tracking_id="pancreas",
            display_color=hd.color.CIELabColor.from_string(SEGMENT_COLOURS["pancreas"]),
        )
    part = PANCREAS_PARTS.get(str((lesion or {}).get("location") or "").lower())
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=f"Lesion {key[7:]}",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=NEOPLASM,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(ctx, "pancreas.stage2"),
        tracking_uid=tracking_uid,
        tracking_id=key,
        anatomic_regions=[part or PANCREAS],
        display_color=hd.color.CIELabColor.from_string(SEGMENT_COLOURS["lesion"]),
    )


def build_segmentation(
    ctx: _Context, findings: dict[str, Any], sources: Sequence[Dataset], masks: dict[str, np.ndarray]
) -> tuple[hd.seg.Segmentation | None, list[_Segment]]:
    """A BINARY SEG with one segment per non-empty mask, or None when every mask is empty."""
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    keys, z, stack = _mask_stack(masks, shape)
    if not keys:
        return None, []
    lesions = {str(les.get("id")): les for les in findings.get("lesions") or []}
    segments = [
        _Segment(key, i + 1, ctx.uid("segment", key), int(stack[..., i].sum()),
                 tuple(int(z[j]) for j in np.flatnonzero(stack[..., i].any(axis=(1, 2)))))
        for i, key in enumerate(keys)
    ]
    descriptions = [_segment_description(ctx, s.key, s.number, s.tracking_uid, lesions.get(s.key)) for s in segments]
    seg = hd.seg.Segmentation(
        source_images=[sources[i] for i in z],  # the slices that hold a segment, in mask order
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=ctx.uid("seg-series"),
        series_number=SERIES_NUMBERS["seg"],
        sop_instance_uid=ctx.uid("seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="edgescreen appliance",
        software_versions=_software_versions(findings),
        device_serial_number=ctx.device_serial,
        content_description=RESEARCH_TAG,
        content_label="EDGESCREEN",
        content_creator_name="edgescreen^appliance",
        series_description=_series_description(ctx, "SEG"),
        omit_empty_frames=True,
        contributing_equipment=_contributing_equipment(ctx),
        coding_schemes=_coding_schemes(),
        content_date=ctx.local.date(),
        content_time=ctx.local.time(),
        content_qualification="RESEARCH",
    )
    seg.ImageComments = RESEARCH_USE_BANNER  # the SEG IOD has General Image; SR and PDF carry it in their body
    return seg, segments


# ------------------------------------------------------------------------------------------ SR


def _num(name: Code, value: float, unit: Code, ctx: _Context | None = None, role: str | None = None) -> hd.sr.Measurement:
    """A TID 300 measurement; with a role, it names the model that produced the value."""
    algorithm = _algorithm_id(ctx, role) if ctx is not None and role is not None else None
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=algorithm)


def _subtype(name: str) -> tuple[str, Code]:
    """(short id, code) for a class name as the model card spells it ("PDAC", "cp", "Chronic pancreatitis")."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key in SUBTYPES:
        return SUBTYPES[key]
    short = key.upper()[:11]
    return short, Code(f"ES-{short}", LOCAL_SCHEME, name[:64] or "unknown")


def _subtype_code(name: str) -> Code:
    return _subtype(name)[1]


def _triage_code(value: str) -> Code:
    key = value.strip().lower()
    return TRIAGE_CODES.get(key, Code(f"ES-{key.upper()}"[:16], LOCAL_SCHEME, value[:64] or "unknown"))


def _probability_code(name: str) -> Code:
    short, code = _subtype(name)
    return Code(f"ES-P-{short}", LOCAL_SCHEME, f"Probability of {code.meaning}"[:64])


def _tracking(ctx: _Context, label: str, uid: str | None = None) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=uid or ctx.uid("tracking", label), identifier=label[:64])


def _algorithm_id(ctx: _Context, role: str) -> hd.sr.AlgorithmIdentification:
    model = ctx.model(role)
    return hd.sr.AlgorithmIdentification(name=str(model.get("name"))[:64], version=str(model.get("version"))[:64])


Group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations


def _group(ctx: _Context, label: str, seg: hd.seg.Segmentation | None, segment: _Segment | None,
           sources: Sequence[Dataset], **content: Any) -> Group:
    """TID 1411 linked to the SEG segment when there is one; else TID 1501 citing the source images."""
    if seg is not None and segment is not None:
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(ctx, label, segment.tracking_uid),
            referenced_segment=_referenced_segment(seg, segment, sources),
            **content,
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(ctx, label),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources],
        **content,
    )


def _referenced_segment(seg: hd.seg.Segmentation, segment: _Segment, sources: Sequence[Dataset]
                        ) -> hd.sr.ReferencedSegment:
    """The SEG segment and the CT slices it lies on.

    Built from what we know rather than with ReferencedSegment.from_segmentation, which (highdicom
    0.28) looks for the segment number in per-frame groups and fails on a one-segment SEG, where
    highdicom itself moves it to the shared functional groups.
    """
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=segment.number,
        source_images=[hd.sr.SourceImageForSegmentation.from_source_image(sources[i]) for i in segment.slices],
    )


def _lesion_group(ctx: _Context, lesion: dict[str, Any], seg: hd.seg.Segmentation | None,
                  segments: dict[str, _Segment], sources: Sequence[Dataset]) -> Group:
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
        measurements.append(_num(_probability_code(name), p, UNIT_NONE, ctx, "pancreas.stage3"))
    evaluations = []
    if lesion.get("top_subtype"):
        evaluations.append(hd.sr.QualitativeEvaluation(TOP_SUBTYPE, _subtype_code(str(lesion["top_subtype"]))))
    part = PANCREAS_PARTS.get(str(lesion.get("location") or "").lower())
    return _group(
        ctx, key, seg, segments.get(key), sources,
        finding_type=NEOPLASM,
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=_algorithm_id(ctx, "pancreas.stage2"),
        finding_sites=[hd.sr.FindingSite(part or PANCREAS)],
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
    )


def _pancreas_group(ctx: _Context, findings: dict[str, Any], seg: hd.seg.Segmentation | None,
                    segments: dict[str, _Segment], sources: Sequence[Dataset]) -> Group:
    """The gland: its volume, and the study triage as a qualitative evaluation."""
    measurements = []
    if findings.get("pancreas_volume_ml") is not None:
        measurements.append(_num(VOLUME, findings["pancreas_volume_ml"], UNIT_ML))
    measurements += _score_measurements(ctx, findings, "pancreas.stage2")
    triage = hd.sr.QualitativeEvaluation(TRIAGE, _triage_code(str(findings.get("triage") or "")))
    return _group(
        ctx, "pancreas", seg, segments.get("pancreas"), sources,
        finding_type=PANCREAS,
        finding_category=codes.SCT.AnatomicalStructure,
        algorithm_id=_algorithm_id(ctx, "pancreas.stage1"),
        measurements=measurements or None,
        qualitative_evaluations=[triage],
    )


_LATERALITY = {"L": codes.SCT.Left, "R": codes.SCT.Right}


def _score_measurements(ctx: _Context, findings: dict[str, Any], role: str) -> list[hd.sr.Measurement]:
    """The study score and the threshold it was triaged against, so the SR explains the triage."""
    out = []
    if findings.get("abnormal_probability") is not None:
        out.append(_num(STUDY_SCORE, findings["abnormal_probability"], UNIT_NONE, ctx, role))
    if findings.get("threshold") is not None:
        out.append(_num(THRESHOLD, findings["threshold"], UNIT_NONE))
    return out


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
                f"findings image {index} ({uid or name or 'unnamed'}) is not among the {len(sources)} source images"
            )
    return matched


def _mammo_groups(ctx: _Context, findings: dict[str, Any], sources: Sequence[Dataset]) -> list[Group]:
    """One TID 1501 group per image (referencing it), plus one for the exam as a whole."""
    mammo = findings.get("mammo") or {}
    images = list(mammo.get("images") or [])
    groups: list[Group] = []
    for index, (image, ds) in enumerate(zip(images, _match_images(images, sources), strict=True)):
        laterality = _LATERALITY.get(str(image.get("laterality") or "").upper())
        measurements = [
            _num(P_ABNORMAL, image.get("abnormal_probability", 0.0), UNIT_NONE, ctx, "mammo"),
            _num(PROBABILITY_OF_CANCER, image.get("malignant_probability", 0.0), UNIT_NONE, ctx, "mammo"),
        ]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(ctx, f"image {index + 1} {image.get('laterality', '')} {image.get('view', '')}"),
            finding_sites=[hd.sr.FindingSite(codes.SCT.Breast, laterality=laterality)],
            algorithm_id=_algorithm_id(ctx, "mammo"),
            measurements=measurements,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)],
        ))
    exam = [_num(EXAM_SCORE, mammo.get("exam_score") or 0.0, UNIT_NONE, ctx, "mammo")]
    exam += [m for m in _score_measurements(ctx, findings, "mammo") if m.name.value == THRESHOLD.value]
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(ctx, "exam"),
        finding_sites=[hd.sr.FindingSite(codes.SCT.Breast)],
        algorithm_id=_algorithm_id(ctx, "mammo"),
        measurements=exam,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(TRIAGE, _triage_code(str(findings.get("triage") or "")))],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources],
    ))
    return groups


def _document_evaluations(findings: dict[str, Any]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the triage as CODE and the research-use banner as TEXT, at document level."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items = [
        hd.sr.CodeContentItem(name=TRIAGE, value=_triage_code(str(findings.get("triage") or "")),
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        hd.sr.TextContentItem(name=codes.DCM.Comment, value=RESEARCH_USE_BANNER,
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
    ]
    disclaimer = str(findings.get("disclaimer") or "").strip()
    if disclaimer and disclaimer != RESEARCH_USE_BANNER:
        items.append(hd.sr.TextContentItem(name=codes.DCM.Comment, value=disclaimer[:10240],
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_sr(ctx: _Context, findings: dict[str, Any], sources: Sequence[Dataset],
             seg: hd.seg.Segmentation | None, segments: list[_Segment]) -> hd.sr.Comprehensive3DSR:
    """TID 1500 Measurement Report, observed by this device, with AIR model identity."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["edgescreen-device", ctx.device_serial]),
            name="edgescreen",
            manufacturer_name=MANUFACTURER,
            model_name="edgescreen appliance",
            serial_number=ctx.device_serial,
        ),
    )
    by_key = {s.key: s for s in segments}
    if ctx.pipeline == "pancreas":
        groups = [_pancreas_group(ctx, findings, seg, by_key, sources)]
        groups += [_lesion_group(ctx, les, seg, by_key, sources) for les in findings.get("lesions") or []]
        procedure = codes.cid100.CTUnspecifiedBodyRegion
    else:
        groups = _mammo_groups(ctx, findings, sources)
        procedure = codes.cid100.XRUnspecifiedBodyRegion
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_document_evaluations(findings))
    evidence = [*sources, *([seg] if seg is not None else [])]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=ctx.uid("sr-series"),
        series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=ctx.uid("sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # nobody accountable has verified an automatic screening result
        is_verified=False,
        series_description=_series_description(ctx, "SR"),
        manufacturer_model_name="edgescreen appliance",
        software_versions=_software_versions(findings),
        device_serial_number=ctx.device_serial,
        contributing_equipment=_contributing_equipment(ctx),
        coding_schemes=_coding_schemes(),
        content_date=ctx.local.date(),
        content_time=ctx.local.time(),
    )


# ------------------------------------------------------------------------------------------ PDF


def _fmt(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):.{digits}f}{unit}"
    except (TypeError, ValueError):
        return str(value)


def _patient_lines(source: Dataset) -> list[str]:
    return [
        f"Patient: {source.get('PatientName', '')}   ID: {source.get('PatientID', '')}   "
        f"Born: {source.get('PatientBirthDate', '')}   Sex: {source.get('PatientSex', '')}",
        f"Study date: {source.get('StudyDate', '')}   Accession: {source.get('AccessionNumber', '')}   "
        f"Modality: {source.get('Modality', '')}",
        f"Study UID: {source.get('StudyInstanceUID', '')}",
    ]


def _score_line(findings: dict[str, Any]) -> list[str]:
    if findings.get("abnormal_probability") is None:
        return []
    return [f"Study score: {_fmt(findings['abnormal_probability'], 3)}   triage threshold: {_fmt(findings.get('threshold'), 3)}"]


def _pancreas_lines(findings: dict[str, Any]) -> list[str]:
    lines = [*_score_line(findings), f"Pancreas volume: {_fmt(findings.get('pancreas_volume_ml'), 1, ' ml')}"]
    organs = findings.get("organs") or {}
    if organs:
        lines.append("Organ volumes: " + ", ".join(f"{k} {_fmt(v, 0, ' ml')}" for k, v in sorted(organs.items())))
    lines.append("")
    lesions = findings.get("lesions") or []
    if not lesions:
        return [*lines, "No lesion found."]
    lines.append(f"{'Lesion':<10}{'Site':<7}{'Longest mm':>11}{'Volume ml':>11}{'P(abn)':>8}  Most likely subtype")
    for lesion in lesions:
        subtype = str(lesion.get("top_subtype") or "-")
        p_top = lesion.get("top_subtype_probability")
        if p_top is None:
            p_top = (lesion.get("subtype_probabilities") or {}).get(subtype)
        lines.append(
            f"{str(lesion.get('id', '')):<10}{str(lesion.get('location') or '-'):<7}"
            f"{_fmt(lesion.get('longest_diameter_mm')):>11}{_fmt(lesion.get('volume_ml'), 2):>11}"
            f"{_fmt(lesion.get('abnormal_probability'), 3):>8}  {subtype} ({_fmt(p_top, 2)})"
        )
    lines.append("")
    for lesion in lesions:
        probs = lesion.get("subtype_probabilities") or {}
        text = ", ".join(f"{k} {_fmt(v, 2)}" for k, v in sorted(probs.items(), key=lambda kv: -float(kv[1])))
        lines.append(f"{lesion.get('id', '')} subtype probabilities: {text or '-'}")
    return lines


def _mammo_lines(findings: dict[str, Any]) -> list[str]:
    mammo = findings.get("mammo") or {}
    lines = [*_score_line(findings), f"Exam score: {_fmt(mammo.get('exam_score'), 3)}", ""]
    breasts = mammo.get("breasts") or {}
    if breasts:
        lines.append("Per breast (max over views): " + ", ".join(f"{k} {_fmt(v, 3)}" for k, v in sorted(breasts.items())))
        lines.append("")
    lines.append(f"{'Side':<6}{'View':<7}{'P(abnormal)':>12}{'P(malignant)':>14}  Image")
    for image in mammo.get("images") or []:
        lines.append(
            f"{str(image.get('laterality', '')):<6}{str(image.get('view', '')):<7}"
            f"{_fmt(image.get('abnormal_probability'), 3):>12}{_fmt(image.get('malignant_probability'), 3):>14}"
            f"  {image.get('path') or image.get('sop_instance_uid') or ''}"
        )
        lines += [f"      note: {note}" for note in image.get("notes") or []]
    return lines


def _model_lines(findings: dict[str, Any]) -> list[str]:
    lines = [f"{'Role':<17}{'Model':<22}{'Version':<10}{'Backend':<12}{'Prec.':<6}{'Device':<7}sha256"]
    for model in findings.get("models") or []:
        lines.append(
            f"{str(model.get('role', '')):<17}{str(model.get('name', ''))[:21]:<22}{str(model.get('version', ''))[:9]:<10}"
            f"{str(model.get('backend', ''))[:11]:<12}{str(model.get('precision', ''))[:5]:<6}"
            f"{str(model.get('device', ''))[:6]:<7}{str(model.get('sha256', ''))[:16]}"
        )
    bundle = findings.get("bundle")
    if bundle:
        lines.append(f"Bundle: {bundle if not isinstance(bundle, dict) else ', '.join(f'{k}={v}' for k, v in bundle.items())}")
    return lines


def report_lines(findings: dict[str, Any], source: Dataset) -> tuple[str, list[tuple[str, str]]]:
    """The PDF's title and its lines as (style, text); style is "h" (heading), "b" (bold) or "t"."""
    title = {"pancreas": "Pancreas screening (non-contrast CT)", "mammo": "Mammography screening"}[findings["pipeline"]]
    triage = str(findings.get("triage") or "unknown").replace("_", " ").upper()
    body = _pancreas_lines(findings) if findings["pipeline"] == "pancreas" else _mammo_lines(findings)
    lines: list[tuple[str, str]] = [("t", s) for s in _patient_lines(source)]
    lines += [("t", ""), ("h", f"Result: {triage}"), ("t", "")]
    lines += [("t", s) for s in body]
    lines += [("t", ""), ("h", "Models")] + [("t", s) for s in _model_lines(findings)]
    warnings = [str(w) for w in findings.get("warnings") or []]
    if warnings:
        lines += [("t", ""), ("h", "Warnings")] + [("t", f"- {w}") for w in warnings]
    lines += [("t", ""), ("t", f"Created: {findings.get('created_at', '')}   Appliance: edgescreen {__version__}")]
    disclaimer = str(findings.get("disclaimer") or "").strip()
    if disclaimer and disclaimer != RESEARCH_USE_BANNER:
        lines += [("t", ""), ("b", disclaimer)]
    return f"edgescreen - {title}", lines


def render_pdf(title: str, lines: list[tuple[str, str]], banner: str = RESEARCH_USE_BANNER) -> bytes:
    """A small text PDF written by hand: no dependency, real (searchable, selectable) text.

    Courier is fixed-width, so tables align and wrapping is exact; the 14 standard PDF fonts need no
    embedding. Every page carries the banner at the top and RESEARCH USE ONLY in the footer.
    """
    return _PdfWriter(title, banner).render(lines)


class _PdfWriter:
    WIDTH, HEIGHT, MARGIN = 595, 842, 42  # A4 in points
    SIZE, LEADING = 8.5, 11.0
    CHARS = int((WIDTH - 2 * MARGIN) / (SIZE * 0.6))  # Courier glyphs are 0.6 em wide

    def __init__(self, title: str, banner: str) -> None:
        self.title = title
        self.banner = banner

    @staticmethod
    def _escape(text: str) -> str:
        raw = text.encode("cp1252", errors="replace").decode("latin-1")
        raw = "".join(c if c >= " " else " " for c in raw)
        return raw.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    def _wrap(self, text: str, width: int) -> list[str]:
        out: list[str] = []
        while len(text) > width:
            cut = text.rfind(" ", 0, width + 1)
            cut = cut if cut > width // 2 else width
            out.append(text[:cut].rstrip())
            text = "    " + text[cut:].lstrip()
        out.append(text)
        return out

    def _text(self, font: str, size: float, x: float, y: float, text: str) -> str:
        return f"BT /{font} {size} Tf 1 0 0 1 {x:.1f} {y:.1f} Tm ({self._escape(text)}) Tj ET\n"

    def _header(self) -> tuple[list[str], float]:
        ops = [self._text("F3", 14, self.MARGIN, self.HEIGHT - self.MARGIN - 14, self.title)]
        banner = self._wrap(self.banner, self.CHARS - 2)
        top = self.HEIGHT - self.MARGIN - 24
        box_h = len(banner) * self.LEADING + 8
        ops.append(f"0.88 g {self.MARGIN} {top - box_h:.1f} {self.WIDTH - 2 * self.MARGIN} {box_h:.1f} re f 0 g\n")
        y = top - 4 - self.SIZE
        for line in banner:
            ops.append(self._text("F2", self.SIZE, self.MARGIN + 4, y, line))
            y -= self.LEADING
        return ops, y - self.LEADING

    def _pages(self, lines: list[tuple[str, str]]) -> list[list[str]]:
        pages: list[list[str]] = []
        ops, y = self._header()
        for style, text in lines:
            font, size = {"h": ("F3", 11.0), "b": ("F2", self.SIZE), "t": ("F1", self.SIZE)}[style]
            for piece in self._wrap(text, self.CHARS) if style != "h" else [text]:
                if y < self.MARGIN + 2 * self.LEADING:
                    pages.append(ops)
                    ops, y = self._header()
                ops.append(self._text(font, size, self.MARGIN, y, piece))
                y -= self.LEADING * (1.3 if style == "h" else 1.0)
        pages.append(ops)
        for number, page in enumerate(pages, 1):
            footer = f"{RESEARCH_TAG} - page {number} of {len(pages)}"
            page.append(self._text("F1", 7, self.MARGIN, self.MARGIN - 14, footer))
        return pages

    def render(self, lines: list[tuple[str, str]]) -> bytes:
        pages = self._pages(lines)
        n_pages = len(pages)
        first_page = 6  # 1 catalog, 2 pages, 3-5 fonts; then page/content pairs; then info
        kids = " ".join(f"{first_page + 2 * i} 0 R" for i in range(n_pages))
        objects = [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode(),
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Courier /Encoding /WinAnsiEncoding >>",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Courier-Bold /Encoding /WinAnsiEncoding >>",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>",
        ]
        for i, ops in enumerate(pages):
            content = "".join(ops).encode("latin-1")
            objects.append(
                f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {self.WIDTH} {self.HEIGHT}] "
                f"/Resources << /Font << /F1 3 0 R /F2 4 0 R /F3 5 0 R >> >> /Contents {first_page + 2 * i + 1} 0 R >>".encode()
            )
            objects.append(f"<< /Length {len(content)} >>\nstream\n".encode() + content + b"endstream")
        objects.append(f"<< /Title ({self._escape(self.title)}) /Producer (edgescreen {__version__}) >>".encode())
        out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        offsets = []
        for number, body in enumerate(objects, 1):
            offsets.append(len(out))
            out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
        xref = len(out)
        out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
        out += b"".join(f"{off:010d} 00000 n \n".encode() for off in offsets)
        out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info {len(objects)} 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
        return bytes(out)


def build_encapsulated_pdf(ctx: _Context, findings: dict[str, Any], sources: Sequence[Dataset],
                           derived_from: Sequence[Dataset]) -> Dataset:
    """Encapsulated PDF Storage with the summary; patient and study copied from the source."""
    source = sources[0]
    title, lines = report_lines(findings, source)
    pdf = render_pdf(title, lines)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ctx.uid("pdf")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    now = dt.datetime.now()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    for keyword in _PATIENT_STUDY_KEYWORDS:  # Patient, General Study (type 2 ones created empty below)
        if keyword in source:
            ds[keyword] = source[keyword]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = ctx.uid("pdf-series")
    ds.SeriesNumber = SERIES_NUMBERS["pdf"]
    ds.SeriesDescription = _series_description(ctx, "PDF report")
    # General Equipment + SC Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "edgescreen appliance"
    ds.DeviceSerialNumber = ctx.device_serial
    ds.SoftwareVersions = _software_versions(findings)
    ds.ConversionType = "SYN"  # synthesised by software, not digitised from film or paper
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate = ctx.local.strftime("%Y%m%d")
    ds.ContentTime = ctx.local.strftime("%H%M%S")
    ds.AcquisitionDateTime = ctx.local.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the PDF shows the patient's name and ID
    ds.DocumentTitle = f"{RESEARCH_TAG} - {title}"  # ST: up to 1024 characters
    concept = Dataset()
    concept.CodeValue = DIAGNOSTIC_IMAGING_REPORT.value
    concept.CodingSchemeDesignator = DIAGNOSTIC_IMAGING_REPORT.scheme_designator
    concept.CodeMeaning = DIAGNOSTIC_IMAGING_REPORT.meaning
    ds.ConceptNameCodeSequence = [concept]
    ds.SourceInstanceSequence = [_reference(d) for d in [*derived_from, *sources]]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.ContributingEquipmentSequence = _contributing_equipment(ctx)
    return ds


def _reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


# ------------------------------------------------------------------------------------------ writing


def _save(ds: Dataset, path: Path) -> Path:
    """Temp name, fsync, rename: a reader (the C-STORE sender) never sees half a file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return atomic_write(path, buffer.getbuffer())


def write_dicom_outputs(
    findings: dict[str, Any],
    source_datasets: list[pydicom.Dataset],
    masks: dict[str, np.ndarray],
    out_dir: Path,
    *,
    device_serial: str | None = None,
) -> list[Path]:
    """Write SEG (pancreas only, when a mask is non-empty), SR and PDF; return their paths in that order.

    `source_datasets` are the analysed series' images in mask z order (CT) or the exam's images
    (MG); headers suffice. `masks` are uint8 (z, y, x) on the source grid keyed "pancreas",
    "lesion_1", ...; ignored for mammography. `device_serial` names this box in the equipment
    attributes (default: the host name). Files: seg.dcm, sr.dcm, report.dcm in `out_dir`, replaced
    if present. Raises DicomOutputError when the inputs do not fit; nothing is written then.
    """
    findings = normalise_findings(findings)
    ctx = _context(findings, source_datasets, device_serial)
    bound = log.bind(study=ctx.study_uid, pipeline=ctx.pipeline)
    seg, segments = None, []
    if ctx.pipeline == "pancreas":
        seg, segments = build_segmentation(ctx, findings, source_datasets, masks)
    elif masks:
        bound.info("mammography masks are not written as SEG; the heatmaps are in the findings")
    sr = build_sr(ctx, findings, source_datasets, seg, segments)
    pdf = build_encapsulated_pdf(ctx, findings, source_datasets, [sr, *([seg] if seg is not None else [])])
    # everything is built before anything is written: a failure leaves no partial set behind
    outputs = [("seg.dcm", seg), ("sr.dcm", sr), ("report.dcm", pdf)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_save(ds, out_dir / name) for name, ds in outputs if ds is not None]
    bound.info("dicom outputs written", files=",".join(p.name for p in written),
               segments=",".join(f"{s.key}:{s.voxels}" for s in segments))
    return written
