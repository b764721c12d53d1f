"""`edgescreen dicom` as a real subprocess against real peers: dcmtk storescu/echoscu as the scanner,
pynetdicom for raw (malformed) sends. Every test ends with SIGTERM and checks a clean exit 0."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from tests.test_dicom_support import (
    DCMTK_ENV,
    EDGESCREEN,
    RECEIVE_PATH,
    REPO,
    SERVICE_ENV,
    dicom_server,
    echo,
    open_store,
    requires_dcmtk,
    send_raw,
    storescu,
    write_ct_series,
)

pytestmark = requires_dcmtk

A700, A900, C000, C001 = 0xA700, 0xA900, 0xC000, 0xC001


@pytest.fixture
def receive_path(request: pytest.FixtureRequest):
    """The receive tests run on both paths: the fast path (appliance.dicom.fastpath) and pynetdicom's stock
    acceptor, which the service falls back to for a pynetdicom release the fast path was not checked with."""
    RECEIVE_PATH["value"] = request.param
    yield request.param
    RECEIVE_PATH["value"] = "fast"


both_paths = pytest.mark.parametrize("receive_path", ["fast", "stock"], indirect=True)


def cli_json(data_dir: Path, *args: str) -> object:
    proc = subprocess.run([*EDGESCREEN, "--data-dir", str(data_dir), *args, "--json"], capture_output=True,
                          text=True, env=SERVICE_ENV, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def ct300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom generator's 300-slice 512x512 abdominal CT (about 160 MB, rendered once per run)."""
    from edgescreen.models.phantom.ct import write_ct_study

    out = tmp_path_factory.mktemp("ct300")
    write_ct_study(out, seed=11, slices=300)
    return out


def test_300_slice_phantom_received_whole_then_queued_for_pancreas(ct300: Path, tmp_path: Path) -> None:
    sources = sorted(ct300.glob("CT*.dcm"))
    assert len(sources) == 300
    with dicom_server(tmp_path) as srv:
        storescu(srv.port, ct300)
        store = open_store(srv.data_dir)
        srv.wait_for(lambda: store.query_one("SELECT state FROM series")["state"] == "queued", what="series queued")
        studies = cli_json(srv.data_dir, "studies")
        assert len(studies) == 1 and len(studies[0]["series"]) == 1
        series = studies[0]["series"][0]
        assert (series["instances"], series["state"], series["pipeline"], series["job_state"]) == \
            (300, "queued", "pancreas", "queued")
        job = store.query_one("SELECT * FROM jobs")
        assert job["pipeline"] == "pancreas" and job["series_uid"] == series["series_uid"]
        # stored byte for byte: the data set as sent behind our file meta, readable by pydicom
        rows = store.query("SELECT path, sop_uid, size, calling_ae FROM instances ORDER BY instance_number")
        assert {r["calling_ae"] for r in rows} == {"SCANNER"}
        for src, row in ((sources[0], rows[0]), (sources[-1], rows[-1])):
            a, b = pydicom.dcmread(src), pydicom.dcmread(srv.data_dir / row["path"])
            assert b.SOPInstanceUID == row["sop_uid"] and a.PixelData == b.PixelData
            assert b.file_meta.SourceApplicationEntityTitle == "SCANNER"
            assert (srv.data_dir / row["path"]).stat().st_size == row["size"]
        # the activity the scheduler reads: C-STORE per calling AE
        event = store.query_one("SELECT * FROM events WHERE kind = 'dicom' AND source = 'c-store'")
        assert json.loads(event["detail"])["stored"] == 300
        assert echo(srv.port).returncode == 0


@pytest.mark.parametrize(("syntax", "propose"), [(RLELossless, "-xr"), (JPEG2000Lossless, "-xv"),
                                                (JPEGLSLossless, "-xt")], ids=["rle", "j2k", "jpegls"])
@both_paths
def test_compressed_series_is_stored_as_sent_and_decodes(syntax: str, propose: str, tmp_path: Path, receive_path: str) -> None:
    plain = write_ct_series(tmp_path / "plain", 4, size=128)
    sent = tmp_path / "sent"
    sent.mkdir()
    for p in plain:
        ds = pydicom.dcmread(p)
        ds.compress(syntax)
        ds.save_as(sent / p.name)
    with dicom_server(tmp_path) as srv:
        storescu(srv.port, sent, "SCANNER", propose)  # storescu proposes uncompressed only unless told
        store = open_store(srv.data_dir)
        rows = store.query("SELECT path, transfer_syntax FROM instances ORDER BY instance_number")
        assert len(rows) == 4 and {r["transfer_syntax"] for r in rows} == {syntax}
        for p, row in zip(plain, rows, strict=True):
            stored = pydicom.dcmread(srv.data_dir / row["path"])
            assert stored.file_meta.TransferSyntaxUID == syntax
            assert np.array_equal(stored.pixel_array, pydicom.dcmread(p).pixel_array)


@pytest.mark.skipif(not shutil.which("dcmcjpeg"), reason="dcmtk dcmcjpeg missing")
def test_jpeg_lossless_from_dcmtk_is_accepted(tmp_path: Path) -> None:
    plain = write_ct_series(tmp_path / "plain", 3, size=128)
    sent = tmp_path / "sent"
    sent.mkdir()
    for p in plain:
        subprocess.run(["dcmcjpeg", "+e1", str(p), str(sent / p.name)], check=True, capture_output=True)
    with dicom_server(tmp_path) as srv:
        storescu(srv.port, sent, "SCANNER", "-xs")
        rows = open_store(srv.data_dir).query("SELECT path, transfer_syntax FROM instances")
        assert len(rows) == 3 and {r["transfer_syntax"] for r in rows} == {"1.2.840.10008.1.2.4.70"}
        stored = pydicom.dcmread(srv.data_dir / rows[0]["path"])
        assert stored.pixel_array.shape == (128, 128)


def _malformed(tmp_path: Path, good_series: Path) -> dict[str, tuple[Path, int]]:
    """name -> (file, expected status). Written with pydicom; sent without decoding (send_raw)."""
    out = tmp_path / "bad"
    out.mkdir()
    base = write_ct_series(tmp_path / "base", 2, size=64)
    cases: dict[str, tuple[Path, int]] = {}

    data = base[0].read_bytes()
    (out / "truncated.dcm").write_bytes(data[:len(data) // 2])  # cut inside Pixel Data
    cases["truncated"] = (out / "truncated.dcm", C000)
    (out / "truncated_header.dcm").write_bytes(data[:420])  # cut inside the header
    cases["truncated_header"] = (out / "truncated_header.dcm", C000)

    ds = pydicom.dcmread(base[1])
    ds.SOPClassUID = MRImageStorage  # file meta (and so the C-STORE request) still say CT
    ds.save_as(out / "wrong_class.dcm")
    cases["wrong_class"] = (out / "wrong_class.dcm", A900)

    ds = pydicom.dcmread(base[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.PixelData = b"\0" * 1000  # 64 x 64 x 16 bits needs 8192 bytes
    ds.save_as(out / "pixel_length.dcm")
    cases["pixel_length"] = (out / "pixel_length.dcm", A900)

    ds = pydicom.dcmread(base[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    del ds.PixelData
    ds.save_as(out / "no_pixels.dcm")
    cases["no_pixels"] = (out / "no_pixels.dcm", A900)

    ds = pydicom.dcmread(base[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.Rows = ds.Columns = 60000
    ds.save_as(out / "absurd.dcm")
    cases["absurd"] = (out / "absurd.dcm", A900)

    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")  # preamble, DICM, group 2
    (out / "garbage.dcm").write_bytes(data[:meta_end] + np.random.default_rng(1).bytes(5000))
    cases["garbage"] = (out / "garbage.dcm", C000)

    first_good = pydicom.dcmread(good_series)
    ds = pydicom.dcmread(base[1])  # a 64 x 64 image claiming to belong to the good 128 x 128 series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = first_good.StudyInstanceUID, first_good.SeriesInstanceUID
    ds.save_as(out / "other_size.dcm")
    cases["other_size"] = (out / "other_size.dcm", C001)

    ds = pydicom.dcmread(base[1])  # a Secondary Capture joining the CT series
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = first_good.StudyInstanceUID, first_good.SeriesInstanceUID
    ds.save_as(out / "other_modality.dcm")
    cases["other_modality"] = (out / "other_modality.dcm", C001)
    return cases


@both_paths
def test_malformed_instances_quarantined_while_good_series_arrive_in_parallel(tmp_path: Path, receive_path: str) -> None:
    good_a = write_ct_series(tmp_path / "good_a", 40, size=128)
    good_b = write_ct_series(tmp_path / "good_b", 40, size=128)
    cases = _malformed(tmp_path, good_a[0])
    with dicom_server(tmp_path) as srv:
        send_raw(srv.port, good_a[0])  # the series exists before the conflicting instances arrive
        senders = [subprocess.Popen(["/usr/bin/storescu", "-aet", f"SCANNER{i}", "-aec", "EDGE", "127.0.0.1",
                                     str(srv.port), str(p.parent), "+sd", "+sp", "*.dcm"], env=DCMTK_ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                   for i, p in ((1, good_a[0]), (2, good_b[0]))]
        statuses: dict[str, int | None] = {}

        def bad_sender() -> None:
            for name, (path, _) in cases.items():
                statuses[name] = send_raw(srv.port, path, aet="BADSCU")

        t = threading.Thread(target=bad_sender)
        t.start()
        t.join(timeout=120)
        for proc in senders:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
        assert statuses == {name: status for name, (_, status) in cases.items()}

        store = open_store(srv.data_dir)
        counts = {r["series_uid"]: r["n"] for r in store.query(
            "SELECT series_uid, COUNT(*) AS n FROM instances GROUP BY series_uid")}
        assert sorted(counts.values()) == [40, 40], "a good series lost instances"
        items = cli_json(srv.data_dir, "quarantine")
        assert len(items) == len(cases)
        by_status = sorted(item["status_hex"] for item in items)
        assert by_status == sorted(f"0x{s:04X}" for _, s in cases.values())
        reasons = " | ".join(item["reason"] for item in items)
        for phrase in ("truncated", "differs from the C-STORE request", "Pixel Data length 1000 does not match",
                       "no Pixel Data", "absurd image size", "cannot be parsed", "64 x 64 image joining a CT series",
                       "joining a CT series"):
            assert phrase in reasons, f"no quarantine reason mentions {phrase!r}: {reasons}"
        for item in items:
            assert item["calling_ae"] == "BADSCU" and item["peer"] == "127.0.0.1"
            assert (srv.data_dir / item["path"]).is_file()
        assert echo(srv.port).returncode == 0, "the service must still answer after all of that"


@both_paths
def test_calling_ae_allow_list(tmp_path: Path, receive_path: str) -> None:
    config = ('[dicom]\n[[dicom.allowed]]\nae_title = "SCANNER1"\nhost = "127.0.0.1"\n'
              '[[dicom.allowed]]\nae_title = "CT2"\nhost = "10.9.9.9"\n')
    with dicom_server(tmp_path, config=config, allow_any=False) as srv:
        assert echo(srv.port, aet="SCANNER1").returncode == 0
        for aet in ("INTRUDER", "CT2"):  # unknown, and known but from another address
            proc = echo(srv.port, aet=aet)
            assert proc.returncode != 0
            assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr
        rejected = open_store(srv.data_dir).query("SELECT detail FROM events WHERE kind = 'dicom' AND state = 'rejected'")
        callers = sorted(json.loads(r["detail"])["calling_ae"] for r in rejected)
        assert [c for c in callers if c != "ECHOSCU"] == ["CT2", "INTRUDER"]  # ECHOSCU: the fixture's probe
    assert "association rejected: calling AE not allowed" in srv.log()


@both_paths
def test_duplicate_sop_instance_is_idempotent(tmp_path: Path, receive_path: str) -> None:
    files = write_ct_series(tmp_path / "s", 3)
    with dicom_server(tmp_path) as srv:
        storescu(srv.port, files)
        first = {r["sop_uid"]: (srv.data_dir / r["path"]).read_bytes()
                 for r in open_store(srv.data_dir).query("SELECT * FROM instances")}
        storescu(srv.port, [files[0], files[0], files[1]])  # again, and twice in one association
        assert send_raw(srv.port, files[2]) == 0x0000
        rows = open_store(srv.data_dir).query("SELECT * FROM instances")
        assert len(rows) == 3
        assert {r["sop_uid"]: (srv.data_dir / r["path"]).read_bytes() for r in rows} == first
    assert "duplicate instance" in srv.log()
    assert f"receive_path={receive_path}" in srv.log(), "the service must say which receive path it runs"


@both_paths
def test_disk_below_threshold_answers_a700_and_says_what_to_do(tmp_path: Path, receive_path: str) -> None:
    files = write_ct_series(tmp_path / "s", 2)
    with dicom_server(tmp_path, "--min-free-mb", "100000000") as srv:  # more than any disk has free
        assert send_raw(srv.port, files[0]) == A700
        assert open_store(srv.data_dir).query_one("SELECT COUNT(*) FROM instances")[0] == 0
        assert echo(srv.port).returncode == 0
    log = srv.log()
    assert "data disk full" in log and "To fix: free space" in log


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@both_paths
def test_really_full_disk_answers_a700_and_the_service_survives(tmp_path: Path, receive_path: str) -> None:
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "2m"):
        pytest.skip("cannot mount a tmpfs here (not root?); the threshold test covers 0xA700")
    try:
        files = write_ct_series(tmp_path / "s", 8, size=512)  # 512 KiB each: the 2 MiB tmpfs fills up
        with dicom_server(tmp_path, "--min-free-mb", "0", data_dir=small / "data") as srv:
            statuses = [send_raw(srv.port, f) for f in files]
            assert statuses[0] == 0x0000 and statuses[-1] == A700, statuses
            stored = open_store(srv.data_dir).query("SELECT path, size FROM instances")
            assert 0 < len(stored) < len(files)
            for row in stored:  # what was acknowledged is whole
                assert (srv.data_dir / row["path"]).stat().st_size == row["size"]
            assert echo(srv.port).returncode == 0
        assert "data disk full" in srv.log()
    finally:
        if subprocess.run(["umount", str(small)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(small)], capture_output=True)  # never leave a mount behind


@both_paths
def test_sigterm_during_a_transfer_stops_cleanly_and_keeps_what_was_acknowledged(tmp_path: Path, receive_path: str) -> None:
    files = write_ct_series(tmp_path / "s", 150, size=256)
    data_dir = tmp_path / "data"
    with dicom_server(tmp_path, data_dir=data_dir) as srv:
        sender = subprocess.Popen(["/usr/bin/storescu", "-v", "-aec", "EDGE", "127.0.0.1", str(srv.port),
                                   str(files[0].parent), "+sd", "+sp", "*.dcm"], env=DCMTK_ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        srv.wait_for(lambda: open_store(data_dir).query_one("SELECT COUNT(*) FROM instances")[0] >= 10,
                     what="10 instances")
        rc = srv.stop()
        out, _ = sender.communicate(timeout=60)
    assert rc == 0
    acknowledged = out.count("Received Store Response (Success)")
    store = open_store(data_dir)
    assert store.query_one("SELECT COUNT(*) FROM instances")[0] >= acknowledged
    for row in store.query("SELECT path, size FROM instances"):
        assert (data_dir / row["path"]).stat().st_size == row["size"]


@both_paths
def test_unindexed_files_are_reingested_at_start(tmp_path: Path, receive_path: str) -> None:
    """A power cut after the fsync of a file but before its index row is durable leaves the file alone."""
    files = write_ct_series(tmp_path / "s", 3)
    data_dir = tmp_path / "data"
    with dicom_server(tmp_path, data_dir=data_dir) as srv:
        storescu(srv.port, files[:1])
    stored = data_dir / open_store(data_dir).query_one("SELECT path FROM instances")["path"]
    orphan = stored.parent / "orphan.dcm"
    shutil.copy(files[1], orphan)
    partial = stored.parent / "partial.dcm"
    partial.write_bytes(files[2].read_bytes()[:3000])
    with dicom_server(tmp_path, data_dir=data_dir) as srv:
        store = open_store(data_dir)
        # recovery runs beside the listening service: it has finished when its log line says so
        srv.wait_for(lambda: "start-up recovery done" in srv.log(), what="start-up recovery")
        sops = {r["sop_uid"] for r in store.query("SELECT sop_uid FROM instances")}
        assert pydicom.dcmread(files[1]).SOPInstanceUID in sops and len(sops) == 2
        q = store.query("SELECT reason FROM quarantine")
        assert len(q) == 1 and "found unindexed after a restart" in q[0]["reason"]
        assert not partial.exists()


@both_paths
def test_mammography_phantom_exam_becomes_one_mammo_job(tmp_path: Path, receive_path: str) -> None:
    from edgescreen.models.phantom.mg import write_mg_exam

    write_mg_exam(tmp_path / "mg", seed=5, finding="malignant")
    with dicom_server(tmp_path) as srv:
        storescu(srv.port, tmp_path / "mg", "MG_ROOM_1")
        store = open_store(srv.data_dir)
        srv.wait_for(lambda: store.query("SELECT * FROM jobs"), what="a mammo job")
        (series,) = cli_json(srv.data_dir, "studies")[0]["series"]
        assert (series["modality"], series["instances"], series["state"], series["pipeline"]) == ("MG", 4, "queued",
                                                                                                  "mammo")
        assert [j["pipeline"] for j in store.query("SELECT pipeline FROM jobs")] == ["mammo"]


def test_fast_path_is_pinned_to_exact_pynetdicom_releases() -> None:
    from edgescreen.appliance.dicom import fastpath

    assert fastpath.available("3.0.4")
    for version in ("3.0.5", "3.0.40", "3.1.0", "3.0.4.post1", "2.0.2"):
        assert not fastpath.available(version), version


def test_stock_pynetdicom_path_still_works(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With an unvalidated pynetdicom the service falls back to its stock acceptor: same answers."""
    from edgescreen.appliance.config.site import Dicom, SiteConfig
    from edgescreen.appliance.dicom import fastpath
    from edgescreen.appliance.dicom.scp import DicomService
    from edgescreen.appliance.store import Store
    from tests.test_dicom_support import free_port

    monkeypatch.setattr(fastpath, "available", lambda: False)
    cfg = SiteConfig(dicom=Dicom(ae_title="EDGE", bind="127.0.0.1", port=free_port(), allow_any_ae=True,
                                 min_free_mb=0))
    service = DicomService(Store(tmp_path / "data"), cfg, stable_after_s=3600)
    _, port = service.start()
    try:
        files = write_ct_series(tmp_path / "s", 3)
        assert [send_raw(port, f) for f in files] == [0, 0, 0]
        bad = tmp_path / "bad.dcm"
        data = files[0].read_bytes()
        bad.write_bytes(data[:len(data) - 100])
        assert send_raw(port, bad) == C000
    finally:
        service.stop(grace_s=2)
    assert open_store(tmp_path / "data").query_one("SELECT COUNT(*) FROM instances")[0] == 3
