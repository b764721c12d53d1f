"""The JSON API the pages (and scripts on the LAN) read."""

from __future__ import annotations

from flask import Blueprint, jsonify

from appliance import RESEARCH_USE_BANNER, __version__
from appliance.store.instances import list_studies
from appliance.web.helpers import ctx

bp = Blueprint("api", __name__)


@bp.get("/health")
def health():
    store = ctx().store
    return jsonify(status="ok", version=__version__, schema=store.schema_version(), disclaimer=RESEARCH_USE_BANNER)


@bp.get("/studies")
def studies():
    return jsonify(studies=list_studies(ctx().store), disclaimer=RESEARCH_USE_BANNER)
