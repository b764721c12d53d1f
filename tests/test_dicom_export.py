"""Result export to a real PACS: Orthanc with its DICOMweb plugin, by C-STORE and by STOW-RS."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edgescreen.appliance.config.site import Pacs
from edgescreen.appliance.dicom.export import export_pending, queue_export
from edgescreen.appliance.store import Store
from tests.orthanc_server import orthanc, requires_orthanc
from tests.test_dicom_support import EDGESCREEN, REPO, SERVICE_ENV, free_port, write_ct_series

pytestmark = requires_orthanc


def basic_text_sr(path: Path, study: str) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "SR", "TEST-0001", "TEST^DICOM"
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = [concept]
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentSequence = []
    ds.save_as(path, enforce_file_format=True)
    return path


def results(tmp_path: Path, name: str) -> tuple[str, list[Path]]:
    """A study's 'results': one image (stand-in for the SEG) and an SR."""
    image = write_ct_series(tmp_path / name, 1)[0]
    study = pydicom.dcmread(image).StudyInstanceUID
    return study, [image, basic_text_sr(tmp_path / name / "sr.dcm", study)]


def orthanc_studies(server) -> set[str]:
    return {server.get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"] for s in server.get("/studies")}


def test_results_reach_orthanc_by_c_store_and_by_stow(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    study_a, files_a = results(tmp_path, "a")
    study_b, files_b = results(tmp_path, "b")
    with orthanc(tmp_path, plugins=True) as pacs:
        dimse = Pacs(ae_title=pacs.aet, host=pacs.host, port=pacs.dicom_port)
        web = Pacs(ae_title=pacs.aet, host=pacs.host, port=pacs.dicom_port, via="dicomweb",
                   dicomweb_url=f"{pacs.url}/dicom-web")
        first = queue_export(store, files_a, study_a)
        assert queue_export(store, files_a, study_a) == first, "queueing the same results twice is one export"
        assert export_pending(store, dimse) == {"sent": 1, "failed": 0, "gave_up": 0}
        assert orthanc_studies(pacs) == {study_a}
        queue_export(store, files_b, study_b)
        assert export_pending(store, web) == {"sent": 1, "failed": 0, "gave_up": 0}
        assert orthanc_studies(pacs) == {study_a, study_b}
        assert len(pacs.get("/instances")) == 4
        assert export_pending(store, web) == {"sent": 0, "failed": 0, "gave_up": 0}  # nothing left
    rows = store.query("SELECT * FROM outbox WHERE kind = 'pacs' ORDER BY id")
    assert [r["sent_at"] is not None for r in rows] == [True, True]
    assert [json.loads(r["payload"])["done"] for r in rows] == [["dimse"], ["dicomweb"]]


def test_failures_are_recorded_retried_with_backoff_then_sent(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    study, files = results(tmp_path, "a")
    oid = queue_export(store, files, study)
    down = Pacs(ae_title="NOPACS", host="127.0.0.1", port=free_port(), retries=2, retry_base_s=60, timeout_s=5)
    now = time.time()
    assert export_pending(store, down, now=now) == {"sent": 0, "failed": 1, "gave_up": 0}
    row = store.query_one("SELECT * FROM outbox WHERE id = ?", (oid,))
    assert row["attempts"] == 1 and "association to NOPACS@127.0.0.1" in row["last_error"]
    # exponential backoff with equal jitter: attempt n waits between half and all of base * 2**(n-1)
    assert now + 30 <= row["next_attempt_at"] <= now + 60, "the first retry waits retry_base_s, jittered"
    assert export_pending(store, down, now=now + 1) == {"sent": 0, "failed": 0, "gave_up": 0}  # not due yet
    assert export_pending(store, down, now=now + 61)["failed"] == 1
    assert now + 61 + 60 <= store.query_one("SELECT next_attempt_at FROM outbox")[0] <= now + 61 + 120, \
        "then twice as long"
    with orthanc(tmp_path) as pacs:  # the PACS is back (here: the right address) before retries run out
        up = Pacs(ae_title=pacs.aet, host=pacs.host, port=pacs.dicom_port, retries=2)
        assert export_pending(store, up, now=now + 1000)["sent"] == 1
        assert orthanc_studies(pacs) == {study}
    assert store.query_one("SELECT last_error FROM outbox")[0] is None


def test_gives_up_after_the_configured_retries(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    study, files = results(tmp_path, "a")
    queue_export(store, files, study)
    down = Pacs(ae_title="NOPACS", host="127.0.0.1", port=free_port(), retries=1, retry_base_s=1, timeout_s=5)
    assert export_pending(store, down, now=time.time())["failed"] == 1
    assert export_pending(store, down, now=time.time() + 10)["gave_up"] == 1
    assert export_pending(store, down, now=time.time() + 1e6) == {"sent": 0, "failed": 0, "gave_up": 0}


def test_stow_refusal_is_reported(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    bogus = tmp_path / "bogus.dcm"
    bogus.write_bytes(b"not dicom at all" * 100)
    queue_export(store, [bogus], "1.2.3")
    with orthanc(tmp_path, plugins=True) as pacs:
        web = Pacs(ae_title=pacs.aet, host=pacs.host, port=pacs.dicom_port, via="dicomweb",
                   dicomweb_url=f"{pacs.url}/dicom-web")
        assert export_pending(store, web)["failed"] == 1
    assert "STOW-RS to" in store.query_one("SELECT last_error FROM outbox")[0]


def test_cli_export_pending(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = Store(data_dir)
    study, files = results(tmp_path, "a")
    queue_export(store, files, study)
    with orthanc(tmp_path) as pacs:
        cfg = tmp_path / "site.toml"
        cfg.write_text(f'[dicom.pacs]\nae_title = "{pacs.aet}"\nhost = "{pacs.host}"\nport = {pacs.dicom_port}\n')
        proc = subprocess.run([*EDGESCREEN, "--config", str(cfg), "--data-dir", str(data_dir), "dicom",
                               "--export-pending"], capture_output=True, text=True, env=SERVICE_ENV, cwd=REPO,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"sent": 1, "failed": 0, "gave_up": 0}
        assert orthanc_studies(pacs) == {study}


@pytest.mark.parametrize("bad", ['via = "both"'])
def test_dicomweb_without_url_is_a_config_error(tmp_path: Path, bad: str) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[dicom.pacs]\nae_title = "P"\nhost = "127.0.0.1"\nport = 104\n{bad}\n')
    proc = subprocess.run([*EDGESCREEN, "--config", str(cfg), "--data-dir", str(tmp_path / "d"), "dicom",
                           "--export-pending"], capture_output=True, text=True, env=SERVICE_ENV, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "dicomweb_url" in proc.stderr


def test_the_dicom_service_exports_what_is_queued_both_ways(tmp_path: Path) -> None:
    from tests.test_dicom_support import dicom_server

    data_dir = tmp_path / "data"
    study, files = results(tmp_path, "a")
    queue_export(Store(data_dir), files, study)  # e.g. by the worker, while the DICOM service runs
    with orthanc(tmp_path, plugins=True) as pacs:
        config = (f'[dicom.pacs]\nae_title = "{pacs.aet}"\nhost = "{pacs.host}"\nport = {pacs.dicom_port}\n'
                  f'via = "both"\ndicomweb_url = "{pacs.url}/dicom-web"\n')
        with dicom_server(tmp_path, config=config, data_dir=data_dir) as srv:
            srv.wait_for(lambda: Store(data_dir).query_one("SELECT sent_at FROM outbox")[0] is not None,
                         what="the export to be sent")
            assert orthanc_studies(pacs) == {study}
    row = Store(data_dir).query_one("SELECT payload, attempts FROM outbox")
    assert json.loads(row["payload"])["done"] == ["dimse", "dicomweb"] and row["attempts"] == 1
