"""Fuzzing the receive path with malformed DICOM (tests/fuzz_support.py) through the two doors it has:

* C-STORE, byte for byte: pynetdicom's `send_c_store(path)` sends each damaged file's data set undecoded
  to the real `edgescreen dicom` service (dcmtk's storescu would refuse to send them);
* the browser upload's ingest (appliance.dicom.ingest.ingest_file), in process.

Every case must end answered: stored whole (success), or quarantined / refused with its reason. Zero
crashes: the service stays up, never answers 0xC002 (our own unexpected error), and afterwards still
receives a good series, stops on SIGTERM within seconds and holds no association slot for a dead one.
The fast path's old self-wait (a C-STORE naming a SOP class its context does not carry made the DUL
thread wait for itself in `kill()`) is sent on purpose, more times than there are association slots.
"""

from __future__ import annotations

import signal
import time
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import given

from edgescreen.appliance.dicom import sop
from tests import fuzz_support as fz
from tests.test_dicom_support import (
    RECEIVE_PATH,
    echo,
    open_store,
    requires_dcmtk,
    send_raw,
    start_dicom,
    storescu,
    write_ct_series,
)

pytestmark = requires_dcmtk

REFUSALS = {sop.DATASET_DOES_NOT_MATCH_SOP_CLASS, sop.CANNOT_UNDERSTAND, sop.CANNOT_UNDERSTAND_SERIES_CONFLICT}


def _wrong_class_store(port: int) -> bool:
    """A C-STORE naming a SOP class other than its presentation context's: pynetdicom aborts the
    association from inside the service (the old fast path then waited for itself forever)."""
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE

    ae = AE(ae_title="EVIL")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
    if not assoc.is_established:
        return False
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = "1.2.3.4.5", "1.2.3.4.6"
    req.DataSet = BytesIO(b"\x08\x00\x18\x00UI\x04\x001.2\x00")
    assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    aborted = assoc.is_aborted
    assoc.abort()
    return aborted


@pytest.mark.parametrize("path", ["fast", "stock"])
def test_cstore_fuzz_then_clean_stop_and_no_leaked_slot(path: str, tmp_path: Path) -> None:
    RECEIVE_PATH["value"] = path
    try:
        srv = start_dicom(tmp_path, config="[dicom]\nmax_associations = 4\nmin_free_mb = 0\n", stable_after=3600)
    finally:
        RECEIVE_PATH["value"] = "fast"
    bases = fz.base_files(tmp_path)
    store = open_store(srv.data_dir)
    counts = {"cases": 0, "crashes": 0, "quarantined": 0, "refused": 0, "accepted": 0, "aborted": 0}
    case_dir = tmp_path / "cases"
    case_dir.mkdir()
    failures: list[str] = []

    @fz.fuzz_settings(40)
    @given(fz.malformed_file(bases))
    def one_case(case: tuple[bytes, list[str]]) -> None:
        blob, kinds = case
        f = case_dir / f"case-{counts['cases']}.dcm"
        f.write_bytes(blob)
        counts["cases"] += 1
        before = store.query_one("SELECT COUNT(*) FROM quarantine")[0]
        try:
            status = send_raw(srv.port, f, aet="FUZZ")
        except Exception as exc:  # refused before any C-STORE (e.g. a context the meta now names)
            counts["aborted"] += 1
            status = None
            if srv.proc.poll() is not None or echo(srv.port).returncode != 0:
                failures.append(f"{kinds}: service down after {exc!r}")
        if srv.proc.poll() is not None:
            counts["crashes"] += 1
            failures.append(f"{kinds}: the service exited {srv.proc.returncode}")
            return
        after = store.query_one("SELECT COUNT(*) FROM quarantine")[0]
        if status == sop.SUCCESS:
            counts["accepted"] += 1
            import pydicom

            meta = pydicom.filereader.read_file_meta_info(f)
            row = store.query_one("SELECT path, size FROM instances WHERE sop_uid = ?",
                                  (meta.MediaStorageSOPInstanceUID,))
            if row is None or (srv.data_dir / row["path"]).stat().st_size != row["size"]:
                failures.append(f"{kinds}: success answered but the instance is not stored whole")
        elif status in REFUSALS:
            counts["quarantined"] += after - before
            if after != before + 1:
                failures.append(f"{kinds}: refused with 0x{status:04X} but not quarantined")
        elif status is not None:
            counts["refused"] += 1
            if status == sop.CANNOT_UNDERSTAND_PROCESSING:
                counts["crashes"] += 1  # our own unexpected error: a bug, whatever the sender sent
                failures.append(f"{kinds}: answered 0xC002 (an unexpected error in the service)")

    try:
        one_case()
        assert not failures, failures[:10]
        for _ in range(6):  # more than max_associations: each would keep a slot if an association hung
            assert _wrong_class_store(srv.port), "the association was not aborted"
        assert echo(srv.port).returncode == 0
        good = write_ct_series(tmp_path / "good", 5, size=64)
        storescu(srv.port, good)  # every slot is free again: a real series still arrives whole
        assert store.query_one("SELECT COUNT(*) FROM instances WHERE series_uid = (SELECT series_uid FROM instances "
                               "ORDER BY received_at DESC LIMIT 1)")[0] == 5
        reasons = [r["reason"] for r in store.query("SELECT reason FROM quarantine")]
        assert all(reasons) and len(reasons) == counts["quarantined"]
    finally:
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            rc = srv.proc.wait(timeout=15)
        except Exception:
            srv.proc.kill()
            srv.proc.wait()
            raise AssertionError(f"ignored SIGTERM ({path} path):\n{srv.log()[-3000:]}") from None
    stop_s = time.monotonic() - started
    assert rc == 0 and stop_s < 15 and "DICOM service stopped" in srv.log()
    assert counts["cases"] == fz.examples(40) and counts["crashes"] == 0
    fz.record(f"c-store-{path}", {**counts, "stop_s": round(stop_s, 2)})


def test_upload_ingest_fuzz(tmp_path: Path) -> None:
    """The upload door: the same damaged files through ingest_file; each is stored whole, quarantined or
    refused with its reason, and nothing raises."""
    from edgescreen.appliance.config.site import Dicom
    from edgescreen.appliance.dicom.header import parse_file
    from edgescreen.appliance.dicom.ingest import Ingestor, ingest_file

    store = open_store(tmp_path / "data")
    cfg = Dicom(min_free_mb=0)
    ingestor = Ingestor(store, cfg)
    bases = fz.base_files(tmp_path)
    counts = {"cases": 0, "crashes": 0, "quarantined": 0, "refused": 0, "accepted": 0}
    f = tmp_path / "upload.dcm"

    @fz.fuzz_settings(150)
    @given(fz.malformed_file(bases))
    def one_case(case: tuple[bytes, list[str]]) -> None:
        blob, kinds = case
        f.write_bytes(blob)
        counts["cases"] += 1
        before = store.query_one("SELECT COUNT(*) FROM quarantine")[0]
        outcome = ingest_file(store, cfg, f, source="upload:fuzz", ingestor=ingestor)
        after = store.query_one("SELECT COUNT(*) FROM quarantine")[0]
        assert outcome.status in ("stored", "duplicate", "quarantined", "refused"), outcome
        if outcome.ok:
            counts["accepted"] += 1
            row = store.query_one("SELECT path FROM instances WHERE sop_uid = ?", (outcome.sop_uid,))
            parse_file(store.data_dir / row["path"])  # what was accepted reads back whole
        elif outcome.status == "quarantined":
            counts["quarantined"] += 1
            assert outcome.reason and after == before + 1, (kinds, outcome)
        else:
            counts["refused"] += 1
            assert outcome.reason, (kinds, outcome)

    one_case()
    assert counts["cases"] == fz.examples(150)
    fz.record("upload", counts)
