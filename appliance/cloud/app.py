"""The fleet receiver's HTTP API and page (Flask application factory; served by waitress).

    GET  /healthz                          200 while the database answers (the boxes' connectivity probe)
    POST /api/v1/items                     one JSON item {key, kind, group, body}: 201 stored, 200 duplicate
    POST /api/v1/uploads                   open (or find) a resumable upload {key, kind, group, size, sha256}
    PUT  /api/v1/uploads/<id>              one chunk at Upload-Offset; 409 with the offset the upload is at
    POST /api/v1/uploads/<id>/complete     verify size and sha256, store the item once
    GET  /api/v1/sites                     what the page shows, as JSON
    GET  /                                 sites, their last contact, health and findings

A device authenticates with `Authorization: Bearer <token>` (tokens from `cloud-receiver --add-device`,
stored hashed). `--allow-any-device` (tests, the demo) accepts a device named by X-Edgescreen-Device.
TLS is terminated in front of the receiver (a load balancer or reverse proxy); it listens on loopback
by default.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, jsonify, render_template_string, request

from edgescreen.appliance import RESEARCH_USE_BANNER, __version__
from edgescreen.appliance.cloud.db import FILE_KINDS, JSON_KINDS, ReceiverDB
from edgescreen.appliance.logs import get_logger

log = get_logger(__name__)

_DEVICE_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
MAX_JSON_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 20
MAX_UPLOAD_BYTES = 1 << 30


def _error(status: int, message: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


def create_app(db: ReceiverDB, *, allow_any_device: bool = False) -> Flask:
    # instance_path given, as in the box's web app: Flask cannot find one under the editable edgescreen namespace
    app = Flask(__name__, instance_path=str(Path(__file__).resolve().parent / "instance"))
    app.config["MAX_CONTENT_LENGTH"] = MAX_CHUNK_BYTES + 4096
    app.json.sort_keys = False

    def device() -> str:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            found = db.device_for_token(auth[7:].strip())
            if found is not None:
                return found
            abort(_error(401, "unknown device token; register the device with `edgescreen cloud-receiver "
                              "--add-device NAME` and put the token in the box's sync.token_file"))
        if allow_any_device:
            name = request.headers.get("X-Edgescreen-Device", "")
            if _DEVICE_RE.match(name):
                return name
            abort(_error(400, "X-Edgescreen-Device must name the device (letters, digits, ._:@-)"))
        abort(_error(401, "missing device token (Authorization: Bearer ...)"))
        raise AssertionError  # unreachable

    def site_header() -> str | None:
        site = request.headers.get("X-Edgescreen-Site")
        return site[:200] if site else None

    def payload(required: tuple[str, ...]) -> dict[str, Any]:
        doc = request.get_json(silent=True)
        if not isinstance(doc, dict):
            abort(_error(400, "the body must be a JSON object"))
        missing = [k for k in required if k not in doc]
        if missing:
            abort(_error(400, f"missing field(s): {', '.join(missing)}"))
        if not isinstance(doc.get("key"), str) or not _KEY_RE.match(doc["key"]):
            abort(_error(400, "key must be 1-200 characters of letters, digits and ._:-"))
        group = doc.get("group")
        if group is not None and (not isinstance(group, str) or not _KEY_RE.match(group)):
            abort(_error(400, "group must be null or 1-200 characters of letters, digits and ._:-"))
        return doc

    @app.get("/healthz")
    def healthz() -> Response:
        try:
            db.ping()
        except Exception as exc:  # noqa: BLE001 - the probe reports, never raises
            log.error("health check: database unavailable", error=str(exc))
            return _error(503, "database unavailable")
        return jsonify({"ok": True, "version": __version__})

    @app.post("/api/v1/items")
    def post_item() -> Response:
        dev = device()
        if (request.content_length or 0) > MAX_JSON_BYTES:
            return _error(413, f"JSON items are at most {MAX_JSON_BYTES} bytes; send files as uploads")
        doc = payload(("key", "kind", "body"))
        if doc["kind"] not in JSON_KINDS or not isinstance(doc["body"], dict):
            return _error(422, f"kind must be one of {', '.join(JSON_KINDS)} with an object body")
        body = json.dumps(doc["body"], sort_keys=True)
        with db.tx() as conn:
            db.touch(conn, dev, site_header())
            stored = db.store_item(conn, dev, doc["key"], doc["kind"], doc.get("group"), body=body)
        if not stored:
            log.info("item already stored; answered duplicate", device=dev, key=doc["key"])
        return jsonify({"status": "stored" if stored else "duplicate"}), 201 if stored else 200

    @app.post("/api/v1/uploads")
    def open_upload() -> Response:
        dev = device()
        doc = payload(("key", "kind", "size", "sha256"))
        if doc["kind"] not in FILE_KINDS:
            return _error(422, f"uploads are for {', '.join(FILE_KINDS)}")
        size, digest = doc["size"], doc["sha256"]
        if not isinstance(size, int) or not 0 < size <= MAX_UPLOAD_BYTES:
            return _error(422, f"size must be 1..{MAX_UPLOAD_BYTES} bytes")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            return _error(422, "sha256 must be 64 lower-case hex digits")
        opened = db.open_upload(dev, doc["key"], doc["kind"], doc.get("group"), size, digest)
        if opened["status"] == "duplicate":
            log.info("item already stored; answered duplicate", device=dev, key=doc["key"])
        return jsonify(opened)

    @app.put("/api/v1/uploads/<upload_id>")
    def put_chunk(upload_id: str) -> Response:
        dev = device()
        try:
            offset = int(request.headers["Upload-Offset"])
        except (KeyError, ValueError):
            return _error(400, "Upload-Offset header (bytes already sent) is required")
        data = request.get_data(cache=False)
        if not data:
            return _error(400, "empty chunk")
        accepted, now = db.put_chunk(dev, upload_id, offset, data)
        if now is None:
            return _error(404, "no such upload (completed or expired); open it again")
        if not accepted:
            response = jsonify({"error": "offset mismatch", "offset": now})
            response.status_code = 409
            return response
        return jsonify({"offset": now})

    @app.post("/api/v1/uploads/<upload_id>/complete")
    def complete(upload_id: str) -> Response:
        dev = device()
        result = db.complete_upload(dev, upload_id)
        if result["status"] == "unknown":
            return _error(404, "no such upload (completed or expired); open it again")
        if result["status"] == "duplicate":
            log.info("item already stored; answered duplicate", device=dev, upload=upload_id)
        if result["status"] == "corrupt":
            return _error(422, "the upload's size or sha256 does not match; it was reset, send it again")
        return jsonify(result), 201 if result["status"] == "stored" else 200

    @app.get("/api/v1/sites")
    def sites_json() -> Response:
        return jsonify({"sites": db.sites()})

    @app.get("/")
    def page() -> str:
        return render_template_string(PAGE, sites=db.sites(), banner=RESEARCH_USE_BANNER, version=__version__,
                                      now=time.time(), fmt=_fmt_time, ago=_ago)

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; "
                                    "frame-ancestors 'none'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    return app


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "never"


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    s = max(0, int(now - ts))
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago" if s < 7200 else f"{s // 3600} h ago"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>edgescreen fleet</title>
<style>
body{font-family:sans-serif;margin:1.5em;color:#222} table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left} .banner{background:#fff3cd;padding:.6em;
border:1px solid #e0c36a} .suspicious{color:#a00;font-weight:bold} .indeterminate{color:#a60}
h2{margin-top:1.5em} .muted{color:#777}
</style></head><body>
<p class="banner" role="note">{{ banner }}</p>
<h1>edgescreen fleet</h1>
<p class="muted">receiver {{ version }}; {{ sites|length }} site(s); this page refreshes every 5 s.
Everything here arrived de-identified (DICOM PS3.15 Annex E); study identifiers are per-site pseudonyms.</p>
<table id="sites"><thead><tr><th>device</th><th>site</th><th>last contact</th><th>health</th>
<th>findings</th><th>SEG</th><th>SR</th></tr></thead><tbody>
{% for s in sites %}<tr class="site" data-device="{{ s.device_id }}">
<td>{{ s.device_id }}</td><td>{{ s.site or "" }}</td>
<td title="{{ fmt(s.last_contact) }}">{{ ago(s.last_contact, now) }}</td>
<td>{% if s.health %}edgescreen {{ s.health.get("version", "?") }}; queue {{ s.health.get("queue", {}).get("queued", "?") }}
 queued, outbox {{ s.health.get("outbox", {}).get("pending", "?") }} pending; disk {{ s.health.get("disk", {}).get("free_gb", "?") }} GB free;
 power {{ s.health.get("power", {}).get("state", "?") }}{% if s.health.get("last_errors") %}; last error: {{ s.health.last_errors[0].error }}{% endif %}
 <span class="muted">({{ ago(s.health_at, now) }})</span>{% else %}<span class="muted">no heartbeat yet</span>{% endif %}</td>
<td>{{ s.counts["cloud.finding"] }}</td><td>{{ s.counts["cloud.seg"] }}</td><td>{{ s.counts["cloud.sr"] }}</td></tr>
{% endfor %}</tbody></table>
{% for s in sites %}
<h2>Findings from {{ s.device_id }}{% if s.site %} ({{ s.site }}){% endif %}</h2>
{% if s.findings %}<table class="findings" data-device="{{ s.device_id }}"><thead><tr><th>received</th><th>study (pseudonym)</th>
<th>pipeline</th><th>triage</th><th>score</th><th>threshold</th><th>lesions</th><th>in domain</th></tr></thead><tbody>
{% for f in s.findings %}<tr class="finding">
<td>{{ fmt(f.received_at) }}</td><td title="{{ f.get('study', '') }}">{{ (f.get("study") or "")[-12:] }}</td>
<td>{{ f.get("pipeline") }}</td><td class="{{ f.get('triage') }}">{{ f.get("triage") }}</td>
<td>{{ "%.3f"|format(f.abnormal_probability) if f.get("abnormal_probability") is not none else "-" }}</td>
<td>{{ "%.3f"|format(f.threshold) if f.get("threshold") is not none else "-" }}</td>
<td>{{ (f.get("lesions") or [])|length }}</td>
<td title="{{ ((f.get('domain') or {}).get('reasons') or [])|join('; ') }}">{{ "yes" if (f.get("domain") or {}).get("in_domain", True) else "no: " ~ ((f.get("domain") or {}).get("reasons") or ["?"])[0] }}</td></tr>
{% endfor %}</tbody></table>{% else %}<p class="muted">no findings yet</p>{% endif %}
{% endfor %}
</body></html>
"""
