"""De-identification of what leaves for the cloud: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile, with the options a site chooses ([sync.deid]).

The profile itself (which attribute is removed, emptied, replaced with a dummy or given a new UID) comes
from dicom-anonymizer (KitwareMedical), whose tables are generated from each edition of PS3.15 Table E.1-1
(we use its 2026c table) and whose per-VR dummy values we use. What we add, and why (measured on our own
SEG and SR, see the sync note):

- its traversal applies the table to top-level attributes only, so a SEG kept 2,000+ original source-image
  SOP Instance UIDs nested in the per-frame functional groups; we apply the table at every nesting level;
- its UID replacement is random per process, so the same study sent twice maps to different UIDs; ours is
  an HMAC-SHA256 of the original UID under a per-site secret (the "2.25." UUID-derived form), so repeated
  sends of a study, and the SEG and the SR that reference each other, map to the same UIDs;
- it replaces an SR's Content Sequence with dummies; we apply the Clean Structured Content option (keep
  the tree, de-identify every item in it by the same table), so the findings survive;
- the options: Retain Longitudinal Temporal Information with Modified Dates (dates shifted by a per-patient
  offset derived from the secret), Retain Device Identity, Retain Patient Characteristics;
- descriptors that edgescreen itself wrote (the research-use banner) are kept (Clean Descriptors);
- the SR's TEXT items are edgescreen's own sentences, but some quote a header (the domain gate's
  "description 'CT ABD ...'" evidence quotes the StudyDescription, an Annex E "X" attribute): quoted
  values, UIDs, paths and the patient's identifiers in them are replaced (`scrub_text`, the one rule for
  free text that leaves the box: summaries and heartbeats use it too);
- PatientIdentityRemoved, DeidentificationMethod and DeidentificationMethodCodeSequence (CID 7050);
- a final check: the result must contain none of the source's identifiers (name, IDs, birth date,
  accession, every replaced UID), else DeidError and nothing is sent.

Private attributes are removed wherever they occur.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import io
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from edgescreen.appliance import __version__

PROFILE_EDITION = "dicomfields_2026c"
BANNER_PREFIX = "RESEARCH USE ONLY"

# CID 7050 De-identification Method codes (DCM)
CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "structured": ("113104", "Clean Structured Content Option"),
    "descriptors": ("113105", "Clean Descriptors Option"),
    "dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "patient": ("113108", "Retain Patient Characteristics Option"),
    "device": ("113109", "Retain Device Identity Option"),
}

# PS3.15 Table E.1-1, column "Rtn. Pat. Chars. Opt." (K)
PATIENT_CHARACTERISTICS = ("PatientAge", "PatientSex", "PatientSexNeutered", "PatientSize", "PatientWeight",
                           "EthnicGroup", "SmokingStatus", "PregnancyStatus", "Allergies", "MedicalAlerts",
                           "SpecialNeeds", "PatientState")
# column "Rtn. Dev. Id. Opt." (K)
DEVICE_IDENTITY = ("StationName", "DeviceSerialNumber", "DeviceUID", "DeviceLabel", "DetectorID", "GantryID",
                   "GeneratorID", "PlateID", "CassetteID", "SourceSerialNumber", "PerformedStationAETitle",
                   "PerformedStationName", "ScheduledStationAETitle", "ScheduledStationName", "DeviceDescription",
                   "UniqueDeviceIdentifier", "DeviceAlternateIdentifier", "DeviceID")
# free text that edgescreen writes (the research-use banner): kept when it is ours (starts with the banner)
OUR_DESCRIPTORS = ("SeriesDescription", "ImageComments", "PatientComments", "ContentDescription")
# dates the Modified Dates option does not keep: a birth date is identity, not a study's timeline
_NEVER_SHIFTED = frozenset({(0x0010, 0x0030), (0x0010, 0x0032)})
_DATE_DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000"}
# UI attributes that name a kind of thing, not an instance: never replaced
_CLASS_UIDS = frozenset({"TransferSyntaxUID", "ImplementationClassUID", "CodingSchemeUID", "MappingResourceUID",
                         "ContextUID", "ContextGroupExtensionCreatorUID", "PrivateInformationCreatorUID",
                         "TemplateExtensionOrganizationUID", "TemplateExtensionCreatorUID"})
# the patient's identity: none of these values may survive anywhere in the result
_PHI_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
                 "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator", "OtherPatientNames",
                 "PatientMotherBirthName")


_TEXT_VALUE = (0x0040, 0xA160)
# runs of digits and dots: a replaced UID (or an all-digit ID) can only occur inside one
_DIGIT_RUN = re.compile(r"[0-9.]{6,}")
_DIGIT_RUN_BYTES = re.compile(rb"[0-9.]{6,}")


class _DigitNeedles:
    """Finds which of many digit-and-dot strings (a SEG's hundreds of replaced UIDs) occur anywhere in a text:
    one pass over its digit runs with a 6-character prefix index, instead of one scan per UID."""

    def __init__(self, needles: set[str]) -> None:
        self.by_prefix: dict[str, list[str]] = {}
        for n in needles:
            self.by_prefix.setdefault(n[:6], []).append(n)

    def found(self, runs: Any) -> set[str]:
        out: set[str] = set()
        for run in runs:
            for i in range(len(run) - 5):
                for n in self.by_prefix.get(run[i:i + 6], ()):
                    if run.startswith(n, i):
                        out.add(n)
        return out
_UID_RE = re.compile(r"\b\d+(?:\.\d+){3,}\b")
_PATH_RE = re.compile(r"(?:/[^\s:;,'\"()]+)+")
# a quoted value as Python's repr and our messages write it: 'x' or "x", not an apostrophe inside a word
_QUOTED_RE = re.compile(r"""(?<!\w)(['"])(?:(?!\1).)*\1(?!\w)""")


class DeidError(RuntimeError):
    """The result still carries an identifier of its source; it must not leave the box."""


def _token(value: str) -> re.Pattern[str]:
    """`value` as a whole token, any case: an ID 4821 is not found inside 0.148213 or a hash, a name part
    LEE not inside SLEEP; a name or ID written as its own word is."""
    return re.compile(r"(?<![0-9A-Za-z])" + re.escape(value) + r"(?![0-9A-Za-z])", re.IGNORECASE)


def _usable(identifiers: Any) -> list[str]:
    return sorted({str(v).strip() for v in identifiers if v and len(str(v).strip()) >= 3}, key=len, reverse=True)


def find_identifiers(text: str, identifiers: Any) -> list[str]:
    """Which of `identifiers` (at least 3 characters) occur in `text` as whole tokens."""
    return [v for v in _usable(identifiers) if _token(v).search(text)]


def scrub_text(text: str, identifiers: Any = ()) -> str:
    """Free text fit to leave the box: quoted values (messages quote header fields such as a study
    description), UIDs, file paths and the given identifiers (whole tokens) are replaced."""
    out = _QUOTED_RE.sub("'<removed>'", str(text))
    out = _UID_RE.sub("<uid>", out)
    out = _PATH_RE.sub("<path>", out)
    for value in _usable(identifiers):
        out = _token(value).sub("<phi>", out)
    return out


def identifiers_of(source: Any) -> set[str]:
    """The patient's identity in a dataset: the values of the identifying attributes and a name's parts."""
    found: set[str] = set()
    for kw in _PHI_KEYWORDS:
        value = source.get(kw)
        for v in (value if isinstance(value, MultiValue | list) else [value]):
            text = str(v or "").strip()
            if len(text) >= 3:
                found.add(text)
                found.update(part for part in re.split(r"[\^ ]", text) if len(part) >= 3)
    return found


@dataclass(frozen=True)
class DeidPolicy:
    secret: bytes
    retain_dates_shifted: bool = False
    retain_device_identity: bool = False
    retain_patient_characteristics: bool = False

    @classmethod
    def from_config(cls, config: Any, data_dir: Path) -> DeidPolicy:
        deid = config.sync.deid
        path = Path(deid.secret_file) if deid.secret_file else Path(data_dir) / "sync" / "deid-secret"
        return cls(load_secret(path), deid.retain_dates_shifted, deid.retain_device_identity,
                   deid.retain_patient_characteristics)


def load_secret(path: Path) -> bytes:
    """The per-site secret; created (32 random bytes, mode 0600) on first use. Losing it re-keys every UID."""
    path = Path(path)
    try:
        text = path.read_text().strip()
        if len(text) < 32:
            raise DeidError(f"de-identification secret {path} is too short (want 64 hex digits); restore it "
                            "from the backup or delete it to start a new one (new UIDs for every study)")
        return text.encode()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return load_secret(path)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    return value.encode()


def _library_version() -> str:
    try:
        return metadata.version("dicom-anonymizer")
    except metadata.PackageNotFoundError:  # pragma: no cover - a broken install
        return "?"


def _table() -> tuple[dict[tuple[int, int], Callable], list[tuple[tuple[int, int, int, int], Callable]]]:
    from dicomanonymizer.simpledicomanonymizer import initialize_actions

    exact: dict[tuple[int, int], Callable] = {}
    ranges: list[tuple[tuple[int, int, int, int], Callable]] = []
    for tag, action in initialize_actions(PROFILE_EDITION).items():
        if len(tag) == 2:
            exact[(tag[0], tag[1])] = action
        else:
            ranges.append((tag, action))
    return exact, ranges


_TABLE: tuple | None = None


class Deidentifier:
    """Applies one site's policy. Stateless between datasets: the same input always gives the same output."""

    def __init__(self, policy: DeidPolicy) -> None:
        global _TABLE
        if _TABLE is None:
            _TABLE = _table()
        self.policy = policy
        self.exact, self.ranges = _TABLE
        keep: set[tuple[int, int]] = set()
        if policy.retain_patient_characteristics:
            keep |= _tags(PATIENT_CHARACTERISTICS)
        if policy.retain_device_identity:
            keep |= _tags(DEVICE_IDENTITY)
        self.keep = keep
        self.content_sequence = (0x0040, 0xA730)

    # -- keyed replacements --------------------------------------------------------------------------
    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.policy.secret, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """The UID a study's original UID becomes: the same for the same site secret, unlinkable without it."""
        return "2.25." + str(int.from_bytes(self._mac("uid", str(original))[:16], "big"))

    def pseudonym(self, kind: str, value: str) -> str:
        return "ES" + self._mac(kind, value).hex()[:14].upper()

    def date_offset(self, patient_key: str) -> dt.timedelta:
        """Per patient, 30-730 days back: intervals within one patient's studies survive the shift."""
        return -dt.timedelta(days=30 + int.from_bytes(self._mac("date", patient_key)[:4], "big") % 701)

    # -- the profile -----------------------------------------------------------------------------------
    def dataset(self, source: Dataset) -> Dataset:
        """A de-identified copy of `source` (which is left as it was); DeidError if anything identifying stays."""
        return self._deidentify(source)[0]

    def _deidentify(self, source: Dataset) -> tuple[Dataset, bytes]:
        """(the de-identified copy, its encoding as the last check read it)."""
        ds = copy.deepcopy(source)
        patient_key = str(source.get("PatientID", "")) or str(source.get("PatientName", ""))
        shift = self.date_offset(patient_key) if self.policy.retain_dates_shifted else None
        replaced: set[str] = set()
        ours = {kw: str(source.get(kw)) for kw in OUR_DESCRIPTORS
                if str(source.get(kw, "")).startswith(BANNER_PREFIX)}
        identity = frozenset(identifiers_of(source))
        if hasattr(ds, "file_meta"):
            meta = ds.file_meta
            if "MediaStorageSOPInstanceUID" in meta:
                replaced.add(str(meta.MediaStorageSOPInstanceUID))
                meta.MediaStorageSOPInstanceUID = self.uid(meta.MediaStorageSOPInstanceUID)
            for kw in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                       "ReceivingApplicationEntityTitle", "SourcePresentationAddress"):
                if kw in meta:
                    del meta[kw]
        self._clean(ds, shift, replaced, identity)
        for kw, value in ours.items():
            setattr(ds, kw, value)
        pseudonym = self.pseudonym("patient", patient_key)
        ds.PatientID = pseudonym
        ds.PatientName = f"ANONYMOUS^{pseudonym}"
        ds.PatientIdentityRemoved = "YES"
        methods = ["basic", "structured"] + (["descriptors"] if ours else [])
        methods += [name for name, on in (("dates", self.policy.retain_dates_shifted),
                                          ("device", self.policy.retain_device_identity),
                                          ("patient", self.policy.retain_patient_characteristics)) if on]
        ds.DeidentificationMethod = ["DICOM PS3.15 E.1 Basic Profile", f"dicom-anonymizer {_library_version()} "
                                     f"{PROFILE_EDITION.split('_')[-1]}", f"edgescreen {__version__}"]
        items = []
        for name in methods:
            code = Dataset()
            code.CodeValue, code.CodeMeaning = CODES[name]
            code.CodingSchemeDesignator = "DCM"
            items.append(code)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if shift is not None else "REMOVED"
        return ds, self.verify(source, ds, replaced)

    def _action(self, tag: tuple[int, int]) -> Callable | None:
        action = self.exact.get(tag)
        if action is not None:
            return action
        for (group, element, gmask, emask), fn in self.ranges:
            if tag[0] & gmask == group & gmask and tag[1] & emask == element & emask:
                return fn
        return None

    def _clean(self, ds: Dataset, shift: dt.timedelta | None, replaced: set[str], identity: frozenset[str]) -> None:
        for elem in list(ds):
            tag = (elem.tag.group, elem.tag.element)
            if elem.tag.is_private:
                del ds[elem.tag]
                continue
            if tag in self.keep:
                continue
            action = self._action(tag)
            if elem.VR == "SQ":
                if action is None or tag == self.content_sequence or action.__name__ in (
                        "delete_or_empty_or_replace_UID", "keep"):
                    # no rule, Clean Structured Content, or U* ("replace contained instance UIDs"): keep the
                    # items and de-identify each by the same table
                    for item in elem.value:
                        self._clean(item, shift, replaced, identity)
                else:
                    action(ds, tag)
                    if tag in ds and ds[tag].VR == "SQ":  # a dummy-filled sequence: its UIDs keyed too
                        for item in ds[tag].value:
                            self._uids_only(item, replaced)
                continue
            if elem.VR == "UI":
                if action is not None and action.__name__ in ("delete", "empty", "delete_or_empty"):
                    action(ds, tag)
                elif self._is_instance_uid(elem):
                    self._replace_uid(elem, replaced)
                continue
            if tag == _TEXT_VALUE and elem.value:  # Clean Structured Content: our sentences, minus what they quote
                elem.value = scrub_text(elem.value, identity)
                continue
            if action is None:
                continue
            if shift is not None and elem.VR in ("DA", "DT") and elem.value and tag not in _NEVER_SHIFTED:
                elem.value = _shift(elem.value, elem.VR, shift)
                continue
            if elem.VR in _DATE_DUMMY and action.__name__ != "delete":
                # the library's dummy date 00010101 fails DICOM validators: empty where the profile allows
                # zero length (Z), else a valid dummy (D, needed for Type 1 attributes)
                elem.value = "" if action.__name__ in ("empty", "delete_or_empty") else _DATE_DUMMY[elem.VR]
                continue
            action(ds, tag)

    def _uids_only(self, ds: Dataset, replaced: set[str]) -> None:
        for elem in ds:
            if elem.VR == "UI" and self._is_instance_uid(elem):
                self._replace_uid(elem, replaced)
            elif elem.VR == "SQ":
                for item in elem.value:
                    self._uids_only(item, replaced)

    @staticmethod
    def _is_instance_uid(elem: Any) -> bool:
        if not elem.value or elem.keyword.endswith("ClassUID") or elem.keyword in _CLASS_UIDS:
            return False
        values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
        return any(str(v) not in UID_dictionary for v in values)

    def _replace_uid(self, elem: Any, replaced: set[str]) -> None:
        if isinstance(elem.value, MultiValue | list):
            replaced.update(str(v) for v in elem.value)
            elem.value = [v if str(v) in UID_dictionary else self.uid(v) for v in elem.value]
        else:
            replaced.add(str(elem.value))
            elem.value = self.uid(elem.value)

    # -- the last line of defence ----------------------------------------------------------------------
    def verify(self, source: Dataset, result: Dataset, replaced: set[str]) -> bytes:
        """Refuse a result in which any identifier of the source survives (as an element value or raw bytes);
        returns the result's encoding (Part 10 when it has file meta), which is what was checked.

        A SEG replaces hundreds of UIDs: those (and any all-digit identifier) are found through one pass over
        the digit runs of each value and of the bytes (`_DigitNeedles`), the few other identifiers as substrings."""
        needles = {v for v in replaced if v}
        name_parts: set[str] = set()  # a name's components: only a whole value equal to one counts
        for kw in _PHI_KEYWORDS:
            value = source.get(kw)
            for v in (value if isinstance(value, MultiValue | list) else [value]):
                text = str(v or "").strip()
                if len(text) >= 3:
                    needles.add(text)
                    name_parts.update(part for part in text.split("^") if len(part) >= 3 and "^" in text)
        forbidden_exact = {t for t in needles if len(t) < 6} | name_parts
        forbidden_sub = needles - forbidden_exact
        digits = {n for n in forbidden_sub if _DIGIT_RUN.fullmatch(n)}
        others = forbidden_sub - digits
        index = _DigitNeedles(digits)
        problems: list[str] = []

        def check(ds: Dataset, elem: Any) -> None:
            if elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or elem.value is None:
                return
            values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
            for v in values:
                text = str(v)
                if text in forbidden_exact or any(n in text for n in others) or (
                        digits and index.found(_DIGIT_RUN.findall(text))):
                    problems.append(elem.keyword or str(elem.tag))

        result.walk(check)
        if hasattr(result, "file_meta"):
            result.file_meta.walk(check)
        raw = b""
        if not problems:
            buffer = io.BytesIO()
            result.save_as(buffer, enforce_file_format=hasattr(result, "file_meta"))
            raw = buffer.getvalue()
            found = index.found(run.decode() for run in _DIGIT_RUN_BYTES.findall(raw)) if digits else set()
            problems += [f"bytes containing {n[:6]}..." for n in sorted(found) + [n for n in others if n.encode() in raw]]
        if problems:
            raise DeidError("de-identification left identifying values in " + ", ".join(sorted(set(problems))[:8])
                            + "; the item is held back (nothing was sent)")
        return raw

    def encode(self, source: Dataset) -> bytes:
        """The de-identified dataset as a DICOM file (Part 10): the very bytes the last check read."""
        ds, raw = self._deidentify(source)
        if hasattr(ds, "file_meta"):
            return raw
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    def file(self, path: Path) -> bytes:
        return self.encode(pydicom.dcmread(path))


def _tags(keywords: tuple[str, ...]) -> set[tuple[int, int]]:
    out = set()
    for kw in keywords:
        tag = tag_for_keyword(kw)
        if tag is not None:
            out.add((tag >> 16, tag & 0xFFFF))
    return out


def _shift(value: Any, vr: str, shift: dt.timedelta) -> Any:
    values = value if isinstance(value, MultiValue | list) else [value]
    out = []
    for v in values:
        text = str(v)
        try:
            day = dt.datetime.strptime(text[:8], "%Y%m%d") + shift
            out.append(day.strftime("%Y%m%d") + (text[8:] if vr == "DT" else ""))
        except ValueError:
            out.append("")  # an unparseable date cannot be shifted: removed rather than kept
    return out if len(out) > 1 else out[0]
