"""The study page: slice viewer with overlays, findings, models, downloads, review; its data for the API too."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from flask import Blueprint, Response, abort, flash, redirect, render_template, request, send_file, url_for
from flask_babel import gettext as _

from edgescreen.appliance.store.worklist import study_summary
from edgescreen.appliance.web import render
from edgescreen.appliance.web.helpers import actor, ctx, patient_fields, require, store

bp = Blueprint("study", __name__)


def _heatmaps(findings: dict | None) -> list[str]:
    """The mammography heatmap overlays a result names (one transparent PNG per view)."""
    mammo = (findings or {}).get("mammo") or {}
    return [im["heatmap"] for im in mammo.get("images") or [] if im.get("heatmap")]


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
        if path.is_file() and not name.endswith(".npz"):  # labels.npz is the viewer's, drawn on the slices
            kind = kinds.get(name) or (_key_image_kind(name) if name.endswith(".png") else name.rsplit(".", 1)[-1].upper())
            out.append({"name": name, "kind": kind, "size": path.stat().st_size, "job_id": job_id})
    return out


def _key_image_kind(name: str) -> str:
    """What a key image shows, from the pipeline's file names (key_pancreas, key_lesion_2, key_mammo_1_R_CC)."""
    stem = name.rsplit(".", 1)[0]
    if stem.startswith("key_lesion_") and stem[11:].isdigit():
        return _("key image: lesion #%(n)s", n=stem[11:])
    if stem == "key_pancreas":
        return _("key image: pancreas")
    parts = stem.split("_")
    if stem.startswith("key_mammo_") and len(parts) >= 5:
        return _("key image: %(view)s", view=f"{parts[3]} {parts[4]}")
    return _("key image")


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
    from edgescreen.appliance.store.jobs import stage_position

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


def _mammo_views(study_uid: str, detail: dict, viewer: list[dict]) -> list[dict]:
    """Each MG image of the study with its result's view (laterality, view, probabilities) and heatmap overlay.

    Views are matched to the result by the stored file's name (findings' `path`), so an exam that arrived as
    four series, or in another order, still gets each heatmap on its own image.
    """
    job = next((j for j in reversed(detail["jobs"]) if j["findings"] and j["findings"].get("mammo")), None)
    by_file = {im.get("path"): im for im in job["findings"]["mammo"]["images"]} if job else {}
    views = []
    for se in viewer:
        if se["modality"] != "MG":
            continue
        view = render.series_view(store(), se["series_uid"])
        for i, rel in enumerate(view.paths if view else ()):
            found = by_file.get(Path(rel).name)
            plain = url_for("study.slice_image", study_uid=study_uid, series_uid=se["series_uid"], index=i)
            heat = key = None
            if found and found.get("heatmap"):
                heat = url_for("study.download", study_uid=study_uid, job_id=job["id"], name=found["heatmap"])
            elif found and found.get("key_image"):  # a result from before the overlays: swap for the key image
                key = url_for("study.download", study_uid=study_uid, job_id=job["id"], name=found["key_image"],
                              inline=1)
            views.append({"series": se, "index": i, "plain": plain, "heatmap": heat, "key_image": key,
                          "result": found})
    return views


VIEW_AUDIT_EVERY_S = 300.0
_views_audited: dict[tuple[str, str, str], float] = {}
_views_lock = threading.Lock()


def audit_view(study_uid: str, detail: str) -> bool:
    """Audit that the current user was shown a study's results: once per user, study and VIEW_AUDIT_EVERY_S.

    The page's own reloads, the slices it fetches and a script polling the API every few seconds would
    otherwise each be an fsynced write in the store's one write lock, which the worker and the DICOM service
    need (and an audit log of thousands of identical rows). Who saw which result, and from when, stays exact
    to five minutes; any other action is audited every time. True if a row was written.
    """
    key = (str(store().data_dir), actor(), study_uid)
    now = time.monotonic()
    with _views_lock:
        last = _views_audited.get(key)
        if last is not None and now - last < VIEW_AUDIT_EVERY_S:
            return False
        if len(_views_audited) > 10_000:  # forget the expired ones; the map stays small
            for old in [k for k, t in _views_audited.items() if now - t >= VIEW_AUDIT_EVERY_S]:
                del _views_audited[old]
        _views_audited[key] = now
    try:
        store().audit(actor(), "study.view", study_uid, detail)
    except Exception:
        with _views_lock:  # not recorded: the next view tries again
            _views_audited.pop(key, None)
        raise
    return True


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
        audit_view(study_uid, "results shown")
    viewer = []
    for se in _viewer_series(detail):
        view = render.series_view(store(), se["series_uid"])
        if view is None:
            continue
        start = (view.lesion_slices[len(view.lesion_slices) // 2] if view.lesion_slices else
                 view.pancreas_slices[len(view.pancreas_slices) // 2] if view.pancreas_slices else view.count // 2)
        viewer.append({**se, "count": view.count, "start": start, "overlays": view.labels_kind is not None,
                       "organs": view.labels_kind == "labels", "lesion_slices": list(view.lesion_slices),
                       "organ_legend": render.organ_legend(view.organ_classes),
                       "lesion_centres": {f"lesion_{k}": z for k, z in view.lesion_centres},
                       "pancreas_slices": list(view.pancreas_slices)})
    mammo_views = _mammo_views(study_uid, detail, viewer) if any(v["modality"] == "MG" for v in viewer) else []
    return render_template("study.html", d=detail, viewer=viewer, presets=render.PRESETS, mammo_views=mammo_views)


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
    overlay = name in _heatmaps(findings)  # shown on the views, not offered as a download
    if name not in allowed and not overlay:  # only the files the result names: never a path of the caller's choosing
        abort(404)
    path = Path(row["output_dir"]) / name
    if not path.is_file():
        abort(404)
    inline = name.endswith(".png") and (overlay or request.args.get("inline") == "1")
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
