"""The system page (scanner, power, queue, timeline, disk, bundle, versions, sync) and the staff overrides.

Every override goes through the function the CLI uses (jobs.set_flag / jobs.retry, scheduler.control,
scanner.set_manual), audited there with the user's name.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import shutil
import threading
import time
from html import escape

from flask import Blueprint, Response, abort, current_app, flash, redirect, render_template, request, url_for
from flask_babel import gettext as _

from edgescreen.appliance import __version__
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.store import InvalidTransition
from edgescreen.appliance.web.helpers import actor, ctx, require, store

bp = Blueprint("system", __name__)
log = get_logger(__name__)

_gate_lock = threading.Lock()
OBSERVE_EVERY_S = 3.0  # a NUT round trip per page view is wasteful; the worker polls every 2 s anyway


def _cache(name: str) -> dict:
    """Per-application caches (one app per store; tests run several in one process)."""
    caches = current_app.extensions.setdefault("edgescreen_system", {})
    return caches.setdefault(name, {"gate": None, "at": 0.0, "value": None})


def gate_view() -> dict:
    """What the gate sees now: scanner sources, power, the decision and its reason (cached a few seconds).

    The same LiveGate the worker uses, read with record=False: the worker is the one that records scanner
    and power changes, so the timeline shows each change once however many pages are open.
    """
    from edgescreen.appliance.scheduler.live import LiveGate

    _gate = _cache("gate")
    with _gate_lock:
        now = time.time()
        if _gate["value"] is not None and now - _gate["at"] < OBSERVE_EVERY_S:
            return _gate["value"]
        try:
            if _gate["gate"] is None:
                _gate["gate"] = LiveGate(ctx())
            obs = _gate["gate"].observe(record=False)
        except Exception as exc:  # a source that throws must not take the page down
            log.warning("gate not observed", error=f"{type(exc).__name__}: {exc}")
            value = {"error": str(exc)}
            _gate.update(at=now, value=value)
            return value
        scanner, power, decision = obs.scanner, obs.power, obs.decision
        value = {
            "scanner": {"busy": scanner.busy, "since": scanner.since, "reason": scanner.reason,
                        "signals": [{"source": s.source, "busy": s.busy, "stale": s.stale, "reason": s.reason,
                                     "since": s.since} for s in scanner.signals]},
            "power": None if power is None else {
                "source": power.source, "on_mains": power.on_mains, "battery_percent": power.battery_percent,
                "runtime_s": power.runtime_s, "ups_realpower_w": power.ups_realpower_w, "low_battery": power.low_battery,
                "stale": power.stale, "error": power.error, "status": power.status_raw},
            "decision": {"run": decision.run, "reason": decision.reason, "mode": decision.mode.name,
                         "mode_watts": decision.mode.watts, "on_battery": decision.on_battery},
        }
        _gate.update(at=now, value=value)
        return value


def _bundle_info() -> dict:
    """The active bundle, its backends and signature state (verified at most every 5 minutes)."""
    from edgescreen.appliance.bundle import key_home, list_bundles

    c = ctx()
    _bundle_cache = _cache("bundle")
    now = time.time()
    if _bundle_cache["value"] is not None and now - _bundle_cache["at"] < 300:
        return _bundle_cache["value"]
    try:
        bundles = list_bundles(c.data_dir, verify=True, key_home=key_home(c.config_path, c.data_dir))
    except Exception as exc:
        value = {"active": None, "error": f"{type(exc).__name__}: {exc}"}
    else:
        active = next((b for b in bundles if b.current), None)
        value = {"active": None if active is None else {
            "bundle_id": active.bundle_id, "profile": active.profile, "created_at": active.created_at,
            "roles": list(active.roles), "signature": "valid" if active.problem is None else active.problem},
            "installed": len(bundles), "error": None}
        if active is not None and active.problem is None:
            from edgescreen.appliance.bundle import verify_bundle

            try:
                from edgescreen.appliance.bundle import load_trusted_keys

                manifest = verify_bundle(active.path, load_trusted_keys(key_home(c.config_path, c.data_dir)))
                value["active"]["backends"] = {role: f"{m.backend} {m.precision} on {m.device}"
                                               for role, m in manifest.models.items()}
            except Exception as exc:
                value["active"]["signature"] = str(exc)
    _bundle_cache.update(at=now, value=value)
    return value


def _versions() -> dict:
    out = {"edgescreen": __version__, "python": platform.python_version()}
    for dist in ("onnxruntime", "openvino", "tensorrt", "pydicom", "pynetdicom", "highdicom", "flask"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def _sync() -> dict:
    try:
        from edgescreen.appliance.sync.status import summary
    except ImportError:
        return {"available": False}
    try:
        return {"available": True, **summary(store())}
    except Exception as exc:  # the sync tables may be older than this code on a half-upgraded box
        return {"available": False, "error": str(exc)}


def _services() -> list[dict]:
    try:
        return [dict(r) for r in store().query("SELECT service, pid, host, started_at, beat_at, stopped_at, detail "
                                               "FROM heartbeats ORDER BY service")]
    except Exception:
        return []


def system_status() -> dict:
    """Everything the system page shows; GET /api/v1/system returns the same."""
    from edgescreen.appliance.scheduler import control
    from edgescreen.appliance.store.jobs import queue_summary

    c = ctx()
    s = store()
    disk = shutil.disk_usage(c.data_dir)
    from edgescreen.appliance.store.jobs import stage_position

    running = [dict(r) for r in s.query("SELECT id, study_uid, pipeline, stage, progress, started_at FROM jobs "
                                        "WHERE state = 'running' ORDER BY started_at")]
    for job in running:
        job["stage_k"], job["stage_n"] = stage_position(job["pipeline"], job["stage"]) or (None, None)
    worker_reason = s.query_one("SELECT waiting_reason FROM jobs WHERE state = 'queued' AND waiting_reason IS NOT NULL "
                                "ORDER BY updated_at DESC LIMIT 1")
    profile = c.profile
    return {
        "gate": gate_view(),
        "worker_reason": worker_reason["waiting_reason"] if worker_reason else None,
        "scheduler": control.status(s),
        "queue": {**queue_summary(s), "running_jobs": running},
        "power_budget": {"site_budget_w": c.config.power.site_budget_w, "idle_watts": profile.idle_watts,
                         "modes": [{"name": m.name, "watts": m.watts, "threads": m.threads, "use_on": m.use_on}
                                   for m in profile.power_modes],
                         "min_battery_percent": c.config.power.min_battery_percent,
                         "min_runtime_min": c.config.power.min_runtime_min},
        "disk": {"path": str(c.data_dir), "total_bytes": disk.total, "free_bytes": disk.free,
                 "min_free_mb": c.config.dicom.min_free_mb},
        "bundle": _bundle_info(),
        "profile": {"name": profile.name, "description": profile.description,
                    "backends": [cand.backend for cand in profile.candidates]},
        "versions": _versions(),
        "sync": _sync(),
        "services": _services(),
        "web": {"host": c.config.web.host, "port": c.config.web.port},
    }


# -- the timeline --------------------------------------------------------------------------------------
def timeline_svg(start: float, end: float) -> str:
    """Today's scanner busy bands, analyses and power states as SVG, from the events the services record.

    Drawn here rather than with the simulator's render_svg: that one draws a simulated trace (MPPS
    windows from a trace file, simulated runs), this one the recorded events of a real day.
    """
    s = store()
    events = s.query("SELECT ts, kind, source, state, detail FROM events WHERE ts >= ? AND ts < ? "
                     "AND kind IN ('scanner', 'power', 'job', 'scheduler') ORDER BY ts, id", (start - 86400, end))
    width, left, row_h, top = 1000, 120, 24, 8
    x = lambda t: left + (width - left - 10) * (min(max(t, start), end) - start) / (end - start)  # noqa: E731
    rows = {"scanner": top, "power": top + row_h, "analysis": top + 2 * row_h, "paused": top + 3 * row_h}
    height = top + 4 * row_h + 24
    labels = {"scanner": _("scanner busy"), "power": _("power"), "analysis": _("analyses"), "paused": _("paused")}
    title = escape(_("Timeline of today"))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{title}" class="timeline" font-family="sans-serif" font-size="12">']
    for key, y in rows.items():
        parts.append(f'<text x="4" y="{y + 16}">{escape(labels[key])}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{width - left - 10}" height="{row_h - 6}" fill="#f0f2f5"/>')

    def band(row: str, a: float, b: float, fill: str, title: str, cls: str) -> None:
        if b <= start or a >= end:
            return
        parts.append(f'<rect class="{cls}" x="{x(a):.1f}" y="{rows[row] + 3}" width="{max(x(b) - x(a), 1.5):.1f}" '
                     f'height="{row_h - 6}" fill="{fill}"><title>{escape(title)}</title></rect>')

    import json

    busy_since = power_since = paused_since = None
    power_state = None
    running: dict[int, float] = {}
    now = min(time.time(), end)
    for e in events:
        ts, kind, state = e["ts"], e["kind"], e["state"]
        if kind == "scanner" and e["source"] != "manual":
            if state == "busy" and busy_since is None:
                busy_since = ts
            elif state == "idle" and busy_since is not None:
                band("scanner", busy_since, ts, "#c0392b", e["detail"] or "", "busy")
                busy_since = None
        elif kind == "power":
            if power_state is not None and power_since is not None:
                band("power", power_since, ts, _POWER_FILL.get(power_state, "#95a5a6"), power_state, f"power-{power_state}")
            power_state, power_since = state, ts
        elif kind == "scheduler":
            if state == "paused" and paused_since is None:
                paused_since = ts
            elif state == "resumed" and paused_since is not None:
                band("paused", paused_since, ts, "#7f8c8d", _("paused"), "paused")
                paused_since = None
        elif kind == "job":
            try:
                job_id = int(json.loads(e["detail"] or "{}").get("job"))
            except (ValueError, TypeError, AttributeError):
                continue
            if state in ("started", "resumed"):
                running[job_id] = ts
            elif job_id in running:
                band("analysis", running.pop(job_id), ts, "#2c6fbb" if state == "done" else "#e67e22",
                     f"job {job_id}: {state}", "run")
    if busy_since is not None:
        band("scanner", busy_since, now, "#c0392b", _("busy now"), "busy")
    if power_state is not None and power_since is not None:
        band("power", power_since, now, _POWER_FILL.get(power_state, "#95a5a6"), power_state, f"power-{power_state}")
    if paused_since is not None:
        band("paused", paused_since, now, "#7f8c8d", _("paused"), "paused")
    for job_id, t0 in running.items():
        band("analysis", t0, now, "#5dade2", f"job {job_id}: running", "run")
    for h in range(0, 25, 3):
        t = start + h * 3600
        parts.append(f'<text x="{x(t) - 8:.1f}" y="{height - 6}" fill="#5b6470">{h:02d}:00</text>')
    if start <= now <= end:
        parts.append(f'<line x1="{x(now):.1f}" x2="{x(now):.1f}" y1="{top}" y2="{top + 4 * row_h}" stroke="#1b1f24" '
                     'stroke-dasharray="3 2"/>')
    parts.append("</svg>")
    return "\n".join(parts)


_POWER_FILL = {"mains": "#2e8b57", "battery": "#e67e22", "battery-low": "#c0392b", "stale": "#95a5a6"}


def _today() -> tuple[float, float]:
    t = time.localtime()
    start = time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))
    return start, time.mktime((t.tm_year, t.tm_mon, t.tm_mday + 1, 0, 0, 0, 0, 0, -1))


@bp.get("/system")
def page():
    return render_template("system.html", s=system_status(), timeline=timeline_svg(*_today()))


@bp.get("/system/timeline.svg")
def timeline():
    return Response(timeline_svg(*_today()), mimetype="image/svg+xml")


# -- overrides -----------------------------------------------------------------------------------------
class OverrideError(ValueError):
    """An override that does not apply (job not queued, unknown mode); the message says why."""


def apply_job_action(job_id: int, action: str) -> str:
    from edgescreen.appliance.store import jobs

    try:
        if action in ("urgent", "run_now"):
            jobs.set_flag(store(), job_id, action, actor())
            return _("Job %(id)d marked urgent.", id=job_id) if action == "urgent" else \
                _("Job %(id)d will run now (once the scanner is idle).", id=job_id)
        if action == "retry":
            jobs.retry(store(), job_id, actor())
            return _("Job %(id)d queued again.", id=job_id)
    except InvalidTransition as exc:
        raise OverrideError(str(exc)) from None
    raise OverrideError(f"unknown action {action!r}")


def apply_scheduler(action: str, reason: str | None = None) -> dict:
    from edgescreen.appliance.scheduler import control

    _cache("gate").update(value=None)
    if action == "pause":
        return control.pause(store(), actor(), reason)
    return control.resume(store(), actor())


def apply_scanner(mode: str) -> None:
    from edgescreen.appliance.scheduler.scanner import MANUAL_MODES, set_manual

    if mode not in MANUAL_MODES:
        raise OverrideError(f"scanner mode {mode!r}: use one of {', '.join(MANUAL_MODES)}")
    set_manual(store(), mode, actor())
    _cache("gate").update(value=None)


def _back() -> str:
    target = request.form.get("next") or ""
    return target if target.startswith("/") and not target.startswith("//") else url_for("system.page")


_JOB_PERMISSION = {"urgent": "prioritise", "run_now": "prioritise", "retry": "operate"}


@bp.post("/jobs/<int:job_id>/<action>")
def job_action(job_id: int, action: str):
    action = action.replace("-", "_")
    permission = _JOB_PERMISSION.get(action)
    if permission is None:
        abort(404)
    if not ctx_user_can(permission):
        abort(403)
    try:
        flash(apply_job_action(job_id, action), "info")
    except OverrideError as exc:
        flash(str(exc), "error")
    return redirect(_back())


def ctx_user_can(permission: str) -> bool:
    from flask_login import current_user

    return bool(current_user.is_authenticated and current_user.can(permission))


@bp.post("/scheduler/<action>")
@require("operate")
def scheduler_action(action: str):
    if action not in ("pause", "resume"):
        abort(404)
    apply_scheduler(action, request.form.get("reason"))
    flash(_("Analysis paused.") if action == "pause" else _("Analysis resumed."), "info")
    return redirect(_back())


@bp.post("/scanner/<mode>")
@require("operate")
def scanner_action(mode: str):
    try:
        apply_scanner(mode)
        flash(_("Scanner switch set to %(mode)s.", mode=mode), "info")
    except OverrideError as exc:
        flash(str(exc), "error")
    return redirect(_back())
