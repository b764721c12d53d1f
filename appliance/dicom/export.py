"""Result export to the clinic's PACS: C-STORE SCU and/or DICOMweb STOW-RS, through the outbox.

`queue_export(store, files, study_uid)` records one outbox row (kind "pacs") in one transaction, so a
result is never lost between "analysis done" and "PACS has it". `export_pending(store, config)` sends
whatever is due, one association (or one STOW-RS request) per row; a failure is recorded in
`last_error` and retried with exponential backoff (retry_base_s * 2**(attempt-1), capped), up to
`pacs.retries` times. Rows are claimed with a guarded UPDATE first, so the DICOM service's loop and
a technician's `edgescreen dicom --export-pending` never send the same row at once.

STOW-RS uses urllib only (multipart/related; type="application/dicom", PS3.18 10.5): no new dependency.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.config.site import Pacs, SiteConfig
from appliance.logs import get_logger
from appliance.store import Store

log = get_logger(__name__)

KIND = "pacs"
CLAIM_S = 600.0  # a claimed row is invisible to other senders this long (a crashed sender's row comes back)
_OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the storage warnings (coercion etc.)


class ExportError(RuntimeError):
    """A transfer that failed; the message is what `last_error` shows the technician."""


def queue_export(store: Store, files: Sequence[Path | str], study_uid: str) -> int:
    """Queue result files (SEG, SR, summary) of a study for the PACS; idempotent per (study, file set)."""
    rel = []
    for f in files:
        p = Path(f)
        try:
            rel.append(str(p.resolve().relative_to(store.data_dir.resolve())))
        except ValueError:
            rel.append(str(p.resolve()))
    key = f"{KIND}:" + hashlib.sha1("\n".join([study_uid, *sorted(rel)]).encode()).hexdigest()
    payload = json.dumps({"study_uid": study_uid, "files": rel, "done": []})
    with store.transaction() as conn:
        row = conn.execute("SELECT id FROM outbox WHERE idempotency_key = ?", (key,)).fetchone()
        if row is not None:
            return int(row["id"])
        cur = conn.execute("INSERT INTO outbox (kind, idempotency_key, payload, created_at, next_attempt_at) "
                           "VALUES (?, ?, ?, ?, 0)", (KIND, key, payload, time.time()))
        log.info("result export queued", study=study_uid, outbox=cur.lastrowid, files=len(rel))
        return int(cur.lastrowid)


def _pacs(config: SiteConfig | Pacs | None) -> Pacs | None:
    if isinstance(config, SiteConfig):
        return config.dicom.pacs
    return config


def _transports(pacs: Pacs) -> list[str]:
    return {"dimse": ["dimse"], "dicomweb": ["dicomweb"], "both": ["dimse", "dicomweb"]}[pacs.via]


def export_pending(store: Store, config: SiteConfig | Pacs | None, *, now: float | None = None,
                   calling_ae: str | None = None) -> dict[str, int]:
    """Send every due "pacs" outbox row once; return counts of sent, failed (will retry) and given up."""
    pacs = _pacs(config)
    counts = {"sent": 0, "failed": 0, "gave_up": 0}
    if pacs is None:
        return counts
    if calling_ae is None:
        calling_ae = config.dicom.ae_title if isinstance(config, SiteConfig) else "EDGESCREEN"
    now = time.time() if now is None else now
    due = store.query("SELECT * FROM outbox WHERE kind = ? AND sent_at IS NULL AND attempts <= ? "
                      "AND next_attempt_at <= ? ORDER BY id", (KIND, pacs.retries, now))
    for row in due:
        with store.transaction() as conn:  # claim it
            claimed = conn.execute("UPDATE outbox SET next_attempt_at = ? WHERE id = ? AND next_attempt_at <= ? "
                                   "AND sent_at IS NULL", (now + CLAIM_S, row["id"], now)).rowcount == 1
        if claimed:
            counts[_send_row(store, pacs, dict(row), calling_ae, now)] += 1
    return counts


def _send_row(store: Store, pacs: Pacs, row: dict, calling_ae: str, now: float) -> str:
    payload = json.loads(row["payload"])
    study = payload.get("study_uid")
    paths = [Path(f) if Path(f).is_absolute() else store.data_dir / f for f in payload["files"]]
    done: list[str] = payload.get("done", [])
    error = None
    for transport in _transports(pacs):
        if transport in done:
            continue
        try:
            if transport == "dimse":
                send_c_store(paths, pacs, calling_ae)
            else:
                send_stow(paths, pacs)
            done.append(transport)
        except (ExportError, OSError) as exc:
            error = f"{transport}: {exc}"
            break
    payload["done"] = done
    attempts = row["attempts"] + 1
    with store.transaction() as conn:
        if error is None:
            conn.execute("UPDATE outbox SET sent_at = ?, attempts = ?, payload = ?, last_error = NULL WHERE id = ?",
                         (now, attempts, json.dumps(payload), row["id"]))
            log.info("results exported to PACS", study=study, outbox=row["id"], via=",".join(done), files=len(paths))
            return "sent"
        delay = min(pacs.retry_base_s * 2 ** (attempts - 1), pacs.retry_max_s)
        conn.execute("UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ?, payload = ? WHERE id = ?",
                     (attempts, now + delay, error, json.dumps(payload), row["id"]))
    if attempts > pacs.retries:
        log.error("result export given up; fix the PACS settings or the PACS, then re-queue it", study=study,
                  outbox=row["id"], attempts=attempts, error=error)
        return "gave_up"
    log.warning("result export failed; will retry", study=study, outbox=row["id"], attempts=attempts,
                retry_in_s=round(delay, 1), error=error)
    return "failed"


# -- C-STORE SCU -----------------------------------------------------------------------------------
def send_c_store(paths: Sequence[Path], pacs: Pacs, calling_ae: str) -> None:
    """Send files in one association; ExportError naming the first refused file or the association failure."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = pacs.timeout_s
    wanted: dict[str, set[str]] = {}
    for ds in datasets:
        wanted.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    for sop_class, syntaxes in wanted.items():
        ae.add_requested_context(sop_class, sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.ae_title)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no connection"
        raise ExportError(f"association to {pacs.ae_title}@{pacs.host}:{pacs.port} failed ({why})")
    try:
        for path, ds in zip(paths, datasets, strict=True):
            rsp = assoc.send_c_store(ds)
            status = getattr(rsp, "Status", None)
            if status is None:
                raise ExportError(f"{path.name}: no response from {pacs.ae_title} (timeout or abort)")
            if int(status) not in _OK_STATUSES:
                comment = f" ({rsp.ErrorComment})" if "ErrorComment" in rsp else ""
                raise ExportError(f"{path.name}: {pacs.ae_title} answered 0x{int(status):04X}{comment}")
    finally:
        if assoc.is_established:
            assoc.release()


# -- STOW-RS -----------------------------------------------------------------------------------------
def send_stow(paths: Sequence[Path], pacs: Pacs) -> None:
    """POST the files as multipart/related to {dicomweb_url}/studies; ExportError on any refusal."""
    assert pacs.dicomweb_url
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for p in paths:
        parts += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), Path(p).read_bytes(), b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    url = pacs.dicomweb_url.rstrip("/") + "/studies"
    req = urllib.request.Request(url, data=b"".join(parts), method="POST", headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(req, timeout=pacs.timeout_s) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except urllib.error.URLError as exc:
        raise ExportError(f"STOW-RS to {url}: {exc.reason}") from None
    failed = _failed_sops(body)
    if status == 200 and not failed:
        return
    detail = f"{len(failed)} instance(s) refused, e.g. {failed[0]}" if failed else body[:200].decode(errors="replace")
    raise ExportError(f"STOW-RS to {url}: HTTP {status}: {detail}")


def _failed_sops(body: bytes) -> list[str]:
    """Referenced SOP Instance UIDs (and failure reasons) from a STOW-RS response's Failed SOP Sequence."""
    try:
        doc: Any = json.loads(body or b"{}")
    except ValueError:
        return []
    failed = (doc.get("00081198") or {}).get("Value") or [] if isinstance(doc, dict) else []
    out = []
    for item in failed:
        uid = ((item.get("00081155") or {}).get("Value") or ["?"])[0]
        reason = ((item.get("00081197") or {}).get("Value") or [None])[0]
        out.append(f"{uid} (reason 0x{int(reason):04X})" if reason is not None else uid)
    return out
