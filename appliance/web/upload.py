"""Upload: a study from a USB stick or a CD, as a zip or a folder, through exactly the C-STORE checks.

Each file goes through appliance.dicom.ingest (the same free-space check, header rules, series guard,
quarantine and durable store as a network transfer); the series it completed are then assessed at once
(an upload has ended when the request ends: no stable period to wait for) and queued like any other.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import PurePosixPath

from flask import Blueprint, flash, render_template, request
from flask_babel import gettext as _

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.web.helpers import actor, ctx, require, store

bp = Blueprint("upload", __name__)
log = get_logger(__name__)
SKIP_NAMES = {"DICOMDIR", "LOCKFILE", "VERSION", "AUTORUN.INF", ".DS_STORE", "THUMBS.DB"}
MAX_MEMBER_BYTES = 2 * 1024**3


class UploadError(ValueError):
    """The upload as a whole cannot be read (not a zip, empty); the message says what to send instead."""


def _members(files) -> list[tuple[str, callable]]:
    """(name, reader) for every file in the upload: the members of each zip, or the files of a folder."""
    out = []
    for storage in files:
        name = storage.filename or "upload"
        head = storage.stream.read(4)
        storage.stream.seek(0)
        if head[:4] == b"PK\x03\x04":
            try:
                archive = zipfile.ZipFile(storage.stream)
            except zipfile.BadZipFile as exc:
                raise UploadError(_("%(name)s is not a readable zip file (%(error)s).", name=name, error=str(exc))) from None
            for info in archive.infolist():
                if info.is_dir():
                    continue
                if info.file_size > MAX_MEMBER_BYTES:
                    out.append((info.filename, None))
                    continue
                out.append((info.filename, lambda a=archive, i=info: a.read(i)))
        else:
            out.append((name, lambda s=storage: s.stream.read()))
    return out


def ingest_upload(files) -> dict:
    """Ingest every file; returns counts, per-file problems and the series queued. Audited once."""
    from edgescreen.appliance.dicom.ingest import Ingestor, ingest_bytes, queue_series

    s = store()
    ingestor = Ingestor(s, ctx().config.dicom)
    source = f"upload:{actor()}"
    counts: Counter = Counter()
    problems: list[dict] = []
    series: set[str] = set()
    studies: set[str] = set()
    members = _members(files)
    if not members:
        raise UploadError(_("The upload holds no files."))
    for name, read in members:
        base = PurePosixPath(name.replace("\\", "/")).name
        if base.upper() in SKIP_NAMES or base.startswith("._"):
            counts["skipped"] += 1
            continue
        if read is None:
            counts["refused"] += 1
            problems.append({"file": name, "status": "refused", "reason": _("larger than 2 GB")})
            continue
        try:
            data = read()
        except (OSError, zipfile.BadZipFile, RuntimeError) as exc:  # a damaged or encrypted zip member
            counts["refused"] += 1
            problems.append({"file": name, "status": "refused", "reason": str(exc)})
            continue
        outcome = ingest_bytes(ingestor, data, source=source)
        counts[outcome.status] += 1
        if outcome.ok:
            series.add(outcome.series_uid)
            studies.add(outcome.study_uid)
        else:
            problems.append({"file": name, "status": outcome.status, "reason": outcome.reason,
                             "dimse_status": f"0x{outcome.dimse_status:04X}", "quarantine_id": outcome.quarantine_id})
    decisions = queue_series(s, series) if series else []
    summary = {"files": len(members), "stored": counts["stored"], "duplicate": counts["duplicate"],
               "quarantined": counts["quarantined"], "refused": counts["refused"], "skipped": counts["skipped"],
               "studies": sorted(studies), "series": sorted(series), "problems": problems[:200],
               "decisions": [_decision(d) for d in decisions]}
    s.audit(actor(), "study.upload", ",".join(sorted(studies))[:1000] or None,
            f"{len(members)} files: {counts['stored']} stored, {counts['duplicate']} duplicate, "
            f"{counts['quarantined']} quarantined, {counts['refused']} refused")
    log.info("upload ingested", user=actor(), files=len(members), stored=counts["stored"],
             quarantined=counts["quarantined"], refused=counts["refused"])
    return summary


def _decision(d) -> dict:
    if isinstance(d, dict):
        return {k: v for k, v in d.items() if isinstance(v, str | int | float | bool | None)}
    return {"detail": str(d)}


@bp.route("/upload", methods=["GET", "POST"])
@require("upload")
def page():
    result = None
    if request.method == "POST":
        files = [f for f in request.files.getlist("files") if f and f.filename]
        try:
            if not files:
                raise UploadError(_("Choose a zip file or a folder first."))
            result = ingest_upload(files)
        except UploadError as exc:
            flash(str(exc), "error")
    return render_template("upload.html", result=result)
