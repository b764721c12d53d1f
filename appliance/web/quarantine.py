"""The quarantine page: what the box refused, why, and the DICOM status the sender got; retry and delete."""

from __future__ import annotations

import time

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_babel import gettext as _

from edgescreen.appliance.web.helpers import actor, ctx, require, store, studies_named

bp = Blueprint("quarantine", __name__)
PER_PAGE = 50


def quarantine_page(page: int = 1, per_page: int = PER_PAGE) -> dict:
    """A page of quarantine rows, newest first (indexed by received_at), with the total."""
    per_page = max(1, min(per_page, 200))
    rows = [dict(r) for r in store().query(
        "SELECT id, received_at, reason, path, calling_ae, peer, sop_uid, sop_class_uid, study_uid, series_uid, status "
        "FROM quarantine ORDER BY received_at DESC, id DESC LIMIT ? OFFSET ?", (per_page, (page - 1) * per_page))]
    for r in rows:
        r["status_hex"] = f"0x{r['status']:04X}" if r.get("status") is not None else None
        r["has_file"] = bool(r["path"])
    total = store().query_one("SELECT COUNT(*) FROM quarantine")[0]
    return {"entries": rows, "total": total, "page": page, "per_page": per_page,
            "pages": max(1, -(-total // per_page))}


def retry_item(item_id: int):
    from edgescreen.appliance.dicom.ingest import queue_series, reingest_quarantined

    outcome = reingest_quarantined(store(), ctx().config.dicom, item_id, actor())
    if outcome.ok and outcome.series_uid:
        queue_series(store(), [outcome.series_uid])
    return outcome


def delete_item(item_id: int) -> bool:
    """Delete a quarantined file and its row (an admin decided it is junk); audited with the reason it had."""
    s = store()
    with s.transaction() as conn:
        row = conn.execute("SELECT path, reason, sop_uid FROM quarantine WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            return False
        conn.execute("DELETE FROM quarantine WHERE id = ?", (item_id,))
        s.audit(actor(), "quarantine.delete", str(item_id), f"sop {row['sop_uid']}: {row['reason']}", conn=conn)
    if row["path"]:
        (s.data_dir / row["path"]).unlink(missing_ok=True)
    return True


@bp.get("/quarantine")
@require("quarantine.view")
def page():
    try:
        page_no = max(1, int(request.args.get("page", 1)))
    except ValueError:
        page_no = 1
    q = quarantine_page(page_no)
    return render_template("quarantine.html", q=q, now=time.time(),
                           studies=studies_named(item["study_uid"] for item in q["entries"]))


@bp.post("/quarantine/<int:item_id>/retry")
@require("quarantine.manage")
def retry(item_id: int):
    outcome = retry_item(item_id)
    if outcome.ok:
        flash(_("Entry %(id)d accepted and stored.", id=item_id), "info")
    else:
        flash(_("Entry %(id)d refused again: %(reason)s", id=item_id, reason=outcome.reason or outcome.status), "error")
    return redirect(url_for("quarantine.page"))


@bp.post("/quarantine/<int:item_id>/delete")
@require("quarantine.manage")
def delete(item_id: int):
    if not delete_item(item_id):
        abort(404)
    flash(_("Entry %(id)d deleted.", id=item_id), "info")
    return redirect(url_for("quarantine.page"))
