"""The staff UI and its JSON API: a Flask application factory with one blueprint per area."""

from __future__ import annotations

from flask import Flask

from appliance import RESEARCH_USE_BANNER, __version__
from appliance.context import AppContext


def create_app(ctx: AppContext) -> Flask:
    app = Flask(__name__)
    app.config["EDGESCREEN"] = ctx
    app.config["JSON_SORT_KEYS"] = False

    from appliance.web import api, pages

    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp, url_prefix="/api")

    @app.context_processor
    def _globals() -> dict:
        return {"banner": RESEARCH_USE_BANNER, "version": __version__, "site_name": ctx.config.site.name}

    @app.after_request
    def _headers(response):  # the UI is LAN-only and needs nothing from elsewhere
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    return app
