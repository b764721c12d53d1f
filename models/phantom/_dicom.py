"""DICOM plumbing shared by the CT and mammography phantoms: identities, dates, file meta, writing.

Why: every phantom file must be a real, valid DICOM object (dciodvfy clean) whose identity follows
from the seed alone, so two runs give byte-identical files and a PACS sees the same study twice.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from edgescreen.appliance import RESEARCH_USE_BANNER

MANUFACTURER = "edgescreen phantom"
INSTITUTION = "edgescreen synthetic data"


def uid(*parts: object) -> str:
    """A UID fixed by ``parts`` (seed, kind, ...): deterministic, globally unique enough, valid."""
    return generate_uid(entropy_srcs=["edgescreen-phantom", *(str(p) for p in parts)])


def study_datetime(kind: str, seed: int) -> tuple[str, str]:
    """A study date and time derived from the seed (never today's date: files must be reproducible)."""
    day = dt.date(2021, 1, 4) + dt.timedelta(days=(seed * 37 + (0 if kind == "CT" else 11)) % 1400)
    minutes = 7 * 60 + (seed * 53) % (10 * 60)
    return day.strftime("%Y%m%d"), f"{minutes // 60:02d}{minutes % 60:02d}00"


def birth_date(study_date: str, age: int, seed: int) -> str:
    d = dt.datetime.strptime(study_date, "%Y%m%d").date()
    born = d.replace(year=d.year - age) - dt.timedelta(days=(seed * 7919) % 360)
    return born.strftime("%Y%m%d")


def patient_module(ds: Dataset, kind: str, seed: int, sex: str, age: int, study_date: str) -> None:
    """Obviously synthetic patient identity, so nobody mistakes a phantom for a person."""
    ds.PatientName = f"PHANTOM^{kind}^S{seed:04d}"
    ds.PatientID = f"PHANTOM-{kind}-{seed:04d}"
    ds.PatientBirthDate = birth_date(study_date, age, seed)
    ds.PatientSex = sex
    ds.PatientAge = f"{min(age, 999):03d}Y"
    ds.PatientIdentityRemoved = "NO"
    ds.PatientComments = RESEARCH_USE_BANNER
    ds.BurnedInAnnotation = "NO"


def study_module(ds: Dataset, kind: str, seed: int, study_uid: str, description: str) -> None:
    date, time = study_datetime(kind, seed)
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{kind}{seed % 100000:05d}"
    ds.AccessionNumber = f"PH{kind}{seed % 10**8:08d}"
    ds.StudyDescription = description


def equipment_module(ds: Dataset, model: str) -> None:
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = INSTITUTION
    ds.ManufacturerModelName = model
    ds.DeviceSerialNumber = "PHANTOM-0001"
    ds.SoftwareVersions = "edgescreen-phantom-1"


def new_file_dataset(sop_class: str, sop_instance: str) -> Dataset:
    """An empty dataset with its file meta (explicit VR little endian), ready for ``save``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "EDGESCREEN_PH1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    return ds


def save(ds: Dataset, path: Path) -> None:
    """Write to a temp name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
