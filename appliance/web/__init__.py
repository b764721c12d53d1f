"""The staff UI and its JSON API: a Flask application factory with one blueprint per area."""

from __future__ import annotations

from flask import Flask

from appliance import RESEARCH_USE_BANNER, __version__
from appliance.context import AppContext


def create_app(ctx: AppContext) -> Flask:
    app = Flask(__name__)
    app.config["EDGESCREEN"] = ctx
    app.json.sort_keys = False

    from appliance.web import api, pages

    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp, url_prefix="/api")

    @app.context_processor
    def _globals() -> dict:
        return {"banner": RESEARCH_USE_BANNER, "version": __version__, "site_name": ctx.config.site.name}

    @app.after_request
    def _headers(response):
        # The UI is LAN-only, needs nothing from elsewhere, and its pages carry patient data: no caching,
        # no framing, no referrer leaving the box.
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if not response.headers.get("Cache-Control"):
            response.headers["Cache-Control"] = "no-store"
        return response

    return app
