"""Build every DICOM output first, then write each atomically: a failure leaves no partial set behind.

Files: seg.dcm (pancreas, when a mask is non-empty), sr.dcm, report.dcm in the output directory, each
written to a temp name, fsynced and renamed (a reader such as the C-STORE sender never sees half a file).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from edgescreen.appliance.pipeline.outputs.context import (
    SourceHeaders,
    log,
    normalise_findings,
    output_context,
)
from edgescreen.appliance.pipeline.outputs.encapsulated import build_encapsulated_pdf
from edgescreen.appliance.pipeline.outputs.seg import build_segmentation
from edgescreen.appliance.pipeline.outputs.sr import build_sr
from edgescreen.appliance.store.files import atomic_write


def save_dataset(ds: Dataset, path: Path) -> Path:
    """Temp name, fsync, rename."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return atomic_write(path, buffer.getbuffer())


def write_dicom_outputs(findings: dict[str, Any], source_datasets: list[Dataset], masks: dict[str, np.ndarray],
                        out_dir: Path, *, device_serial: str | None = None) -> list[Path]:
    """Write SEG (pancreas only, when a mask is non-empty), SR and PDF; return their paths in that order.

    `source_datasets` are the analysed series' images in mask z order, ascending along the slice normal
    (CT), or the exam's images (MG); headers suffice, and type 2 patient/study attributes they lack are
    written empty. Only the headers the outputs cite are read (the first one, the slices a segment or
    a lesion lies on), so a lazily parsed sequence (ctload.LazyDatasets) stays mostly unparsed. `masks`
    are uint8 (z, y, x) on the source grid keyed "pancreas", "lesion_1", ...; ignored for mammography.
    `device_serial` names this box in the equipment attributes (default: the host name). Raises
    DicomOutputError when the inputs do not fit; nothing is written then.
    """
    findings = normalise_findings(findings)
    ctx = output_context(findings, source_datasets, device_serial)
    sources = SourceHeaders(source_datasets, ctx.study_uid)
    bound = log.bind(study=ctx.study_uid, pipeline=ctx.pipeline)
    seg, segments = None, []
    if ctx.pipeline == "pancreas":
        seg, segments = build_segmentation(ctx, findings, sources, masks)
    elif masks:
        bound.info("mammography masks are not written as SEG; the heatmaps are in the findings")
    sr, cited = build_sr(ctx, findings, sources, seg, segments)
    pdf = build_encapsulated_pdf(ctx, findings, sources, [sr, *([seg] if seg is not None else []), *cited])
    outputs = [("seg.dcm", seg), ("sr.dcm", sr), ("report.dcm", pdf)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [save_dataset(ds, out_dir / name) for name, ds in outputs if ds is not None]
    bound.info("dicom outputs written", files=",".join(p.name for p in written),
               segments=",".join(f"{s.key}:{s.voxels}" for s in segments))
    return written
