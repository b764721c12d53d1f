"""Results for PACS, viewers and the doctor: a DICOM SEG, a TID 1500 SR, an Encapsulated PDF, and the
label volume the web viewer draws.

Why three DICOM objects (MONAI Deploy and IHE AI Results do the same): the SEG lets a SEG-capable
viewer overlay the pancreas and every lesion; the SR carries the numbers in coded form, each lesion
linked to its segment; the PDF is for sites without either. Rules every output follows: the source
StudyInstanceUID, a new series, the patient module copied from the source (absent type 2 attributes
written empty), Manufacturer "edgescreen", "RESEARCH USE ONLY" in the SeriesDescription, the
research-use banner in the body, the identity of every model in the ContributingEquipmentSequence
(IHE AIR), the validated-domain verdict and the operating point in force.

Modules: codes (coded concepts), context (shared identity, UIDs, completed source headers), seg, sr,
text (the report in words), fonts and pdf (the PDF document), encapsulated (its DICOM wrapper),
write (build all, then write all), labels (the viewer's label volume).
"""

from edgescreen.appliance.pipeline.outputs.context import DicomOutputError
from edgescreen.appliance.pipeline.outputs.write import write_dicom_outputs

__all__ = ["DicomOutputError", "write_dicom_outputs"]
