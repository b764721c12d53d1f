"""Administration: users (add, disable, reset password, role, tokens) and the audit log with its filters."""

from __future__ import annotations

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_babel import gettext as _

from edgescreen.appliance import accounts
from edgescreen.appliance.store.worklist import day_bounds
from edgescreen.appliance.web.helpers import actor, require, store, studies_named

bp = Blueprint("admin", __name__)
AUDIT_PER_PAGE = 100


@bp.get("/admin")
@require("users")
def page():
    return render_template("admin.html", users=accounts.list_users(store()), roles=accounts.ROLES,
                           role_help=accounts.ROLE_HELP, tokens=accounts.list_tokens(store()), shown=None)


def _shown(username: str, password: str, what: str):
    """The page again, with a one-time password shown once (never stored in a cookie or a log)."""
    return render_template("admin.html", users=accounts.list_users(store()), roles=accounts.ROLES,
                           role_help=accounts.ROLE_HELP, tokens=accounts.list_tokens(store()),
                           shown={"username": username, "password": password, "what": what})


@bp.post("/admin/users")
@require("users")
def add_user():
    name = request.form.get("username", "").strip()
    password = request.form.get("password") or None
    try:
        shown = accounts.create_user(store(), name, request.form.get("role", ""), password, actor=actor())
    except accounts.AccountError as exc:
        flash(str(exc), "error")
        return redirect(url_for("admin.page"))
    if password is None:
        return _shown(name, shown, _("one-time password for the new user"))
    flash(_("User %(name)s created.", name=name), "info")
    return redirect(url_for("admin.page"))


@bp.post("/admin/users/<username>/<action>")
@require("users")
def user_action(username: str, action: str):
    try:
        if action in ("disable", "enable"):
            accounts.disable_user(store(), username, actor=actor(), disabled=action == "disable")
            flash(_("User %(name)s disabled.", name=username) if action == "disable"
                  else _("User %(name)s enabled.", name=username), "info")
        elif action == "reset-password":
            return _shown(username, accounts.reset_password(store(), username, actor=actor()),
                          _("new one-time password"))
        elif action == "role":
            accounts.set_role(store(), username, request.form.get("role", ""), actor=actor())
            flash(_("Role of %(name)s changed.", name=username), "info")
        else:
            flash(_("Unknown action."), "error")
    except accounts.AccountError as exc:
        flash(str(exc), "error")
    return redirect(url_for("admin.page"))


@bp.post("/admin/tokens/<int:token_id>/revoke")
@require("users")
def revoke_token(token_id: int):
    try:
        accounts.revoke_token(store(), token_id, actor=actor())
        flash(_("Token revoked."), "info")
    except accounts.AccountError as exc:
        flash(str(exc), "error")
    return redirect(url_for("admin.page"))


def audit_query(args) -> dict:
    """Audit rows filtered by actor, action (prefix: 'login' matches login.success and login.failure),
    target and received date range, newest first, paged."""
    clauses, params = [], []
    if args.get("actor"):
        clauses.append("actor = ?")
        params.append(args["actor"].strip())
    if args.get("action"):
        clauses.append("(action = ? OR action LIKE ? ESCAPE '\\')")
        prefix = args["action"].strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        params += [args["action"].strip(), prefix + ".%"]
    if args.get("target"):
        clauses.append("target = ?")
        params.append(args["target"].strip())
    for key, op, idx in (("from", ">=", 0), ("to", "<", 1)):
        if args.get(key):
            try:
                params.append(day_bounds(args[key])[idx])
            except ValueError:
                continue
            clauses.append(f"ts {op} ?")
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    try:
        page = max(1, int(args.get("page", 1)))
    except ValueError:
        page = 1
    rows = [dict(r) for r in store().query(f"SELECT id, ts, actor, action, target, detail FROM audit{where} "
                                            "ORDER BY ts DESC, id DESC LIMIT ? OFFSET ?",
                                            (*params, AUDIT_PER_PAGE, (page - 1) * AUDIT_PER_PAGE))]
    total = store().query_one(f"SELECT COUNT(*) FROM audit{where}", params)[0]
    actions = [r[0] for r in store().query("SELECT DISTINCT action FROM audit ORDER BY action")]
    return {"rows": rows, "total": total, "page": page, "pages": max(1, -(-total // AUDIT_PER_PAGE)),
            "actions": actions}


@bp.get("/audit")
@require("audit")
def audit():
    args = {k: v for k, v in request.args.items() if v and k != "page"}
    a = audit_query(request.args)
    studies = studies_named(r["target"] for r in a["rows"] if (r["action"] or "").startswith("study."))
    return render_template("audit.html", a=a, args=args, studies=studies)
