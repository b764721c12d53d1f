"""Small helpers shared by the blueprints."""

from __future__ import annotations

from flask import current_app

from appliance.context import AppContext


def ctx() -> AppContext:
    return current_app.config["EDGESCREEN"]
