"""Results reach a real PACS (Orthanc): a study sent by storescu to `edgescreen dicom` is analysed by the worker
and its SEG, SR and PDF arrive in Orthanc with no manual step; STOW-RS goes through dicomweb-client with
HTTP authentication and over TLS verified against a pinned CA; a PACS that refuses a SOP class gets a clear,
retried error on the row, never a row left leased.

One Orthanc serves the module (each test checks its own study); the one with authentication on is its own."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from edgescreen.appliance.config.site import Pacs
from edgescreen.appliance.dicom.export import export_pending, queue_export
from edgescreen.appliance.store import Store
from tests.conftest import EDGESCREEN, REPO
from tests.fault_proxy import FaultProxy
from tests.orthanc_server import ORTHANC, OrthancServer, _config, _free_port, _stop, orthanc, requires_orthanc
from tests.test_dicom_export import orthanc_studies, results
from tests.test_dicom_support import SERVICE_ENV, dicom_server, requires_dcmtk, storescu
from tests.test_pancreas_pipeline import write_study, write_test_models

pytestmark = requires_orthanc


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with orthanc(tmp_path_factory.mktemp("pacs"), plugins=True) as server:
        yield server


def _modalities(pacs: OrthancServer, study_uid: str) -> list[str]:
    out = []
    for sid in pacs.get("/studies"):
        if pacs.get(f"/studies/{sid}")["MainDicomTags"]["StudyInstanceUID"] != study_uid:
            continue
        for series in pacs.get(f"/studies/{sid}/series"):
            out += [series["MainDicomTags"].get("Modality")] * len(series["Instances"])
    return sorted(out)


@contextlib.contextmanager
def orthanc_with(tmp_path: Path, extra: dict, *, context: ssl.SSLContext | None = None) -> Iterator[tuple[str, int]]:
    """Orthanc with settings tests/orthanc_server.py cannot wait for (TLS, authentication): up once /system
    answers at all (401 included). Yields (base URL, DICOM port)."""
    directory = tmp_path / "orthanc-custom"
    directory.mkdir()
    http_port, dicom_port = _free_port(), _free_port()
    cfg = _config(directory, http_port, dicom_port, "ORTHANC", True, None, extra)
    (directory / "orthanc.json").write_text(json.dumps(cfg))
    with (directory / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen([ORTHANC, str(directory / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=directory)
    url = f"{'https' if context else 'http'}://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/system", timeout=1, context=context):
                    break
            except urllib.error.HTTPError:
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("Orthanc did not come up:\n" + (directory / "orthanc.log").read_text())
                time.sleep(0.2)
        yield url, dicom_port
    finally:
        _stop(proc)


@requires_dcmtk
def test_a_received_study_is_analysed_and_its_results_reach_the_pacs(tmp_path: Path, pacs: OrthancServer) -> None:
    models = write_test_models(tmp_path / "models")
    files = write_study(tmp_path / "ct")
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    data_dir = tmp_path / "data"
    config = (f'[scheduler]\nidle_grace_s = 0\nstore_quiet_s = 0\nlease_s = 5\n\n[hardware]\nmodels_dir = '
              f'"{models}"\n\n[dicom.pacs]\nae_title = "{pacs.aet}"\nhost = "{pacs.host}"\nport = {pacs.dicom_port}'
              f'\nvia = "both"\ndicomweb_url = "{pacs.url}/dicom-web"\nretry_base_s = 1\n')
    cfg = tmp_path / "site.toml"
    cfg.write_text(config)
    with dicom_server(tmp_path, config=config, data_dir=data_dir, stable_after=1.0) as server:
        storescu(server.port, files)
        worker = subprocess.Popen([*EDGESCREEN, "--config", str(cfg), "--data-dir", str(data_dir), "worker",
                                   "--poll", "0.2"], cwd=REPO, env=SERVICE_ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            found: list[str] = []
            while time.monotonic() < deadline:
                found = _modalities(pacs, study)
                if sorted(found) == ["DOC", "SEG", "SR"]:  # each once, though sent both ways
                    break
                time.sleep(1)
        finally:
            worker.terminate()
            assert worker.wait(timeout=60) == 0, "the worker stops cleanly on SIGTERM"
    assert found == ["DOC", "SEG", "SR"], found  # DOC: the encapsulated PDF report
    store = Store(data_dir)
    row = store.query_one("SELECT state, payload FROM outbox WHERE kind = 'pacs'")
    assert row["state"] == "sent" and json.loads(row["payload"])["done"] == ["dimse", "dicomweb"]
    job = store.query_one("SELECT state FROM jobs")
    assert job["state"] == "done"
    # what arrived is what the pipeline wrote, with its banner
    seg_id = next(i for s in pacs.get("/series?expand") for i in s["Instances"]
                  if s["MainDicomTags"].get("Modality") == "SEG"
                  and pacs.get(f"/instances/{i}/simplified-tags")["StudyInstanceUID"] == study)
    tags = pacs.get(f"/instances/{seg_id}/simplified-tags")
    assert tags["SeriesDescription"].startswith("RESEARCH USE ONLY") and tags["StudyInstanceUID"] == study


def test_stow_rs_with_http_basic_authentication(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    study, files = results(tmp_path, "a")
    queue_export(store, files, study)
    (tmp_path / "pw").write_text("s3cret-pw\n")
    with orthanc_with(tmp_path, {"AuthenticationEnabled": True, "RegisteredUsers": {"edge": "s3cret-pw"}}) as (
            url, dicom_port):
        anonymous = Pacs(ae_title="ORTHANC", host="127.0.0.1", port=dicom_port, via="dicomweb",
                         dicomweb_url=f"{url}/dicom-web", retry_base_s=0.01)
        assert export_pending(store, anonymous)["failed"] == 1
        assert "HTTP 401" in store.query_one("SELECT last_error FROM outbox")[0]
        user = anonymous.model_copy(update={"dicomweb_username": "edge",
                                            "dicomweb_password_file": str(tmp_path / "pw")})
        assert export_pending(store, user, now=time.time() + 10)["sent"] == 1
        request = urllib.request.Request(url + "/studies", headers={
            "Authorization": "Basic " + base64.b64encode(b"edge:s3cret-pw").decode()})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert len(json.loads(resp.read())) == 1


def _tls_material(directory: Path) -> tuple[Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed; returns (CA pem, server cert+key pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgescreen test PACS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # civetweb wants RSA
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem = directory / "ca.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_pem = directory / "server.pem"
    server_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                             serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))
    return ca_pem, server_pem


def test_stow_rs_over_tls_trusts_only_the_pinned_ca(tmp_path: Path, pacs: OrthancServer) -> None:
    """Orthanc behind a TLS front (Debian's Orthanc crashes serving HTTPS itself on this machine)."""
    store = Store(tmp_path / "data")
    study, files = results(tmp_path, "a")
    queue_export(store, files, study)
    ca_pem, server_pem = _tls_material(tmp_path)
    with FaultProxy([pacs.http_port], tls_cert=str(server_pem)) as front:
        unpinned = Pacs(ae_title=pacs.aet, host=pacs.host, port=pacs.dicom_port, via="dicomweb",
                        dicomweb_url=f"{front.url}/dicom-web", retry_base_s=0.01)
        assert front.url.startswith("https://")
        assert export_pending(store, unpinned)["failed"] == 1
        error = store.query_one("SELECT last_error FROM outbox")[0]
        assert "TLS verification failed" in error or "CERTIFICATE_VERIFY_FAILED" in error, error
        assert front.counts["tls_refused"] >= 1 and study not in orthanc_studies(pacs)
        pinned = unpinned.model_copy(update={"dicomweb_ca_file": str(ca_pem)})
        assert export_pending(store, pinned, now=time.time() + 10)["sent"] == 1
        assert study in orthanc_studies(pacs)


def test_a_pacs_that_refuses_a_sop_class_gets_a_clear_retried_error(tmp_path: Path) -> None:
    """A PACS (a pynetdicom SCP on loopback) that stores CT images only: the SEG and SR are not accepted. The row
    records why and what to do, counts the attempt and backs off; it is never left leased, and after its
    retries a technician sees it failed."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    store = Store(tmp_path / "data")
    study, files = results(tmp_path, "a")  # an image and an SR
    queue_export(store, files, study)
    scp = AE(ae_title="CTONLY")
    scp.add_supported_context(CTImageStorage)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        port = server.server_address[1]
        pacs = Pacs(ae_title="CTONLY", host="127.0.0.1", port=port, retries=2, retry_base_s=0.01)
        assert export_pending(store, pacs) == {"sent": 0, "failed": 1, "gave_up": 0}
        row = store.query_one("SELECT state, attempts, lease_owner, last_error FROM outbox")
        assert (row["state"], row["attempts"], row["lease_owner"]) == ("pending", 1, None)
        assert "accepts no Basic Text SR Storage" in row["last_error"] and "configure the PACS" in row["last_error"]
        assert export_pending(store, pacs, now=time.time() + 10)["failed"] == 1
        assert export_pending(store, pacs, now=time.time() + 20)["gave_up"] == 1
        assert store.query_one("SELECT state FROM outbox")[0] == "failed"
    finally:
        server.shutdown()


def test_plain_http_to_a_remote_pacs_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="use https"):
        Pacs(ae_title="P", host="10.0.0.5", port=104, via="dicomweb", dicomweb_url="http://pacs.example/dicom-web")
