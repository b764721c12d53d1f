"""The coded concepts the SEG and SR use: standard codes where they exist, the private 99EDGS scheme elsewhere.

Standard codes come from pydicom's copy of PS3.16 where it has them; the pancreas parts are SNOMED CT
body structures (checked against public SNOMED-coded value sets). Concepts that have no standard code
(our triage, the validated domain, the operating point, the non-PDAC subtypes) use the private scheme
99EDGS, declared in every object's CodingSchemeIdentificationSequence as PS3.3 C.12.1.1.2 requires.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

MANUFACTURER = "edgescreen"
RESEARCH_TAG = "RESEARCH USE ONLY"
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
SERIES_NUMBERS = {"seg": 9701, "sr": 9702, "pdf": 9703}

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
VALIDATED_DOMAIN = Code("ES-DOMAIN", LOCAL_SCHEME, "Within the models' validated domain")
DOMAIN_REASON = Code("ES-DOMREASON", LOCAL_SCHEME, "Reason outside the validated domain")
OPERATING_POINT = Code("ES-OPPOINT", LOCAL_SCHEME, "Operating point in force")
IN_DOMAIN = Code("ES-INDOM", LOCAL_SCHEME, "Within validated domain")
OUT_OF_DOMAIN = Code("ES-OUTDOM", LOCAL_SCHEME, "Outside validated domain")

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


def coding_schemes() -> list[CodingSchemeIdentificationItem]:
    return [CodingSchemeIdentificationItem(designator=LOCAL_SCHEME, name="edgescreen local codes",
                                           responsible_organization="edgescreen")]


def subtype(name: str) -> tuple[str, Code]:
    """(short id, code) for a class name as the model card spells it ("PDAC", "cp", "Chronic pancreatitis")."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key in SUBTYPES:
        return SUBTYPES[key]
    short = key.upper()[:11]
    return short, Code(f"ES-{short}", LOCAL_SCHEME, name[:64] or "unknown")


def triage_code(value: str) -> Code:
    key = value.strip().lower()
    return TRIAGE_CODES.get(key, Code(f"ES-{key.upper()}"[:16], LOCAL_SCHEME, value[:64] or "unknown"))


def probability_code(name: str) -> Code:
    short, code = subtype(name)
    return Code(f"ES-P-{short}", LOCAL_SCHEME, f"Probability of {code.meaning}"[:64])


def operating_point_code(name: str, meaning: str) -> Code:
    return Code(f"ES-OP-{name.upper()}"[:16], LOCAL_SCHEME, meaning[:64] or name)
