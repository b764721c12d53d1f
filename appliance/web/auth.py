"""Login, logout, the user's own account (password, language, API tokens) and /healthz."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, flash, jsonify, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user

from edgescreen.appliance import RESEARCH_USE_BANNER, __version__, accounts
from edgescreen.appliance.web.helpers import store

bp = Blueprint("auth", __name__)


class WebUser(UserMixin):
    """The logged-in user. The session holds 'name|password_changed_at': a password change or reset ends
    every other session of that user at their next request."""

    def __init__(self, user: accounts.User, stamp: str, via_token: bool = False) -> None:
        self.username = user.username
        self.role = user.role
        self.must_change_password = user.must_change_password
        self.locale = user.locale
        self.via_token = via_token
        self._stamp = stamp

    def get_id(self) -> str:
        return f"{self.username}|{self._stamp}"

    def can(self, permission: str) -> bool:
        return permission in accounts.PERMISSIONS[self.role]


def _stamp(username: str) -> str | None:
    row = store().query_one("SELECT password_changed_at FROM users WHERE username = ? AND disabled = 0", (username,))
    return None if row is None else repr(row["password_changed_at"])


def install(manager: LoginManager) -> None:
    manager.session_protection = None  # "strong" would log out a tablet whose address changes on Wi-Fi roaming

    @manager.user_loader
    def _load(user_id: str):
        name, _sep, stamp = user_id.partition("|")
        user = accounts.get_user(store(), name)
        if user is None or _stamp(name) != stamp:
            return None
        return WebUser(user, stamp)

    @manager.request_loader
    def _from_token(req):
        header = req.headers.get("Authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        user = accounts.user_for_token(store(), header[7:].strip())
        return WebUser(user, "", via_token=True) if user else None

    @manager.unauthorized_handler
    def _unauthorized():
        if request.path.startswith("/api/"):
            return jsonify(error="authentication required: log in, or send 'Authorization: Bearer TOKEN'"), 401
        target = request.full_path if request.method == "GET" else None
        return redirect(url_for("auth.login", next=target) if target and target != "/?" else url_for("auth.login"))


def _safe_next(target: str | None) -> str:
    """Only a path on this server: a login link must never bounce staff to another site."""
    if not target:
        return url_for("worklist.index")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return url_for("worklist.index")
    return target


@bp.get("/healthz")
def healthz():
    """For monitoring without a login: says the service answers and its store opens; no patient data."""
    s = store()
    return jsonify(status="ok", version=__version__, schema=s.schema_version(), disclaimer=RESEARCH_USE_BANNER)


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.args.get("lang") in ("en", "fr", "zh"):
        session["lang"] = request.args["lang"]
    if current_user.is_authenticated and request.method == "GET":
        return redirect(_safe_next(request.args.get("next")))
    error = None
    status = 200
    if session.pop("logged_out_idle", False):
        flash(_("You were logged out after a period without activity."), "info")
    if request.method == "POST":
        username = request.form.get("username", "")
        password = request.form.get("password", "")
        result = accounts.authenticate(store(), username, password, request.remote_addr or "?")
        if result.user is not None:
            session.clear()  # a fresh session on login: no fixation
            stamp = _stamp(result.user.username) or ""
            login_user(WebUser(result.user, stamp))
            import time

            session["seen"] = time.time()
            if result.user.must_change_password:
                return redirect(url_for("auth.account", first=1))
            return redirect(_safe_next(request.form.get("next")))
        if result.reason.startswith("rate_limited"):
            minutes = max(1, result.retry_after_s // 60)
            error = _("Too many failed logins. Try again in %(minutes)d minutes or ask an administrator to "
                      "reset the password.", minutes=minutes)
            status = 429
        else:
            error = _("Wrong user name or password.")
            status = 401
    return render_template("login.html", error=error, next=request.values.get("next", "")), status


@bp.post("/logout")
def logout():
    logout_user()
    lang = session.get("lang")
    session.clear()
    if lang:
        session["lang"] = lang
    flash(_("You are logged out."), "info")
    return redirect(url_for("auth.login"))


@bp.get("/account")
def account():
    tokens = accounts.list_tokens(store(), current_user.username)
    return render_template("account.html", tokens=[t for t in tokens if t["revoked_at"] is None],
                           first=bool(request.args.get("first")), new_token=None)


@bp.post("/account/password")
def change_password():
    new = request.form.get("new_password", "")
    if new != request.form.get("confirm_password", ""):
        flash(_("The two new passwords differ."), "error")
        return redirect(url_for("auth.account", first=1 if current_user.must_change_password else None))
    try:
        accounts.change_password(store(), current_user.username, request.form.get("current_password", ""), new)
    except accounts.AccountError as exc:
        flash(_("Password not changed: %(reason)s", reason=str(exc)), "error")
        return redirect(url_for("auth.account", first=1 if current_user.must_change_password else None))
    # this session continues under the new stamp; every other session of the user ends
    user = accounts.get_user(store(), current_user.username)
    login_user(WebUser(user, _stamp(user.username) or ""))
    flash(_("Password changed."), "info")
    return redirect(url_for("worklist.index"))


@bp.post("/account/language")
def set_language():
    lang = request.form.get("lang")
    if lang not in ("en", "fr", "zh", ""):
        lang = ""
    accounts.set_locale(store(), current_user.username, lang or None)
    session["lang"] = lang or None
    return redirect(_safe_next(request.form.get("next")))


@bp.post("/account/tokens")
def create_token():
    try:
        token = accounts.create_token(store(), current_user.username, request.form.get("name", ""),
                                      actor=current_user.username)
    except accounts.AccountError as exc:
        flash(str(exc), "error")
        return redirect(url_for("auth.account"))
    # shown once, in this response only: never in a cookie, a log or a redirect
    tokens = accounts.list_tokens(store(), current_user.username)
    return render_template("account.html", tokens=[t for t in tokens if t["revoked_at"] is None], first=False,
                           new_token=token)


@bp.post("/account/tokens/<int:token_id>/revoke")
def revoke_token(token_id: int):
    try:
        accounts.revoke_token(store(), token_id, actor=current_user.username, owner=current_user.username)
    except accounts.AccountError as exc:
        flash(str(exc), "error")
    return redirect(url_for("auth.account"))
