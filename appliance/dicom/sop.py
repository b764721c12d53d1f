"""What the DICOM service accepts and what it answers: SOP classes, transfer syntaxes, status codes.

SOP classes: CT (plain, enhanced, legacy-converted enhanced) and mammography (For Presentation,
For Processing) are what the pipelines read. Secondary Capture is accepted too, stored and shown as
not analysed: scanners push dose screens and screenshots with their studies, and some refuse to
send the whole study when one of its SOP classes is rejected at association.
"""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

CT_SOP_CLASSES = frozenset({CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage})
MG_FOR_PRESENTATION = DigitalMammographyXRayImageStorageForPresentation
MG_FOR_PROCESSING = DigitalMammographyXRayImageStorageForProcessing
MG_SOP_CLASSES = frozenset({MG_FOR_PRESENTATION, MG_FOR_PROCESSING})
STORAGE_SOP_CLASSES: tuple[str, ...] = (
    CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage,
    MG_FOR_PRESENTATION, MG_FOR_PROCESSING, SecondaryCaptureImageStorage,
)
MULTIFRAME_SOP_CLASSES = frozenset({EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage})

NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})
# Order matters: pynetdicom accepts, per presentation context, the first of OUR syntaxes the peer
# proposed. Lossless compressed first (the peer proposed it because its file already is: keep it as
# sent), then uncompressed, and lossy last, so a peer offering [lossy, uncompressed] in one context
# for an uncompressed image is never asked to degrade it.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1, JPEGLossless,
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEGLSNearLossless,
)

# -- DIMSE status codes (PS3.4 Annex B for C-STORE, Annex F for MPPS, PS3.7 C.4) ---------------------
SUCCESS = 0x0000
# C-STORE failures
OUT_OF_RESOURCES = 0xA700  # refused: disk full (the sender may retry later)
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # wrong SOP class, missing UIDs, not an image, bad pixel length
CANNOT_UNDERSTAND = 0xC000  # the data set could not be parsed (truncated, garbage)
CANNOT_UNDERSTAND_SERIES_CONFLICT = 0xC001  # parsed, but contradicts its series (modality, size, study)
CANNOT_UNDERSTAND_PROCESSING = 0xC002  # an unexpected error of ours; logged with its traceback
# N-CREATE / N-SET failures (the codes of pynetdicom's MPPS example)
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
MISSING_ATTRIBUTE = 0x0120

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
