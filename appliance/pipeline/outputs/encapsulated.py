"""Encapsulated PDF Storage: the report for sites without a SEG/SR-capable viewer (any PACS stores it,
any workstation opens it, the clinic can print it). Patient and study are copied from the source."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from edgescreen.appliance.pipeline.outputs.codes import (
    DIAGNOSTIC_IMAGING_REPORT,
    ENCAPSULATED_PDF_STORAGE,
    MANUFACTURER,
    RESEARCH_TAG,
    SERIES_NUMBERS,
)
from edgescreen.appliance.pipeline.outputs.context import (
    PATIENT_STUDY_KEYWORDS,
    TYPE2_PATIENT_STUDY,
    OutputContext,
)
from edgescreen.appliance.pipeline.outputs.pdf import render_pdf
from edgescreen.appliance.pipeline.outputs.text import report_blocks


def _reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def build_encapsulated_pdf(ctx: OutputContext, findings: dict[str, Any], sources: Sequence[Dataset],
                           derived_from: Sequence[Dataset]) -> Dataset:
    """Encapsulated PDF Storage with the summary; patient and study copied from the source.

    `derived_from`: the SR, the SEG and the source images they cite, named in the Source Instance
    Sequence (not every image of the series: the SR says which images each finding lies on).
    """
    source = sources[0]  # completed by the caller: type 2 attributes present, a character set that fits
    title, blocks = report_blocks(findings, source)
    pdf = render_pdf(title, blocks, created=ctx.created)
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
    for keyword in PATIENT_STUDY_KEYWORDS:  # Patient, General Study (type 2 ones created empty below)
        if keyword in source:
            ds[keyword] = source[keyword]
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = ctx.uid("pdf-series")
    ds.SeriesNumber = SERIES_NUMBERS["pdf"]
    ds.SeriesDescription = ctx.series_description("PDF report")
    # General Equipment + SC Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "edgescreen appliance"
    ds.DeviceSerialNumber = ctx.device_serial
    ds.SoftwareVersions = ctx.software_versions
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
    ds.SourceInstanceSequence = [_reference(d) for d in derived_from]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf if len(pdf) % 2 == 0 else pdf + b"\0"  # OB values have even length
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.ContributingEquipmentSequence = ctx.contributing_equipment()
    return ds
