"""What the SEG, SR and PDF share: the result's identity, its time, its models, deterministic UIDs, and
source headers completed so that every accepted series gets its outputs.

UIDs are derived from the findings document (study, series, pipeline, created_at, kind) rather than
random: writing the outputs of the same findings again (a retried output step, a re-export from the
stored findings.json) yields the same SOP instances, so a PACS sees one result, not two. A new
analysis has a new created_at and therefore new instances.
"""

from __future__ import annotations

import datetime as dt
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from edgescreen.appliance import __version__
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.pipeline.outputs.codes import MANUFACTURER, PROCESSING_EQUIPMENT, RESEARCH_TAG

log = get_logger("edgescreen.appliance.pipeline.outputs")

# Patient and General Study attributes of type 2 (present, may be empty) in every IOD we write. A
# source series may lack them altogether (anonymised series often do); PS3.3 lets us write them empty.
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")
# Copied verbatim onto the PDF when present (highdicom copies them for SEG and SR).
PATIENT_STUDY_KEYWORDS = (*TYPE2_PATIENT_STUDY, "IssuerOfPatientID", "OtherPatientIDsSequence", "PatientAge",
                          "PatientSize", "PatientWeight", "PatientIdentityRemoved", "DeidentificationMethod",
                          "StudyInstanceUID", "StudyDescription")


class DicomOutputError(ValueError):
    """The findings, masks and source images do not fit together; the message says how."""


@dataclass(frozen=True)
class OutputContext:
    """Everything shared by the three objects: identity, time, models, deterministic UIDs."""

    pipeline: str
    study_uid: str
    created: dt.datetime
    models: list[dict[str, Any]]
    device_serial: str
    seed: str  # entropy for deterministic UIDs
    software_versions: str

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

    def series_description(self, kind: str) -> str:
        what = {"pancreas": "pancreas CT", "mammo": "mammography"}[self.pipeline]
        return f"{RESEARCH_TAG} edgescreen {what} {kind}"[:64]

    def contributing_equipment(self) -> list[hd.ContributingEquipment]:
        """One item per model, as IHE AIR asks: who made the result, with which model and version."""
        items = []
        for model in self.models:
            details = " ".join(f"{key}={model[key]}" for key in ("role", "backend", "precision", "device", "sha256")
                               if model.get(key))
            items.append(hd.ContributingEquipment(
                manufacturer=MANUFACTURER, purpose_of_reference=PROCESSING_EQUIPMENT,
                manufacturer_model_name=str(model.get("name") or "unknown")[:64],
                software_versions=str(model.get("version") or "unknown")[:64],
                device_serial_number=self.device_serial, contribution_datetime=self.local,
                contribution_description=details[:1024] or None,
            ))
        return items


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


def _software_versions(findings: dict[str, Any]) -> str:
    bundle = findings.get("bundle")
    bundle_id = (bundle.get("id") or bundle.get("name")) if isinstance(bundle, dict) else bundle
    return (f"edgescreen {__version__}" + (f" bundle {bundle_id}" if bundle_id else ""))[:64]


def output_context(findings: dict[str, Any], sources: Sequence[Dataset], device_serial: str | None = None) -> OutputContext:
    """The shared context, the study taken from the first source header (the only one read here).

    Every other header is read only when an output cites it, and `SourceHeaders` checks each one then:
    a 300-slice series is 300 header parses, more than the rest of the outputs' work on a small box.
    """
    if not sources:
        raise DicomOutputError("no source datasets: outputs must reference the images they were derived from")
    study_uid = str(sources[0].get("StudyInstanceUID", "") or "")
    if not study_uid:
        raise DicomOutputError("a source image has no StudyInstanceUID: outputs cannot be filed into its study")
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
    return OutputContext(pipeline, study_uid, created, list(findings.get("models") or []), serial, seed,
                         _software_versions(findings))


def _complete(ds: Dataset) -> Dataset:
    """A shallow copy of the header with every absent type 2 patient/study attribute present and empty.

    highdicom copies the patient and study modules from the first source image and fails on an attribute
    that is not there at all; PS3.3 says a type 2 attribute the source does not know is written empty.
    The caller's dataset is not changed (it is the store's header).
    """
    missing = [k for k in TYPE2_PATIENT_STUDY if k not in ds]
    # values already decoded to str but no character set to write them in: declare UTF-8
    charset = "SpecificCharacterSet" not in ds and not all(str(ds.get(k, "")).isascii() for k in PATIENT_STUDY_KEYWORDS)
    if not missing and not charset:
        return ds
    clone = Dataset()  # a new Dataset over the same elements: cheap, and the source stays as it was
    clone.update(ds)
    if hasattr(ds, "file_meta"):
        clone.file_meta = ds.file_meta
    clone.filename = getattr(ds, "filename", None)
    for keyword in missing:
        setattr(clone, keyword, "")
    if charset:
        clone.SpecificCharacterSet = "ISO_IR 192"
    return clone


class SourceHeaders(Sequence[Dataset]):
    """The source headers as the outputs use them: each completed (see `_complete`) and checked to be of
    the study on first use, and only then.

    The outputs cite the images a finding lies on, not the whole series, so most headers of a CT series
    are never needed; with the loader's lazily parsed headers (ctload.LazyDatasets) they are then never
    parsed either. Index with an int; iterating touches every header, which the outputs avoid.
    """

    def __init__(self, sources: Sequence[Dataset], study_uid: str) -> None:
        self._sources = sources
        self._study_uid = study_uid
        self._done: dict[int, Dataset] = {}

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]
        if index not in self._done:
            ds = self._sources[index]
            study = str(ds.get("StudyInstanceUID", "") or "")
            if study != self._study_uid:
                # a result must never cite an image of another study (another patient, perhaps)
                raise DicomOutputError(f"source image {index} ({ds.get('SOPInstanceUID', 'no SOP Instance UID')}) is "
                                       f"from study {study or '(none)'}, not {self._study_uid}: the source datasets "
                                       "must all be of one study")
            self._done[index] = _complete(ds)
        return self._done[index]
