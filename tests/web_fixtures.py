"""Data for the web tests: a store that really received and analysed phantom studies, built once per run.

The template is made the way a clinic's box makes one: phantom DICOM (a CT with a PDAC, a mammography
exam) is ingested through appliance.dicom.ingest (the C-STORE rules) and analysed by a real
`edgescreen worker --once`. Each test gets its own copy, so one test's review or pause never shows in
another's. Patient names are rewritten to scripts a clinic will see: Chinese with its ideographic group,
and Amharic (Ethiopic) written as UTF-8.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edgescreen.appliance import accounts
from edgescreen.appliance.store import Store
from tests.conftest import EDGESCREEN, REPO, run_cli

CT_NAME = "Wang^XiaoMing=王^小明"
MG_NAME = "አበበ^ቢቂላ"
PASSWORD = "correct horse battery"
USERS = {"ada": "admin", "tess": "technician", "cleo": "clinician"}


def _rename(folder: Path, name: str, patient_id: str) -> None:
    import pydicom

    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = name
        ds.PatientID = patient_id
        ds.save_as(path, enforce_file_format=True)


def ingest_folder(store: Store, folder: Path) -> set[str]:
    from edgescreen.appliance.config.site import Dicom
    from edgescreen.appliance.dicom.ingest import Ingestor, ingest_file, queue_series

    ingestor = Ingestor(store, Dicom(min_free_mb=0))
    series = set()
    for path in sorted(folder.glob("*.dcm")):
        outcome = ingest_file(store, ingestor.cfg, path, source="test", ingestor=ingestor)
        assert outcome.ok, outcome
        series.add(outcome.series_uid)
    queue_series(store, series)
    return series


def phantoms(root: Path) -> tuple[Path, Path]:
    """A small CT (64 slices, PDAC) and a 4-view mammography exam, cached for the run."""
    from edgescreen.models.phantom.ct import write_ct_study
    from edgescreen.models.phantom.mg import write_mg_exam

    ct, mg = root / "ct-pdac", root / "mg-malignant"
    if not (ct / "truth.json").exists():
        write_ct_study(ct, 3, lesion="pdac", slices=64)
        _rename(ct, CT_NAME, "CN-0003")
    if not (mg / "truth.json").exists():
        write_mg_exam(mg, 201, finding="malignant")
        _rename(mg, MG_NAME, "ET-0201")
    return ct, mg


_TEMPLATE: list[Path] = []  # built once per run: each test module that imports the fixture gets its own copy of it


@pytest.fixture(scope="session")
def analysed_template(tmp_path_factory) -> Path:
    if _TEMPLATE:
        return _TEMPLATE[0]
    root = tmp_path_factory.mktemp("web-template")
    ct, mg = phantoms(root / "phantoms")
    data = root / "data"
    store = Store(data)
    for folder in (ct, mg):
        ingest_folder(store, folder)
    for name, role in USERS.items():
        accounts.create_user(store, name, role, PASSWORD, actor="test")
    store.close()
    proc = subprocess.run([*EDGESCREEN, "--data-dir", str(data), "worker", "--once", "--poll", "0.2"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={"PATH": "/usr/bin:/bin",
                                                                           "EDGESCREEN_CONFIG": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = Store(data)
    states = {r["pipeline"]: r["state"] for r in store.query("SELECT pipeline, state FROM jobs")}
    assert states["pancreas"] == "done", (states, proc.stderr[-3000:])  # the mammography test checks its own
    store.close()
    _TEMPLATE.append(data)
    return data


@pytest.fixture
def analysed(analysed_template: Path, tmp_path: Path) -> Path:
    """A private copy of the analysed store for one test."""
    data = tmp_path / "data"
    shutil.copytree(analysed_template, data, ignore=shutil.ignore_patterns("serve.log", "web"))
    return data


def study_uids(data: Path) -> dict[str, str]:
    store = Store(data)
    try:
        return {r["modalities"]: r["study_uid"] for r in store.query("SELECT study_uid, modalities FROM studies")}
    finally:
        store.close()


__all__ = ["CT_NAME", "MG_NAME", "PASSWORD", "USERS", "analysed", "analysed_template", "ingest_folder", "phantoms",
           "run_cli", "study_uids"]
