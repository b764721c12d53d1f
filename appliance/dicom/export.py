"""Result export to the clinic's PACS: C-STORE SCU and/or DICOMweb STOW-RS, through the outbox.

A finished job's PACS item is written with its result (appliance.sync.enqueue, appliance.store.jobs.finish);
`queue_export(store, files, study_uid)` queues files by hand (idempotent per study and file set).
`export_pending(store, config)` sends whatever is due, one association (or one STOW-RS request) per row,
claimed under a lease through appliance.store.outbox (the one guarded function for outbox changes), so the
DICOM service's loop, the sync service and a technician's `edgescreen dicom --export-pending` never send a
row at once. A failure is recorded in `last_error` and retried with exponential backoff and jitter
(appliance.scheduler.retry.delay on retry_base_s / retry_max_s) up to `pacs.retries` times; then the row
is failed for a technician (`edgescreen outbox retry ID`). Anything that goes wrong with one row (a PACS
that accepts no presentation context for a SEG or an encapsulated PDF, a result file that is not DICOM)
is recorded on that row and counts as an attempt: a row is never left leased by an unexpected error,
and never keeps the other rows (or the cloud round of the sync service) from their turn.

STOW-RS goes through dicomweb-client (a requests session: basic or bearer authentication from files,
certificates always verified, optionally against a pinned CA bundle).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgescreen.appliance.config.site import Pacs, RetryPolicy, SiteConfig
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.store import Store, outbox
from edgescreen.appliance.store.outbox import OutboxItem

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
    with store.transaction() as conn:
        (item_id,) = outbox.add_items(conn, [OutboxItem(KIND, key, {"study_uid": study_uid, "files": rel,
                                                                    "done": []})])
    log.info("result export queued", study=study_uid, outbox=item_id, files=len(rel))
    return item_id


def _pacs(config: SiteConfig | Pacs | None) -> Pacs | None:
    if isinstance(config, SiteConfig):
        return config.dicom.pacs
    return config


def _transports(pacs: Pacs) -> list[str]:
    return {"dimse": ["dimse"], "dicomweb": ["dicomweb"], "both": ["dimse", "dicomweb"]}[pacs.via]


def export_pending(store: Store, config: SiteConfig | Pacs | None, *, now: float | None = None,
                   calling_ae: str | None = None, owner: str | None = None) -> dict[str, int]:
    """Send every due "pacs" outbox row once; return counts of sent, failed (will retry) and given up."""
    pacs = _pacs(config)
    counts = {"sent": 0, "failed": 0, "gave_up": 0}
    if pacs is None:
        return counts
    if calling_ae is None:
        calling_ae = config.dicom.ae_title if isinstance(config, SiteConfig) else "EDGESCREEN"
    owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    start, began = time.monotonic(), time.time() if now is None else now

    def clock() -> float:  # `now` moves on while rows are sent: a lease or a backoff never starts in the past
        return began + time.monotonic() - start

    while True:
        # rows due when this pass began: one deferred during the pass waits for the next pass
        rows = outbox.claim(store, owner, CLAIM_S, kinds=(KIND,), now=clock(), due_by=began, limit=10)
        if not rows:
            return counts
        for row in rows:
            counts[_send_row(store, pacs, row, calling_ae, owner, clock)] += 1


def _send_row(store: Store, pacs: Pacs, row: dict, calling_ae: str, owner: str, clock: Callable[[], float]) -> str:
    from edgescreen.appliance.scheduler.retry import delay

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
        except Exception as exc:  # noqa: BLE001 - recorded on the row and retried, never left leased
            log.exception("result export failed unexpectedly", study=study, outbox=row["id"], via=transport)
            error = f"{transport}: {type(exc).__name__}: {str(exc)[:300]}"
            break
    payload["done"] = done
    attempts = row["attempts"] + 1
    now = clock()
    if error is None:
        outbox.settle(store, row["id"], "sent", owner, sent_at=now, attempts=attempts, payload=json.dumps(payload),
                      last_error=None)
        log.info("results exported to PACS", study=study, outbox=row["id"], via=",".join(done), files=len(paths))
        return "sent"
    if attempts > pacs.retries:
        outbox.settle(store, row["id"], "give_up", owner, attempts=attempts, last_error=error,
                      payload=json.dumps(payload))
        log.error("result export given up; fix the PACS settings or the PACS, then `edgescreen outbox retry "
                  f"{row['id']}`", study=study, outbox=row["id"], attempts=attempts, error=error)
        return "gave_up"
    wait = delay(RetryPolicy(retries=pacs.retries, base_s=pacs.retry_base_s, max_s=pacs.retry_max_s), attempts)
    outbox.settle(store, row["id"], "defer", owner, attempts=attempts, next_attempt_at=now + wait, last_error=error,
                  payload=json.dumps(payload))
    log.warning("result export failed; will retry", study=study, outbox=row["id"], attempts=attempts,
                retry_in_s=round(wait, 1), error=error)
    return "failed"


# -- C-STORE SCU -----------------------------------------------------------------------------------
def send_c_store(paths: Sequence[Path], pacs: Pacs, calling_ae: str) -> None:
    """Send files in one association; ExportError naming the first refused file or the association failure."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    try:
        datasets = [pydicom.dcmread(p) for p in paths]
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise ExportError(f"a result file is not DICOM ({exc}); re-run the analysis of this study") from None
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
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        refused = sorted({str(ds.SOPClassUID) for ds in datasets} - accepted)
        if refused:
            names = ", ".join(f"{_sop_name(uid)} ({uid})" for uid in refused)
            raise ExportError(f"{pacs.ae_title}@{pacs.host}:{pacs.port} accepts no {names}: configure the PACS "
                              "to store that SOP class from this AE title, or export via dicomweb")
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


def _sop_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name


# -- STOW-RS -----------------------------------------------------------------------------------------
def _read_secret(path: str, what: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise ExportError(f"{what} {path}: cannot read ({exc.strerror})") from None
    if not value:
        raise ExportError(f"{what} {path} is empty")
    return value


def stow_client(pacs: Pacs):  # noqa: ANN201 - dicomweb_client.DICOMwebClient, imported lazily
    """A DICOMweb client for the PACS: our retries (the outbox), our timeout, verified TLS, the site's auth."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    if not pacs.dicomweb_url:
        raise ValueError("[dicom.pacs] has no dicomweb_url: STOW-RS needs the PACS's DICOMweb address")
    session = requests.Session()
    session.trust_env = False  # an environment proxy must not reroute patient data
    session.verify = pacs.dicomweb_ca_file or True
    if pacs.dicomweb_username and pacs.dicomweb_password_file:
        session.auth = (pacs.dicomweb_username, _read_secret(pacs.dicomweb_password_file, "dicomweb_password_file"))
    if pacs.dicomweb_token_file:
        session.headers["Authorization"] = "Bearer " + _read_secret(pacs.dicomweb_token_file, "dicomweb_token_file")
    client = DICOMwebClient(url=pacs.dicomweb_url, session=session, timeout=pacs.timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def send_stow(paths: Sequence[Path], pacs: Pacs) -> None:
    """STOW-RS the files to {dicomweb_url}/studies in one request; ExportError on any refusal."""
    import pydicom
    import requests
    from pydicom.errors import InvalidDicomError

    url = pacs.dicomweb_url.rstrip("/") + "/studies" if pacs.dicomweb_url else "?"
    try:
        datasets = [pydicom.dcmread(p) for p in paths]
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise ExportError(f"STOW-RS to {url}: a result file is not DICOM ({exc})") from None
    try:
        answer = stow_client(pacs).store_instances(datasets)
    except requests.HTTPError as exc:
        resp = exc.response
        body = resp.content if resp is not None else b""
        failed = _failed_sops(body)
        detail = (f"{len(failed)} instance(s) refused, e.g. {failed[0]}" if failed
                  else body[:200].decode(errors="replace"))
        raise ExportError(f"STOW-RS to {url}: HTTP {resp.status_code if resp is not None else '?'}: {detail}") from None
    except requests.exceptions.SSLError as exc:
        raise ExportError(f"STOW-RS to {url}: TLS verification failed ({exc}); check dicomweb_ca_file") from None
    except requests.RequestException as exc:
        raise ExportError(f"STOW-RS to {url}: {type(exc).__name__}: {str(exc)[:200]}") from None
    except ValueError as exc:  # an answer of an unexpected media type
        raise ExportError(f"STOW-RS to {url}: unreadable answer ({exc})") from None
    failed = [str(item.get("ReferencedSOPInstanceUID", "?")) for item in answer.get("FailedSOPSequence", [])]
    if failed:
        raise ExportError(f"STOW-RS to {url}: {len(failed)} instance(s) refused, e.g. {failed[0]}")


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
