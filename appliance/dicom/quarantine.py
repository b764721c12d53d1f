"""Keeping what we refuse: the bytes as received, why, from whom, and what we answered.

Bad input must never crash the service nor vanish: a technician looking at `edgescreen quarantine`
sees each refused instance with its reason, the calling AE and peer, and the DICOM status the
sender got; the file lies under data_dir/quarantine for a closer look (dciodvfy, dcmdump).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from edgescreen.appliance.dicom.header import Header, file_preamble_and_meta
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.store import Store
from edgescreen.appliance.store.instances import list_quarantine, quarantine_record

log = get_logger(__name__)

__all__ = ["Refused", "list_quarantine", "quarantine_instance"]


@dataclass(frozen=True)
class Refused:
    """Who sent a refused instance and what the request said (the data set may be unreadable)."""

    calling_ae: str | None
    peer: str | None
    request_sop_class: str | None
    request_sop_uid: str | None
    transfer_syntax: str


def quarantine_instance(store: Store, raw: bytes | memoryview, who: Refused, status: int, reason: str,
                        header: Header | None = None) -> int | None:
    """Save the instance and its quarantine row; return the row id, or None if even that failed.

    The file gets a file meta header built from the request (the data set itself may be garbage), so
    DICOM tools can open whatever part of it is readable.
    """
    sop_class = (header.sop_class_uid if header else None) or who.request_sop_class
    sop_uid = (header.sop_uid if header else None) or who.request_sop_uid
    meta = file_preamble_and_meta(who.request_sop_class or sop_class or "1.2.3.4",
                                  who.request_sop_uid or sop_uid or "1.2.3.4", who.transfer_syntax,
                                  who.calling_ae or "")
    fields = {"calling_ae": who.calling_ae, "peer": who.peer, "sop": sop_uid,
              "study": header.study_uid if header else None, "series": header.series_uid if header else None}
    try:
        qid, _ = quarantine_record(store, [meta, raw], reason, status=status, calling_ae=who.calling_ae,
                                   peer=who.peer, sop_uid=sop_uid, sop_class_uid=sop_class,
                                   study_uid=header.study_uid if header else None,
                                   series_uid=header.series_uid if header else None)
    except OSError as exc:
        hint = " (disk full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        log.error(f"could not keep a refused instance in the quarantine{hint}", reason=reason, error=str(exc),
                  **fields)
        return None
    log.warning("instance quarantined", reason=reason, status=f"0x{status:04X}", quarantine=qid, **fields)
    return qid
