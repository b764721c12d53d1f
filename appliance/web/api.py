"""The JSON API under /api/v1: the pages' data for scripts on the LAN (docs/openapi.yaml describes it).

Every route needs a session or `Authorization: Bearer TOKEN`; state-changing calls made with a session
need the X-CSRFToken header (tokens need none). Responses carry the research-use disclaimer.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, abort, jsonify, request, send_file

from edgescreen.appliance import RESEARCH_USE_BANNER, accounts
from edgescreen.appliance.web import quarantine as quarantine_view
from edgescreen.appliance.web import study as study_view
from edgescreen.appliance.web import system as system_view
from edgescreen.appliance.web import upload as upload_view
from edgescreen.appliance.web.admin import audit_query
from edgescreen.appliance.web.helpers import require, store
from edgescreen.appliance.web.worklist import BadQuery, display_rows, query_from_args

bp = Blueprint("api", __name__)
OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


# the query parameters each route documents (docs/openapi.yaml); anything else is refused, so a script's typo
# (?sate=done) fails loudly instead of silently returning everything
QUERY_PARAMS = {
    "api.studies": {"page", "per_page", "state", "triage", "modality", "reviewed", "date", "q", "sort", "dir"},
    "api.jobs": {"state", "limit"},
    "api.quarantine": {"page", "per_page"},
    "api.audit": {"actor", "action", "target", "from", "to", "page"},
}


@bp.before_request
def _known_parameters():
    allowed = QUERY_PARAMS.get(request.endpoint or "", set())
    unknown = sorted(set(request.args) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        return error(f"unknown query parameter {unknown[0]!r}; this route takes: {known}", 400)
    return None


def ok(**body):
    return jsonify(**body, disclaimer=RESEARCH_USE_BANNER)


def error(message: str, status: int):
    return jsonify(error=message), status


def _int_arg(name: str, default: int, low: int, high: int) -> tuple[int, str | None]:
    """A whole-number query parameter within [low, high], or the reason it is refused (never clamped silently)."""
    raw = request.args.get(name)
    if raw is None:
        return default, None
    try:
        value = int(raw)
    except ValueError:
        return default, f"{name}={raw!r}: use a whole number"
    if not low <= value <= high:
        return default, f"{name}={value}: use {low} to {high}"
    return value, None


class BadBody(ValueError):
    """A request body that is not what docs/openapi.yaml says; the message names the field."""


def _body(fields: dict[str, tuple[int, tuple[str, ...] | None]], required: tuple[str, ...] = ()) -> dict:
    """The JSON body as documented: an object with only `fields` (name -> (max length, allowed values)), each a
    string; absent body = {} unless something is required."""
    if not request.data:
        body: object = {}
    else:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise BadBody("send a JSON object")
    for name in required:
        if name not in body:
            raise BadBody(f"{name}: required")
    for name, value in body.items():
        if name not in fields:
            raise BadBody(f"unknown field {name!r}; this route takes: {', '.join(fields) or 'none'}")
        max_len, choices = fields[name]
        if not isinstance(value, str) or len(value) > max_len or (choices and value not in choices):
            raise BadBody(f"{name}: " + (f"one of {', '.join(choices)}" if choices else
                                         f"a text of at most {max_len} characters"))
    return body


_STUDY_FIELDS = ("study_uid", "patient_name", "patient_id", "masked", "study_date", "accession", "description",
                 "modalities", "received_at", "state", "reason", "job_id", "stage", "progress", "pipeline", "urgent",
                 "run_now", "triage", "reviewed", "reviewed_at", "n_series", "images")


@bp.get("/studies")
def studies():
    try:
        q = query_from_args(request.args, strict=True)
    except BadQuery as exc:
        return error(str(exc), 400)
    from edgescreen.appliance.store.worklist import query_worklist

    page = query_worklist(store(), q)
    rows = [{k: r.get(k) for k in _STUDY_FIELDS} for r in display_rows(page.rows)]
    return ok(studies=rows, page=page.page, per_page=page.per_page, total=page.total, pages=page.pages,
              counts=page.counts)


@bp.get("/studies/<study_uid>")
def study(study_uid: str):
    detail = study_view.study_detail(study_uid)
    if detail is None:
        return error("no such study", 404)
    s = detail["study"]
    if any(j["findings"] for j in detail["jobs"]):
        study_view.audit_view(study_uid, "results read through the API")
    jobs = [{k: v for k, v in j.items()} for j in detail["jobs"]]
    return ok(study={k: s.get(k) for k in _STUDY_FIELDS}, series=detail["series"], jobs=jobs,
              reviews=detail["reviews"])


@bp.get("/studies/<study_uid>/results/<int:job_id>/files/<path:name>")
def study_file(study_uid: str, job_id: int, name: str):
    return study_view.download(study_uid, job_id, name)


@bp.post("/studies/<study_uid>/review")
@require("review")
def review(study_uid: str):
    from edgescreen.appliance.store.worklist import study_summary

    if study_summary(store(), study_uid) is None:
        return error("no such study", 404)
    try:
        comment = _body({"comment": (2000, None)}).get("comment", "")
    except BadBody as exc:
        return error(str(exc), 400)
    n = study_view.mark_reviewed(study_uid, comment)
    if not n:
        return error("this study has no result to review yet", 409)
    return ok(reviewed=n)


@bp.get("/jobs")
def jobs():
    from edgescreen.appliance.store.jobs import JOB_STATES

    states = tuple(request.args.getlist("state")) or JOB_STATES
    bad = [s for s in states if s not in JOB_STATES]
    if bad:
        return error(f"state={bad[0]!r}: use one of {', '.join(JOB_STATES)}", 400)
    limit, problem = _int_arg("limit", 200, 1, 1000)
    if problem:
        return error(problem, 400)
    marks = ",".join("?" * len(states))
    rows = store().query(f"SELECT id, study_uid, series_uid, pipeline, state, stage, progress, urgent, run_now, "
                         f"waiting_reason, error, attempts, created_at, started_at, finished_at FROM jobs "
                         f"WHERE state IN ({marks}) ORDER BY id DESC LIMIT ?", (*states, limit))
    out = []
    for r in rows:
        d = dict(r)
        d["urgent"], d["run_now"] = bool(d["urgent"]), bool(d["run_now"])
        out.append(d)
    return ok(jobs=out)


@bp.post("/jobs/<int:job_id>/<action>")
def job_action(job_id: int, action: str):
    action = action.replace("-", "_")
    permission = system_view._JOB_PERMISSION.get(action)
    if permission is None:
        return error(f"unknown action {action!r}: use urgent, run-now or retry", 404)
    if not system_view.ctx_user_can(permission):
        abort(403)
    try:
        message = system_view.apply_job_action(job_id, action)
    except system_view.OverrideError as exc:
        return error(str(exc), 409)
    return ok(message=message)


@bp.get("/system")
def system():
    return ok(**system_view.system_status())


@bp.post("/scheduler/pause")
@require("operate")
def pause():
    try:
        reason = _body({"reason": (200, None)}).get("reason")
    except BadBody as exc:
        return error(str(exc), 400)
    return ok(scheduler=system_view.apply_scheduler("pause", reason))


@bp.post("/scheduler/resume")
@require("operate")
def resume():
    return ok(scheduler=system_view.apply_scheduler("resume"))


@bp.post("/scanner")
@require("operate")
def scanner():
    try:
        mode = _body({"mode": (8, ("busy", "idle", "auto"))}, required=("mode",))["mode"]
        system_view.apply_scanner(mode)
    except (BadBody, system_view.OverrideError) as exc:
        return error(str(exc), 400)
    return ok(gate=system_view.gate_view())


@bp.get("/quarantine")
@require("quarantine.view")
def quarantine():
    page, problem = _int_arg("page", 1, 1, 10**6)
    per_page, problem2 = _int_arg("per_page", quarantine_view.PER_PAGE, 1, 200)
    if problem or problem2:
        return error(problem or problem2, 400)
    return ok(**quarantine_view.quarantine_page(page, per_page))


@bp.post("/quarantine/<int:item_id>/retry")
@require("quarantine.manage")
def quarantine_retry(item_id: int):
    outcome = quarantine_view.retry_item(item_id)
    body = outcome.as_dict()
    return (ok(outcome=body), 200) if outcome.ok else (jsonify(outcome=body, error=outcome.reason), 409)


@bp.delete("/quarantine/<int:item_id>")
@require("quarantine.manage")
def quarantine_delete(item_id: int):
    if not quarantine_view.delete_item(item_id):
        return error("no such quarantine entry", 404)
    return ok(deleted=item_id)


@bp.post("/uploads")
@require("upload")
def upload():
    files = [f for f in request.files.getlist("files") if f and f.filename]
    if not files:
        return error("send the files as multipart form field 'files' (a zip, or the files of a folder)", 400)
    try:
        return ok(upload=upload_view.ingest_upload(files))
    except upload_view.UploadError as exc:
        return error(str(exc), 400)


@bp.get("/users")
@require("users")
def users():
    return ok(users=accounts.list_users(store()))


@bp.get("/audit")
@require("audit")
def audit():
    _, problem = _int_arg("page", 1, 1, 10**6)
    if problem:
        return error(problem, 400)
    import datetime as dt

    for name in ("from", "to"):
        if name in request.args:
            try:
                dt.date.fromisoformat(request.args[name])
            except ValueError:
                return error(f"{name}={request.args[name]!r}: use a date as YYYY-MM-DD", 400)
    a = audit_query(request.args)
    return ok(audit=a["rows"], total=a["total"], page=a["page"], pages=a["pages"])


@bp.get("/openapi.yaml")
def openapi():
    return send_file(OPENAPI, mimetype="application/yaml", max_age=0)
