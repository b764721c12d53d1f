"""HTML pages for clinic staff."""

from __future__ import annotations

import time

from flask import Blueprint, render_template

from appliance.store.instances import list_studies
from appliance.web.helpers import ctx

bp = Blueprint("pages", __name__)


@bp.app_template_filter("when")
def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def latest_states() -> list[dict]:
    """The newest scanner and power event, so staff see at a glance why work may be waiting."""
    store = ctx().store
    rows = [store.query_one("SELECT kind, state, ts, detail FROM events WHERE kind = ? ORDER BY ts DESC, id DESC LIMIT 1",
                            (kind,)) for kind in ("scanner", "power")]
    return [dict(r) for r in rows if r is not None]


@bp.get("/")
def index() -> str:
    return render_template("studies.html", studies=list_studies(ctx().store), status=latest_states())
