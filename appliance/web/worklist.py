"""The worklist page: filters, search, server-side paging and sorting; it refreshes its table in place."""

from __future__ import annotations

import datetime as dt

from flask import Blueprint, redirect, render_template, request, url_for
from werkzeug.datastructures import MultiDict

from edgescreen.appliance.store.worklist import (
    MAX_PER_PAGE,
    SORTS,
    STATES,
    TRIAGES,
    WorklistQuery,
    day_bounds,
    query_worklist,
)
from edgescreen.appliance.web.helpers import ctx, patient_fields, store

bp = Blueprint("worklist", __name__)
MODALITIES = ("CT", "MG", "MR", "CR", "DX", "US", "OT")


class BadQuery(ValueError):
    """A filter value the worklist does not know; the message names the parameter and what it accepts."""


def _date(value: str, name: str) -> str:
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        raise BadQuery(f"{name}={value!r}: use a date as YYYY-MM-DD") from None
    return value


PARAMS = ("state", "triage", "modality", "reviewed", "date", "from", "to", "q", "sort", "dir", "page", "per_page")


def query_from_args(args: MultiDict, *, strict: bool = False) -> WorklistQuery:
    """The worklist's query parameters, shared by the page and /api/v1/studies, checked strictly.

    The page's form sends "" for "any"; the API (`strict`) wants an absent parameter instead, as documented."""
    if strict:
        empty = [name for name in PARAMS if name != "q" and name in args and args.get(name) == ""]
        if empty:
            raise BadQuery(f"{empty[0]}: empty; leave the parameter out to mean any")
    q = WorklistQuery()
    state = args.get("state") or None
    if state and state not in STATES:
        raise BadQuery(f"state={state!r}: use one of {', '.join(STATES)}")
    triage = args.get("triage") or None
    if triage and triage not in TRIAGES:
        raise BadQuery(f"triage={triage!r}: use one of {', '.join(TRIAGES)}")
    q.state, q.triage = state, triage
    modality = (args.get("modality") or "").strip().upper() or None
    if modality and not (modality.isalnum() and len(modality) <= 4):
        raise BadQuery(f"modality={modality!r}: use a DICOM modality such as CT or MG")
    q.modality = modality
    reviewed = args.get("reviewed") or None
    if reviewed not in (None, "yes", "no"):
        raise BadQuery(f"reviewed={reviewed!r}: use yes or no")
    q.reviewed = None if reviewed is None else reviewed == "yes"
    if args.get("date"):
        q.date_from, q.date_to = day_bounds(_date(args["date"], "date"))
    if args.get("from"):
        q.date_from = day_bounds(_date(args["from"], "from"))[0]
    if args.get("to"):
        q.date_to = day_bounds(_date(args["to"], "to"))[1]
    search = args.get("q") or ""
    if len(search) > 100:
        raise BadQuery("q: search with at most 100 characters")
    q.search = search.strip() or None
    sort = args.get("sort") or "received"
    if sort not in SORTS:
        raise BadQuery(f"sort={sort!r}: use one of {', '.join(SORTS)}")
    q.sort = sort
    direction = args.get("dir") or "desc"
    if direction not in ("asc", "desc"):
        raise BadQuery(f"dir={direction!r}: use asc or desc")
    q.descending = direction == "desc"
    for name, default, top in (("page", 1, 10**6), ("per_page", 50, MAX_PER_PAGE)):
        raw = args.get(name)
        if raw in (None, ""):
            value = default
        else:
            try:
                value = int(raw)
            except ValueError:
                raise BadQuery(f"{name}={raw!r}: use a whole number") from None
            if not 1 <= value <= top:
                raise BadQuery(f"{name}={value}: use 1 to {top}")
        setattr(q, name, value)
    return q


def display_rows(rows: list[dict]) -> list[dict]:
    """Rows as shown: names formatted (masked if the site says so), "stage k of n" for running jobs."""
    from edgescreen.appliance.store.jobs import stage_position

    masked = ctx().config.web.mask_patient
    out = []
    for r in rows:
        pos = stage_position(r["pipeline"], r["stage"]) if r.get("pipeline") and r.get("stage") else None
        out.append({**r, **patient_fields(r, masked), "stage_k": pos[0] if pos else None,
                    "stage_n": pos[1] if pos else None})
    return out


@bp.get("/")
def home():
    return redirect(url_for("worklist.index"))


@bp.get("/worklist")
def index():
    try:
        q = query_from_args(request.args)
        error = None
    except BadQuery as exc:
        q, error = WorklistQuery(), str(exc)
    page = query_worklist(store(), q)
    args = {k: v for k, v in request.args.items() if k not in ("page", "partial") and v}
    template = "_worklist_table.html" if request.args.get("partial") else "worklist.html"
    return render_template(template, page=page, rows=display_rows(page.rows), q=q, args=args, error=error,
                           states=STATES, triages=TRIAGES, modalities=MODALITIES, sorts=list(SORTS)), (400 if error else 200)
