"""What a finished job must deliver, as outbox items written in the same transaction as its result.

The worker (and `analyze --enqueue-sync`) call `outbox_items_for_result`; `appliance.store.jobs.finish`
inserts the items with the result and the `done` state, so a crash can neither lose nor double an export.

PACS: one item with the job's DICOM outputs (SEG, SR, encapsulated PDF) when [dicom.pacs] is set.
Cloud (when [sync] enabled, or asked for): the finding summary, then the SEG, then the SR, in that order
(one group per study, so the receiver never holds a SEG without its summary). The payloads name local
files and hold the original study UID: they never leave the box as they are; the sender de-identifies at
send time. Idempotency keys are HMACs under the site secret, so a key tells the receiver nothing.

A site secret that cannot be read (a damaged file, wrong permissions) never costs a finished job its
result: the job's PACS item and its result are written as always, the cloud items of that study are not
(an error in the log names the study and says how to queue them again once the secret is fixed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

from edgescreen.appliance.config.site import SiteConfig
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.store.outbox import OutboxItem

log = get_logger(__name__)

PACS_KIND = "pacs"
FINDING_KIND = "cloud.finding"
SEG_KIND = "cloud.seg"
SR_KIND = "cloud.sr"
HEALTH_KIND = "cloud.health"
CLOUD_KINDS = (FINDING_KIND, SEG_KIND, SR_KIND, HEALTH_KIND)
# output file name -> cloud kind (the PDF report carries the patient's name in its pages: PACS only)
_CLOUD_FILES = {"seg.dcm": SEG_KIND, "sr.dcm": SR_KIND}


def _stored_path(path: Path, data_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path(data_dir).resolve()))
    except ValueError:
        return str(path.resolve())


def outbox_items_for_result(config: SiteConfig, *, data_dir: Path, study_uid: str, findings: dict[str, Any],
                            out_dir: Path, cloud: bool | None = None) -> list[OutboxItem]:
    """The PACS export of the job's DICOM outputs when a PACS is configured, and its cloud items when
    `cloud` (default: the site's sync.enabled) is on. Pure apart from reading the site secret."""
    items: list[OutboxItem] = []
    outputs = [Path(out_dir) / rel for rel in findings.get("outputs", [])]
    dicom_files = [p for p in outputs if p.suffix == ".dcm"]
    if config.dicom.pacs is not None and dicom_files:
        rel = [_stored_path(p, data_dir) for p in dicom_files]
        key = f"{PACS_KIND}:" + hashlib.sha1("\n".join([study_uid, *sorted(rel)]).encode()).hexdigest()
        items.append(OutboxItem(PACS_KIND, key, {"study_uid": study_uid, "files": rel, "done": []}))
    if cloud if cloud is not None else config.sync.enabled:
        from edgescreen.appliance.sync.deid import DeidError

        try:
            items += cloud_items(config, data_dir=data_dir, study_uid=study_uid, findings=findings, outputs=outputs)
        except (DeidError, OSError) as exc:
            log.error("the study's cloud items were not queued: the de-identification secret cannot be used; fix "
                      "it (see [sync.deid] secret_file), then `edgescreen analyze <study> --out DIR --enqueue-sync`",
                      study=study_uid, error=str(exc))
    return items


def cloud_items(config: SiteConfig, *, data_dir: Path, study_uid: str, findings: dict[str, Any],
                outputs: list[Path]) -> list[OutboxItem]:
    from edgescreen.appliance.sync.deid import DeidPolicy

    secret = DeidPolicy.from_config(config, data_dir).secret

    def mac(*parts: str) -> str:
        return hmac.new(secret, "\0".join(parts).encode(), hashlib.sha256).hexdigest()[:40]

    group = "cloud:" + mac("study", study_uid)
    phi = bool(config.sync.send_phi)
    content = json.dumps(findings, sort_keys=True, default=str)
    items = [OutboxItem(FINDING_KIND, f"{FINDING_KIND}:{mac('finding', study_uid, content)}",
                        {"study_uid": study_uid, "findings": findings, "phi": phi}, group)]
    for path in outputs:
        kind = _CLOUD_FILES.get(path.name)
        if kind is None or not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        items.append(OutboxItem(kind, f"{kind}:{mac(kind, study_uid, digest)}",
                                {"study_uid": study_uid, "file": _stored_path(path, data_dir), "sha256": digest,
                                 "phi": phi}, group))
    return items


def enqueue_result(store: Any, config: SiteConfig, *, findings: dict[str, Any], out_dir: Path,
                   cloud: bool = True) -> list[int]:
    """`analyze --enqueue-sync`: queue a result analysed outside the worker, as the worker would, in one
    transaction. Returns the outbox ids."""
    from edgescreen.appliance.store.outbox import add_items

    items = outbox_items_for_result(config, data_dir=store.data_dir, study_uid=findings["study_uid"],
                                    findings=findings, out_dir=out_dir, cloud=cloud)
    with store.transaction() as conn:
        return add_items(conn, items)
