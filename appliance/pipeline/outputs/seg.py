"""DICOM SEG (binary, one segment per structure): a SEG-capable viewer overlays the pancreas and every lesion.

Source images are the CT slice headers in the order of the mask's z axis; headers suffice (highdicom
needs geometry and identifiers, never the pixel data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from edgescreen.appliance import RESEARCH_USE_BANNER
from edgescreen.appliance.pipeline.outputs.codes import (
    MANUFACTURER,
    NEOPLASM,
    PANCREAS,
    PANCREAS_PARTS,
    RESEARCH_TAG,
    SEGMENT_COLOURS,
    SERIES_NUMBERS,
    coding_schemes,
)
from edgescreen.appliance.pipeline.outputs.context import DicomOutputError, OutputContext, log


@dataclass(frozen=True)
class Segment:
    key: str  # "pancreas" or "lesion_<n>"
    number: int  # 1-based segment number in the SEG
    tracking_uid: str
    voxels: int
    slices: tuple[int, ...]  # indices into the source datasets where this segment has voxels


def _segment_order(key: str) -> tuple[int, int]:
    return (0, 0) if key == "pancreas" else (1, int(key[7:]))


def mask_stack(masks: dict[str, np.ndarray], shape: tuple[int, int, int]
               ) -> tuple[list[str], np.ndarray, np.ndarray, list[np.ndarray]]:
    """(keys, occupied slice indices, (slices, y, x, n) bool, each key's slice indices) for the non-empty masks.

    Segment order is pancreas first, then lesions by number. Only slices where some mask is set are
    stacked: a 300-slice 512x512 CT with four segments would otherwise need ~300 MB of booleans,
    too much beside the models on a 4 GB Jetson; omit_empty_frames drops those frames anyway. Each
    mask is scanned once, for the slices it lies on; emptiness and the union follow from those.
    """
    per_key: dict[str, np.ndarray] = {}
    for key, mask in masks.items():
        if key != "pancreas" and not (key.startswith("lesion_") and key[7:].isdigit()):
            raise DicomOutputError(f"mask key {key!r} is not 'pancreas' or 'lesion_<n>'")
        if mask.shape != shape:
            raise DicomOutputError(f"mask {key!r} has shape {mask.shape}; the source grid is {shape} (z, y, x)")
        slices = np.flatnonzero(mask.reshape(shape[0], -1).any(axis=1))
        if slices.size:
            per_key[key] = slices
        else:
            log.info("empty mask left out of the SEG", segment=key)
    keys = sorted(per_key, key=_segment_order)
    z = np.unique(np.concatenate([per_key[k] for k in keys])) if keys else np.zeros(0, dtype=np.intp)
    stack = np.stack([masks[k][z] != 0 for k in keys], axis=-1) if keys else np.zeros((0, *shape[1:], 0), bool)
    return keys, z, stack, [per_key[k] for k in keys]


def algorithm(ctx: OutputContext, role: str) -> hd.AlgorithmIdentificationSequence:
    model = ctx.model(role)
    return hd.AlgorithmIdentificationSequence(name=str(model.get("name"))[:64], family=codes.cid7162.ArtificialIntelligence,
                                              version=str(model.get("version"))[:64], source=MANUFACTURER)


def _segment_description(ctx: OutputContext, key: str, number: int, tracking_uid: str,
                         lesion: dict[str, Any] | None) -> hd.seg.SegmentDescription:
    if key == "pancreas":
        return hd.seg.SegmentDescription(
            segment_number=number, segment_label="Pancreas", segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=PANCREAS, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm(ctx, "pancreas.stage1"), tracking_uid=tracking_uid,
            tracking_id="pancreas", display_color=hd.color.CIELabColor.from_string(SEGMENT_COLOURS["pancreas"]),
        )
    part = PANCREAS_PARTS.get(str((lesion or {}).get("location") or "").lower())
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=f"Lesion {key[7:]}",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure, segmented_property_type=NEOPLASM,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm(ctx, "pancreas.stage2"), tracking_uid=tracking_uid, tracking_id=key,
        anatomic_regions=[part or PANCREAS], display_color=hd.color.CIELabColor.from_string(SEGMENT_COLOURS["lesion"]),
    )


def build_segmentation(ctx: OutputContext, findings: dict[str, Any], sources: Sequence[Dataset],
                       masks: dict[str, np.ndarray]) -> tuple[hd.seg.Segmentation | None, list[Segment]]:
    """A BINARY SEG with one segment per non-empty mask, or None when every mask is empty."""
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    keys, z, stack, slices = mask_stack(masks, shape)
    if not keys:
        return None, []
    lesions = {str(les.get("id")): les for les in findings.get("lesions") or []}
    segments = [
        Segment(key, i + 1, ctx.uid("segment", key), int(np.count_nonzero(masks[key])), tuple(int(j) for j in slices[i]))
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
        software_versions=ctx.software_versions,
        device_serial_number=ctx.device_serial,
        content_description=RESEARCH_TAG,
        content_label="EDGESCREEN",
        content_creator_name="edgescreen^appliance",
        series_description=ctx.series_description("SEG"),
        omit_empty_frames=True,
        contributing_equipment=ctx.contributing_equipment(),
        coding_schemes=coding_schemes(),
        content_date=ctx.local.date(),
        content_time=ctx.local.time(),
        content_qualification="RESEARCH",
    )
    seg.ImageComments = RESEARCH_USE_BANNER  # the SEG IOD has General Image; SR and PDF carry it in their body
    return seg, segments
