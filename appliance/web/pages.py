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


@bp.get("/")
def index() -> str:
    return render_template("studies.html", studies=list_studies(ctx().store))
