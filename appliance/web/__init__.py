"""The staff UI and its JSON API: a Flask application factory with one blueprint per area.

Access is denied by default: a before-request hook refuses every endpoint that is not in PUBLIC_ENDPOINTS
unless the request has a session (Flask-Login) or an API token, so a new route cannot be left open by
forgetting a decorator (tests/test_web_security.py walks the URL map to prove it). CSRF is checked on
every state-changing request made with a session cookie (Flask-WTF); a request with a bearer token
carries no cookie a third-party page could ride on, so it needs none.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

from flask import Flask, g, jsonify, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from flask_babel import Babel
from flask_login import LoginManager, current_user, logout_user
from flask_wtf.csrf import CSRFError, CSRFProtect

from edgescreen.appliance import RESEARCH_USE_BANNER, __version__
from edgescreen.appliance.context import AppContext

PUBLIC_ENDPOINTS = frozenset({"auth.login", "auth.healthz", "static"})
# reachable while a user must still change the one-time password
CHANGE_PASSWORD_ENDPOINTS = frozenset({"auth.account", "auth.change_password", "auth.logout", "auth.set_language"})
LANGUAGES = {"en": "English", "fr": "Français", "zh": "中文（简体）"}
HTML_LANG = {"zh": "zh-Hans"}  # lets the browser pick a Simplified Chinese font
TRANSLATIONS = Path(__file__).with_name("translations")

csrf = CSRFProtect()
login_manager = LoginManager()
babel = Babel()


class _SessionInterface(SecureCookieSessionInterface):
    """The session cookie is Secure whenever the request came over TLS (a reverse proxy in front)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(request and request.is_secure) or super().get_cookie_secure(app)


def _secret_key(data_dir: Path) -> bytes:
    """One key per box, kept in the data dir (0600), so sessions survive a restart of the web service."""
    path = data_dir / "web" / "secret.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # two services starting at once: the first key wins
            os.link(tmp, path)
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


def _local_timezone() -> str:
    """The box's zone name (clinic hours and the UI follow the OS clock, set at provisioning)."""
    tz = os.environ.get("TZ")
    if tz and "/" in tz:
        return tz.lstrip(":")
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            return target.split("zoneinfo/", 1)[1]
    except OSError:
        pass
    return "UTC"


def create_app(ctx: AppContext) -> Flask:
    # instance_path given: Flask's own search for it walks the top-level package's locations, and the
    # edgescreen namespace of an editable install has none it recognises (the app keeps nothing there)
    app = Flask(__name__, instance_path=str(Path(ctx.data_dir).resolve() / "web"))
    app.config["EDGESCREEN"] = ctx
    web = ctx.config.web
    app.config.update(
        SECRET_KEY=_secret_key(ctx.data_dir),
        SESSION_COOKIE_NAME="edgescreen_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=False,  # per request, see _SessionInterface
        WTF_CSRF_CHECK_DEFAULT=False,  # checked in _guard, after we know whether a token authenticated it
        WTF_CSRF_TIME_LIMIT=None,  # tied to the session, which has its own idle timeout
        WTF_CSRF_HEADERS=["X-CSRFToken"],
        MAX_CONTENT_LENGTH=web.upload_max_mb * 1024 * 1024,
        BABEL_DEFAULT_LOCALE="en",
        BABEL_DEFAULT_TIMEZONE=_local_timezone(),
        BABEL_TRANSLATION_DIRECTORIES=str(TRANSLATIONS),
        IDLE_TIMEOUT_S=web.session_idle_min * 60,
    )
    app.session_interface = _SessionInterface()
    app.json.sort_keys = False
    csrf.init_app(app)
    login_manager.init_app(app)
    babel.init_app(app, locale_selector=_select_locale, timezone_selector=lambda: app.config["BABEL_DEFAULT_TIMEZONE"])

    # imported and exercised now, not at the first slice: pydicom, numpy and PIL (and their lazily loaded image
    # plugins and pixel decoders) cost a second on a small busy box
    from edgescreen.appliance.web import admin, api, auth, quarantine, render, study, system, upload, worklist  # noqa: F401

    render.warm_up()
    from edgescreen.appliance.web.helpers import banner_translation, install_filters

    for module in (auth, worklist, study, system, quarantine, upload, admin):
        app.register_blueprint(module.bp)
    app.register_blueprint(api.bp, url_prefix="/api/v1")
    install_filters(app)
    auth.install(login_manager)
    for name in app.jinja_env.list_templates():  # compiled now, not by the first user to open each page
        app.jinja_env.get_template(name)

    @app.before_request
    def _guard():
        g.started = time.perf_counter()
        endpoint = request.endpoint or ""
        if endpoint == "static":
            return None
        via_token = bool(getattr(current_user, "via_token", False))
        if endpoint not in PUBLIC_ENDPOINTS and not current_user.is_authenticated:
            return login_manager.unauthorized()  # who you are first: an anonymous write gets 401, not a CSRF 400
        if request.method not in ("GET", "HEAD", "OPTIONS") and not via_token:
            csrf.protect()
        if endpoint in PUBLIC_ENDPOINTS:
            return None
        if not via_token:
            now = time.time()
            seen = session.get("seen", now)
            if now - seen > app.config["IDLE_TIMEOUT_S"]:
                logout_user()
                session.clear()
                session["logged_out_idle"] = True
                return login_manager.unauthorized()
            if request.headers.get("X-Background") != "1":  # the worklist's own refresh is not activity
                session["seen"] = now
            if current_user.must_change_password and endpoint not in CHANGE_PASSWORD_ENDPOINTS:
                if request.path.startswith("/api/"):
                    return jsonify(error="change your one-time password first (Account page)"), 403
                return redirect(url_for("auth.account", first=1))
        return None

    @app.errorhandler(CSRFError)
    def _csrf_error(exc: CSRFError):
        if request.path.startswith("/api/"):
            return jsonify(error=f"CSRF check failed: {exc.description}; send the X-CSRFToken header"), 400
        return render_template("error.html", code=400, message=exc.description), 400

    @app.errorhandler(403)
    def _forbidden(exc):
        if request.path.startswith("/api/"):
            return jsonify(error="your role does not allow this"), 403
        return render_template("error.html", code=403, message=None), 403

    @app.errorhandler(404)
    def _not_found(exc):
        if request.path.startswith("/api/"):
            return jsonify(error="not found"), 404
        return render_template("error.html", code=404, message=None), 404

    @app.errorhandler(OverflowError)
    def _no_such_number(exc):  # an id beyond SQLite's 64-bit integers names nothing
        return _not_found(exc)

    @app.errorhandler(413)
    def _too_large(exc):
        limit = web.upload_max_mb
        if request.path.startswith("/api/"):
            return jsonify(error=f"upload larger than {limit} MB ([web] upload_max_mb)"), 413
        return render_template("error.html", code=413, message=None), 413

    @app.context_processor
    def _globals() -> dict:
        from flask_babel import get_locale

        locale = str(get_locale() or "en")
        return {"banner": RESEARCH_USE_BANNER, "banner_local": banner_translation(), "version": __version__,
                "site_name": ctx.config.site.name,
                "languages": LANGUAGES, "locale": locale, "html_lang": HTML_LANG.get(locale, locale)}

    @app.after_request
    def _headers(response):
        # LAN-only, needs nothing from elsewhere, and its pages carry patient data: no caching, no framing,
        # no referrer leaving the box, no inline script.
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; "
                                    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")  # none off the box; CSRF over TLS checks it
        if request.endpoint == "static":
            response.headers["Cache-Control"] = "public, max-age=3600"
        elif not response.headers.get("Cache-Control"):
            response.headers["Cache-Control"] = "no-store"
        if request.path.startswith("/api/"):
            response.headers["Vary"] = "Cookie, Authorization"
        return response

    return app


def _select_locale() -> str:
    user_locale = getattr(current_user, "locale", None) if current_user else None
    if user_locale in LANGUAGES:
        return user_locale
    chosen = session.get("lang")
    if chosen in LANGUAGES:
        return chosen
    return request.accept_languages.best_match(list(LANGUAGES), default="en")
