"""Small helpers shared by the blueprints: the context, permission checks, names and labels for display."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable

from flask import Flask, abort, current_app, request
from flask_babel import format_datetime, format_decimal, format_percent, lazy_gettext
from flask_login import current_user

from edgescreen.appliance import RESEARCH_USE_BANNER
from edgescreen.appliance.context import AppContext
from edgescreen.appliance.store import Store


def ctx() -> AppContext:
    return current_app.config["EDGESCREEN"]


def store() -> Store:
    return ctx().store


def actor() -> str:
    """The audited name: the user, marked when they acted through an API token."""
    name = current_user.username
    return f"{name} (token)" if getattr(current_user, "via_token", False) else name


def require(permission: str) -> Callable:
    """403 unless the current user's role has `permission` (appliance.accounts.PERMISSIONS)."""

    def wrap(view: Callable) -> Callable:
        @functools.wraps(view)
        def inner(*args, **kwargs):
            if not current_user.is_authenticated or not current_user.can(permission):
                abort(403)
            return view(*args, **kwargs)

        inner.permission = permission  # type: ignore[attr-defined] - read by the URL-map test
        return inner

    return wrap


def wants_json() -> bool:
    return request.path.startswith("/api/")


# -- labels (translated) -----------------------------------------------------------------------------
STATE_LABELS = {
    "receiving": lazy_gettext("receiving"), "waiting": lazy_gettext("waiting"), "running": lazy_gettext("running"),
    "done": lazy_gettext("done"), "failed": lazy_gettext("failed"), "quarantined": lazy_gettext("quarantined"),
    "not_analysed": lazy_gettext("not analysed"),
    # job states
    "queued": lazy_gettext("waiting"),
}
TRIAGE_LABELS = {
    "suspicious": lazy_gettext("suspicious"), "not_suspicious": lazy_gettext("not suspicious"),
    "indeterminate": lazy_gettext("indeterminate"),
}
ROLE_LABELS = {"clinician": lazy_gettext("clinician"), "technician": lazy_gettext("technician"),
               "admin": lazy_gettext("administrator")}
ORGAN_LABELS = {  # stage 1's classes (the reference model's; a clinic's own classes show as named)
    "liver": lazy_gettext("liver"), "spleen": lazy_gettext("spleen"), "kidneys": lazy_gettext("kidneys"),
    "right_kidney": lazy_gettext("right kidney"), "left_kidney": lazy_gettext("left kidney"),
    "aorta": lazy_gettext("aorta"), "vertebrae": lazy_gettext("vertebrae"), "pancreas": lazy_gettext("pancreas"),
}
SOURCE_LABELS = {  # the scanner-state sources (appliance.scheduler.scanner)
    "manual": lazy_gettext("manual switch"), "mpps": lazy_gettext("scanner messages (MPPS)"),
    "store": lazy_gettext("images arriving"), "power-draw": lazy_gettext("scanner power draw"),
    "clinic-hours": lazy_gettext("clinic hours"),
}
LOCATION_LABELS = {"head": lazy_gettext("head"), "body": lazy_gettext("body"), "tail": lazy_gettext("tail")}
SUBTYPE_LABELS = {
    "pdac": lazy_gettext("PDAC"), "pnet": lazy_gettext("PNET"), "spt": lazy_gettext("SPT"),
    "ipmn": lazy_gettext("IPMN"), "mcn": lazy_gettext("MCN"), "scn": lazy_gettext("SCN"),
    "cp": lazy_gettext("chronic pancreatitis"), "other": lazy_gettext("other"),
}


def banner_translation() -> str | None:
    """The research-use banner in the page's language, shown before the English constant (which stays the
    source and is always shown); None in English, or when the catalogue has no translation of the constant's
    current text (appliance/web/catalogue.py keeps the catalogue entry in step with the constant)."""
    from flask_babel import gettext

    text = gettext(RESEARCH_USE_BANNER)
    return None if text == RESEARCH_USE_BANNER else text


# -- names ------------------------------------------------------------------------------------------
def _is_ideographic(text: str) -> bool:
    return any("\u2e80" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af" or "\u3040" <= ch <= "\u30ff" for ch in text)


def person_name(pn: str | None) -> str:
    """A DICOM PN for reading: 'FAMILY^GIVEN^MIDDLE' -> 'FAMILY, GIVEN MIDDLE'; ideographic and phonetic
    groups ('Wang^XiaoMing=王^小明') are shown after the alphabetic one, written without separators."""
    if not pn:
        return ""
    groups = [grp for grp in str(pn).split("=") if grp.strip("^ ")]
    shown = []
    for grp in groups:
        parts = [p.strip() for p in grp.split("^")]
        family, given = parts[0], " ".join(p for p in parts[1:3] if p)
        if _is_ideographic(grp):
            shown.append(family + "".join(p for p in parts[1:3] if p))
        else:
            shown.append(f"{family}, {given}" if family and given else family or given)
    if not shown:
        return ""
    return shown[0] + (f" ({' / '.join(shown[1:])})" if len(shown) > 1 else "")


def mask_name(pn: str | None) -> str:
    """Initials only ('W. X.', '王…'): for a screen the waiting room can see ([web] mask_patient)."""
    name = person_name(pn)
    if not name:
        return ""
    first = name.split(" (")[0]
    if _is_ideographic(first):
        return first[0] + "…"
    words = [w for w in first.replace(",", " ").split() if w]
    return " ".join(w[0].upper() + "." for w in words[:3])


def mask_id(value: str | None) -> str:
    if not value:
        return ""
    return "…" + value[-3:] if len(value) > 3 else "…"


def patient_fields(row: dict, masked: bool) -> dict:
    """Name and ID for display and for the API, masked when the site says so."""
    if masked:
        return {"patient_name": mask_name(row.get("patient_name")), "patient_id": mask_id(row.get("patient_id")),
                "masked": True}
    return {"patient_name": person_name(row.get("patient_name")), "patient_id": row.get("patient_id") or "",
            "masked": False}


def studies_named(uids) -> dict[str, dict]:
    """{study_uid: {"patient_name", "patient_id"}} for the studies the store has among `uids` (masked when the
    site says so): a quarantine or audit row then names the patient, not a 64-digit UID."""
    wanted = sorted({u for u in uids if u})
    if not wanted:
        return {}
    masked = ctx().config.web.mask_patient
    out = {}
    for chunk in range(0, len(wanted), 500):
        part = wanted[chunk:chunk + 500]
        for r in store().query(f"SELECT study_uid, patient_name, patient_id FROM studies "
                               f"WHERE study_uid IN ({','.join('?' * len(part))})", part):
            out[r["study_uid"]] = patient_fields(dict(r), masked)
    return out


# -- filters ----------------------------------------------------------------------------------------
def _when(ts: float | None, fmt: str = "short") -> str:
    if not ts:
        return "–"
    return format_datetime(dt.datetime.fromtimestamp(float(ts), dt.UTC), fmt)


def _study_date(text: str | None) -> str:
    if not text or len(text) != 8 or not text.isdigit():
        return text or "–"
    from flask_babel import format_date

    try:
        return format_date(dt.date(int(text[:4]), int(text[4:6]), int(text[6:])), "medium")
    except ValueError:
        return text


def reason_text(reason: str | None) -> str:
    """A gate or worker reason for display beside its state: without the leading "waiting: " / "running: " the
    state label already says ("waiting  waiting: scanner busy ..." reads as a stutter)."""
    text = str(reason or "")
    for prefix in ("waiting: ", "running: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def install_filters(app: Flask) -> None:
    app.add_template_filter(_when, "when")
    app.add_template_filter(_study_date, "study_date")
    app.add_template_filter(person_name, "pn")
    app.add_template_filter(reason_text, "reason")
    app.add_template_filter(lambda s: SOURCE_LABELS.get(s, s), "source_label")
    app.add_template_filter(lambda v, d=1: format_decimal(v, format="#,##0." + "0" * d) if v is not None else "–",
                            "num")
    app.add_template_filter(lambda v: format_percent(v, format="#,##0.0%") if v is not None else "–", "pct")
    app.add_template_filter(lambda s: STATE_LABELS.get(s, s or "–"), "state_label")
    app.add_template_filter(lambda s: TRIAGE_LABELS.get(s, s or "–"), "triage_label")
    app.add_template_filter(lambda s: ROLE_LABELS.get(s, s), "role_label")
    app.add_template_filter(lambda s: LOCATION_LABELS.get(s, s), "location_label")
    app.add_template_filter(lambda s: ORGAN_LABELS.get(s, str(s).replace("_", " ")), "organ_label")
    app.add_template_filter(lambda s: SUBTYPE_LABELS.get(s, s), "subtype_label")
