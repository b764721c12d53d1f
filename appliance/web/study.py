"""The study page: slice viewer with overlays, findings, models, downloads, review; its data for the API too."""

from __future__ import annotations

import time
from pathlib import Path

from flask import Blueprint, Response, abort, flash, redirect, render_template, request, send_file, url_for
from flask_babel import gettext as _

from appliance.store.worklist import study_summary
from appliance.web import render
from appliance.web.helpers import actor, ctx, patient_fields, require, store

bp = Blueprint("study", __name__)


def _downloads(job_id: int, findings: dict | None, output_dir: str | None) -> list[dict]:
    """The result's files the pipeline names (SEG, SR, PDF, key images), with what each is."""
    if not findings or not output_dir:
        return []
    names = list(findings.get("outputs") or []) + list(findings.get("key_images") or [])
    kinds = {"seg.dcm": _("DICOM SEG (segmentations)"), "sr.dcm": _("DICOM SR (structured report)"),
             "report.dcm": _("PDF report in DICOM"), "report.pdf": _("PDF report")}
    out = []
    for name in dict.fromkeys(names):
        path = Path(output_dir) / name
        if path.is_file():
            kind = kinds.get(name) or (_("key image") if name.endswith(".png") else name.rsplit(".", 1)[-1].upper())
            out.append({"name": name, "kind": kind, "size": path.stat().st_size, "job_id": job_id})
    return out


def study_detail(study_uid: str) -> dict | None:
    """Everything the study page and GET /api/v1/studies/<id> show, in a handful of queries."""
    s = store()
    summary = study_summary(s, study_uid)
    if summary is None:
        return None
    series = [dict(r) for r in s.query(
        """SELECT se.series_uid, se.modality, se.description, se.body_part, se.number, se.state, se.reason,
                  se.pipeline, COUNT(i.sop_uid) AS images
           FROM series se LEFT JOIN instances i ON i.series_uid = se.series_uid
           WHERE se.study_uid = ? GROUP BY se.series_uid ORDER BY se.number, se.first_received_at""", (study_uid,))]
    job_rows = s.query(
        """SELECT j.*, r.id AS result_id, r.triage, r.output_dir, r.reviewed_by, r.reviewed_at, r.created_at AS result_at
           FROM jobs j LEFT JOIN results r ON r.job_id = j.id WHERE j.study_uid = ? ORDER BY j.id""", (study_uid,))
    from appliance.store.jobs import stage_position

    jobs = []
    for r in job_rows:
        job = {k: r[k] for k in ("id", "series_uid", "pipeline", "state", "stage", "progress", "urgent", "run_now",
                                 "waiting_reason", "error", "attempts", "created_at", "started_at", "finished_at",
                                 "triage", "reviewed_by", "reviewed_at")}
        job["urgent"], job["run_now"] = bool(job["urgent"]), bool(job["run_now"])
        pos = stage_position(r["pipeline"], r["stage"])
        job["stage_k"], job["stage_n"] = pos if pos else (None, None)
        findings = render.read_findings(r["output_dir"]) if r["state"] == "done" else None
        job["findings"] = findings
        job["downloads"] = _downloads(r["id"], findings, r["output_dir"])
        jobs.append(job)
    reviews = [dict(r) for r in s.query("SELECT ts, actor, detail FROM audit WHERE action = 'study.review' "
                                        "AND target = ? ORDER BY id DESC LIMIT 20", (study_uid,))]
    masked = ctx().config.web.mask_patient
    study = {**summary, **patient_fields(summary, masked)}
    return {"study": study, "series": series, "jobs": jobs, "reviews": reviews}


def _viewer_series(detail: dict) -> list[dict]:
    """Series the viewer can show (images of a modality it can window), analysed ones first."""
    analysed = {j["series_uid"] for j in detail["jobs"] if j["state"] == "done"}
    shown = [se for se in detail["series"] if se["images"] and se["modality"] not in ("SR", "SEG", "KO", "PR")]
    return sorted(shown, key=lambda se: (se["series_uid"] not in analysed, se["number"] or 0))


@bp.get("/studies/<study_uid>")
def page(study_uid: str):
    detail = study_detail(study_uid)
    if detail is None:
        abort(404)
    if any(j["findings"] for j in detail["jobs"]):
        store().audit(actor(), "study.view", study_uid, "results shown")
    viewer = []
    for se in _viewer_series(detail):
        view = render.series_view(store(), se["series_uid"])
        if view is None:
            continue
        start = (view.lesion_slices[len(view.lesion_slices) // 2] if view.lesion_slices else
                 view.pancreas_slices[len(view.pancreas_slices) // 2] if view.pancreas_slices else view.count // 2)
        viewer.append({**se, "count": view.count, "start": start, "overlays": view.labels_kind is not None,
                       "organs": view.labels_kind == "labels", "lesion_slices": list(view.lesion_slices),
                       "pancreas_slices": list(view.pancreas_slices)})
    return render_template("study.html", d=detail, viewer=viewer, presets=render.PRESETS)


def _view_or_404(study_uid: str, series_uid: str) -> render.SeriesView:
    row = store().query_one("SELECT 1 FROM series WHERE series_uid = ? AND study_uid = ?", (series_uid, study_uid))
    view = render.series_view(store(), series_uid) if row else None
    if view is None:
        abort(404)
    return view


def _float_arg(name: str) -> float | None:
    raw = request.args.get(name)
    if raw in (None, ""):
        return None
    try:
        return float(raw)
    except ValueError:
        abort(400)


def _png_response(data: bytes) -> Response:
    resp = Response(data, mimetype="image/png")
    # the viewer keeps slices in memory itself; nothing with patient pixels is written to the browser's disk
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/studies/<study_uid>/series/<series_uid>/slices/<int:index>.png")
def slice_image(study_uid: str, series_uid: str, index: int):
    view = _view_or_404(study_uid, series_uid)
    if not 0 <= index < view.count:
        abort(404)
    window = render.window_for(request.args.get("preset"), _float_arg("level"), _float_arg("width"))
    if window is None and view.modality == "CT":
        window = render.PRESETS["soft"]
    try:
        return _png_response(render.slice_png(store(), view, index, window))
    except Exception as exc:  # an unreadable file in a stored series: say so, keep serving the rest
        render.log.warning("slice not rendered", series=series_uid, index=index, error=f"{type(exc).__name__}: {exc}")
        abort(404)


@bp.get("/studies/<study_uid>/series/<series_uid>/overlays/<layer>/<int:index>.png")
def overlay_image(study_uid: str, series_uid: str, layer: str, index: int):
    view = _view_or_404(study_uid, series_uid)
    if layer not in render.LAYERS or not 0 <= index < view.count:
        abort(404)
    return _png_response(render.overlay_png(store(), view, index, layer, render.slice_shape(store(), view)))


@bp.get("/studies/<study_uid>/results/<int:job_id>/files/<path:name>")
def download(study_uid: str, job_id: int, name: str):
    row = store().query_one("SELECT r.output_dir FROM results r JOIN jobs j ON j.id = r.job_id "
                            "WHERE r.job_id = ? AND j.study_uid = ?", (job_id, study_uid))
    findings = render.read_findings(row["output_dir"]) if row else None
    allowed = {d["name"] for d in _downloads(job_id, findings, row["output_dir"] if row else None)}
    if name not in allowed:  # only the files the result names: never a path of the caller's choosing
        abort(404)
    path = Path(row["output_dir"]) / name
    inline = name.endswith(".png") and request.args.get("inline") == "1"
    if not inline:
        store().audit(actor(), "study.export", study_uid, f"job {job_id}: {name}")
    resp = send_file(path, as_attachment=not inline, download_name=name, max_age=0)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def mark_reviewed(study_uid: str, comment: str) -> int:
    """Mark every result of the study reviewed by the current user; the comment goes to the audit log."""
    now = time.time()
    with store().transaction() as conn:
        n = conn.execute("UPDATE results SET reviewed_by = ?, reviewed_at = ? WHERE study_uid = ?",
                         (actor(), now, study_uid)).rowcount
        if n:
            store().audit(actor(), "study.review", study_uid, comment.strip()[:2000] or None, conn=conn)
    return n


@bp.post("/studies/<study_uid>/review")
@require("review")
def review(study_uid: str):
    if study_summary(store(), study_uid) is None:
        abort(404)
    if mark_reviewed(study_uid, request.form.get("comment", "")):
        flash(_("Marked reviewed."), "info")
    else:
        flash(_("There is no result to review yet."), "error")
    return redirect(url_for("study.page", study_uid=study_uid))
