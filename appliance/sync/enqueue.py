"""What a finished job must deliver, as outbox items written in the same transaction as its result.

The worker (and `analyze --enqueue-sync`) call `outbox_items_for_result`; `appliance.store.jobs.finish`
inserts the items with the result and the `done` state, so a crash can neither lose nor double an export.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from appliance.config.site import SiteConfig
from appliance.store.outbox import OutboxItem

PACS_KIND = "pacs"


def outbox_items_for_result(config: SiteConfig, *, data_dir: Path, study_uid: str, findings: dict[str, Any],
                            out_dir: Path) -> list[OutboxItem]:
    """The PACS export of the job's DICOM outputs when a PACS is configured (cloud items: see the sync issue)."""
    items: list[OutboxItem] = []
    outputs = [Path(out_dir) / rel for rel in findings.get("outputs", [])]
    dicom_files = [p for p in outputs if p.suffix == ".dcm"]
    if config.dicom.pacs is not None and dicom_files:
        rel = []
        for p in dicom_files:
            try:
                rel.append(str(p.resolve().relative_to(Path(data_dir).resolve())))
            except ValueError:
                rel.append(str(p.resolve()))
        key = f"{PACS_KIND}:" + hashlib.sha1("\n".join([study_uid, *sorted(rel)]).encode()).hexdigest()
        items.append(OutboxItem(PACS_KIND, key, {"study_uid": study_uid, "files": rel, "done": []}))
    return items
