"""Study pages and the worklist as staff see them: why a study waits, escaping of hostile names, headers that
keep patient data out of caches and frames, the study detail and the overrides through the CLI's functions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgescreen.appliance import RESEARCH_USE_BANNER, accounts
from edgescreen.appliance.config.site import SiteConfig
from edgescreen.appliance.context import AppContext
from edgescreen.appliance.store import Store, jobs
from edgescreen.appliance.store.instances import IncomingInstance, set_series_state, store_instance
from edgescreen.appliance.web import create_app


def _seed(store: Store, name: str = "PHANTOM^CT^S0101") -> None:
    for n in range(3):
        store_instance(store, IncomingInstance(
            f"1.2.826.0.1.3680043.10.1.1.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.10.1",
            "1.2.826.0.1.3680043.10.1.1", instance_number=n,
            study={"patient_id": "PHANTOM-CT-0101", "patient_name": name, "description": "CT ABDOMEN WO CONTRAST"},
            series={"modality": "CT", "description": "Axial 3.0mm", "number": 2}), b"not a real image")


@pytest.fixture
def client(data_dir: Path):
    store = Store(data_dir)
    accounts.create_user(store, "rad", "technician", "a long secret 1", actor="t")
    app = create_app(AppContext(config=SiteConfig(), data_dir=data_dir))
    c = app.test_client()
    html = c.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)
    c.post("/login", data={"username": "rad", "password": "a long secret 1", "csrf_token": token})
    c.store = store
    return c


def _token(client, path: str = "/worklist") -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', client.get(path).get_data(as_text=True)).group(1)


def test_empty_store_says_how_to_get_studies(client) -> None:
    html = client.get("/worklist").get_data(as_text=True)
    assert "No studies received yet" in html and RESEARCH_USE_BANNER in html


def test_worklist_and_study_say_why_a_study_waits(client) -> None:
    _seed(client.store)
    set_series_state(client.store, "1.2.826.0.1.3680043.10.1.1", "queued", pipeline="pancreas")
    job = jobs.enqueue(client.store, "1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.1.1", "pancreas")
    html = client.get("/worklist").get_data(as_text=True)
    assert "No worker has looked at it yet" in html  # nobody has decided yet: say that, not nothing
    reason = "waiting: scanner busy: MPPS exam in progress on CT_ROOM_1 since 10:42 (mpps)"
    jobs.set_waiting_reason(client.store, reason)
    html = client.get("/worklist?state=waiting").get_data(as_text=True)
    shown = reason.removeprefix("waiting: ")  # beside the "waiting" label, the gate's words without a stutter
    assert shown in html and reason not in html and "PHANTOM, CT S0101" in html and "3 images" in html
    page = client.get("/studies/1.2.826.0.1.3680043.10.1").get_data(as_text=True)
    assert f"Why it waits: {shown}" in page
    # the overrides on the page go through jobs.set_flag, audited with the user's name
    resp = client.post(f"/jobs/{job}/urgent", data={"csrf_token": _token(client), "next": "/worklist"})
    assert resp.status_code == 302 and resp.headers["Location"] == "/worklist"
    assert jobs.get(client.store, job)["urgent"] == 1
    assert client.store.query_one("SELECT actor FROM audit WHERE action = 'job.urgent'")[0] == "rad"
    resp = client.post(f"/jobs/{job}/retry", data={"csrf_token": _token(client)})
    assert "only failed jobs can be retried" in client.get("/system").get_data(as_text=True)
    client.post("/scanner/busy", data={"csrf_token": _token(client, "/system")})
    system = client.get("/system").get_data(as_text=True)
    assert "set busy by staff" in system


def test_hostile_names_are_escaped_and_pages_not_cached(client) -> None:
    evil = '<img src=x onerror="document.title=1">'
    _seed(client.store, name=evil)
    resp = client.get("/worklist")
    html = resp.get_data(as_text=True)
    assert evil not in html and "&lt;img" in html
    assert resp.headers["Cache-Control"] == "no-store"
    csp = resp.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "script-src" not in csp and "default-src 'self'" in csp
    assert "<script>" not in html  # no inline script: CSP forbids it, the UI needs none
    assert client.get("/studies/1.2.826.0.1.3680043.10.1").headers["Cache-Control"] == "no-store"


def test_bad_filters_are_explained(client) -> None:
    resp = client.get("/worklist?state=lost")
    assert resp.status_code == 400 and "use one of" in resp.get_data(as_text=True)
    api = client.get("/api/v1/studies?per_page=500")
    assert api.status_code == 400 and "1 to 200" in api.get_json()["error"]
    assert client.get("/studies/does-not-exist").status_code == 404
    assert client.get("/api/v1/studies/does-not-exist").status_code == 404


def test_downloads_only_the_results_own_files(client, tmp_path: Path) -> None:
    import json

    _seed(client.store)
    set_series_state(client.store, "1.2.826.0.1.3680043.10.1.1", "queued", pipeline="pancreas")
    job = jobs.enqueue(client.store, "1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.1.1", "pancreas")
    out = tmp_path / "job"
    out.mkdir()
    (out / "sr.dcm").write_bytes(b"DICM sr")
    (out / "secret.txt").write_text("not named by the findings")
    (out / "findings.json").write_text(json.dumps({"pipeline": "pancreas", "triage": "suspicious", "outputs": ["sr.dcm"],
                                                   "key_images": [], "lesions": [], "threshold": 0.5,
                                                   "abnormal_probability": 0.9, "models": []}))
    with client.store.transaction() as conn:
        conn.execute("UPDATE jobs SET state = 'done' WHERE id = ?", (job,))
        conn.execute("INSERT INTO results (job_id, study_uid, triage, findings, output_dir, created_at) "
                     "VALUES (?, '1.2.826.0.1.3680043.10.1', 'suspicious', '{}', ?, 0)", (job, str(out)))
    base = f"/studies/1.2.826.0.1.3680043.10.1/results/{job}/files"
    resp = client.get(f"{base}/sr.dcm")
    assert resp.status_code == 200 and resp.data == b"DICM sr"
    for name in ("secret.txt", "findings.json", "../job/secret.txt", "%2e%2e/secret.txt"):
        assert client.get(f"{base}/{name}").status_code == 404, name
    assert client.store.query_one("SELECT detail FROM audit WHERE action = 'study.export'")[0] == f"job {job}: sr.dcm"


def test_system_page_reads_the_workers_gate_without_recording_events(client, monkeypatch) -> None:
    """The system page asks the same LiveGate the worker uses (observe(record=False)): it shows the gate's own
    decision, and however often staff look, only the worker writes scanner and power changes to the timeline."""
    from edgescreen.appliance.scheduler import live

    calls = []
    real = live.LiveGate.observe

    def spy(self, **kwargs):
        calls.append(kwargs)
        return real(self, **kwargs)

    monkeypatch.setattr(live.LiveGate, "observe", spy)
    client.post("/scanner/busy", data={"csrf_token": _token(client, "/system")})
    before = client.store.query_one("SELECT COUNT(*) FROM events WHERE kind IN ('scanner', 'power')")[0]
    for _ in range(3):
        client.application.extensions["edgescreen_system"]["gate"]["value"] = None  # past the few-second cache
        html = client.get("/system").get_data(as_text=True)
    assert calls and all(c.get("record") is False for c in calls)
    assert client.store.query_one("SELECT COUNT(*) FROM events WHERE kind IN ('scanner', 'power')")[0] == before
    ctx = client.application.config["EDGESCREEN"]
    expected = live.LiveGate(ctx).observe(record=False).decision.reason
    assert expected.startswith("waiting: scanner busy: set busy by staff") and expected in html


def test_live_gate_records_only_when_asked(data_dir: Path) -> None:
    from edgescreen.appliance.scheduler.live import LiveGate
    from edgescreen.appliance.scheduler.scanner import set_manual

    ctx = AppContext(config=SiteConfig(), data_dir=data_dir)
    set_manual(ctx.store, "busy", "test")
    count = lambda: ctx.store.query_one("SELECT COUNT(*) FROM events WHERE source = 'scheduler'")[0]  # noqa: E731
    LiveGate(ctx).observe(record=False)
    assert count() == 0
    LiveGate(ctx).observe()
    assert count() == 1  # the worker's reading: the change is on the timeline


def test_studies_command_lists_what_the_worklist_shows(client, data_dir: Path) -> None:
    """`edgescreen studies` and the web worklist are one derivation (appliance.store.worklist)."""
    import json

    from edgescreen.appliance.store.worklist import WorklistQuery, query_worklist
    from tests.conftest import run_cli

    _seed(client.store)
    set_series_state(client.store, "1.2.826.0.1.3680043.10.1.1", "queued", pipeline="pancreas")
    jobs.enqueue(client.store, "1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.1.1", "pancreas")
    reason = "waiting: scanner busy: MPPS exam in progress on CT_ROOM_1 since 10:42 (mpps)"
    jobs.set_waiting_reason(client.store, reason)
    (listed,) = json.loads(run_cli("studies", "--json", data_dir=data_dir, check=True).stdout)
    (row,) = query_worklist(client.store, WorklistQuery()).rows
    assert (listed["state"], listed["reason"], listed["study_uid"]) == (row["state"], row["reason"], row["study_uid"])
    assert listed["state"] == "waiting" and listed["reason"] == reason
    (series,) = listed["series"]  # the per-series shape other tests and scripts read
    assert (series["instances"], series["state"], series["pipeline"], series["job_state"]) == (3, "queued", "pancreas",
                                                                                            "queued")
    text = run_cli("studies", data_dir=data_dir, check=True).stdout
    assert f"waiting ({reason})" in text and "3 images" in text


def test_a_users_repeated_views_of_a_result_are_one_audit_row(client, tmp_path: Path) -> None:
    import json

    _seed(client.store)
    set_series_state(client.store, "1.2.826.0.1.3680043.10.1.1", "queued", pipeline="pancreas")
    job = jobs.enqueue(client.store, "1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.1.1", "pancreas")
    out = tmp_path / "job"
    out.mkdir()
    (out / "findings.json").write_text(json.dumps({"pipeline": "pancreas", "triage": "suspicious", "outputs": [],
                                                   "key_images": [], "lesions": [], "threshold": 0.5,
                                                   "abnormal_probability": 0.9, "models": []}))
    with client.store.transaction() as conn:
        conn.execute("UPDATE jobs SET state = 'done' WHERE id = ?", (job,))
        conn.execute("INSERT INTO results (job_id, study_uid, triage, findings, output_dir, created_at) "
                     "VALUES (?, '1.2.826.0.1.3680043.10.1', 'suspicious', '{}', ?, 0)", (job, str(out)))
    views = lambda: client.store.query("SELECT actor FROM audit WHERE action = 'study.view'")  # noqa: E731
    for _ in range(3):
        assert client.get("/studies/1.2.826.0.1.3680043.10.1").status_code == 200
        assert client.get("/api/v1/studies/1.2.826.0.1.3680043.10.1").status_code == 200
    assert [r["actor"] for r in views()] == ["rad"]  # one row per user and study within VIEW_AUDIT_EVERY_S
    accounts.create_user(client.store, "cleo", "clinician", "another secret 1", actor="t")
    other = client.application.test_client()
    html = other.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)
    other.post("/login", data={"username": "cleo", "password": "another secret 1", "csrf_token": token})
    other.get("/studies/1.2.826.0.1.3680043.10.1")
    assert [r["actor"] for r in views()] == ["rad", "cleo"]


def test_organ_outlines_are_the_label_volume_on_an_oblique_grid() -> None:
    """The viewer's per-slice organ labels (an affine walk per row and column) equal a point-by-point mapping
    of every pixel through both grids, on a tilted, anisotropic series."""
    import numpy as np

    from edgescreen.appliance.pipeline.outputs.labels import slice_labels
    from edgescreen.appliance.pipeline.preprocess import Grid

    rng = np.random.default_rng(7)
    a = np.deg2rad(17.0)
    tilt = ((np.cos(a), 0.0, np.sin(a)), (0.0, 1.0, 0.0), (-np.sin(a), 0.0, np.cos(a)))
    source = Grid.make((40, 96, 80), (2.5, 0.71, 0.73), (-30.0, -40.0, 12.0), np.asarray(tilt))
    organs_grid = Grid.make((40, 15, 20), (3.1, 2.9, 3.05), (-50.0, -50.0, 0.0), np.eye(3))
    organs = rng.integers(0, 7, size=organs_grid.shape, dtype=np.uint8)
    labels = {"source_grid": source, "organs_grid": organs_grid, "organs": organs}
    for z in (0, 13, 39):
        jj, ii = np.meshgrid(np.arange(96), np.arange(80), indexing="ij")
        index = np.stack([np.full(jj.shape, z), jj, ii], axis=-1).reshape(-1, 3)
        target = np.rint(organs_grid.to_index(source.to_lps(index))).astype(np.int64)
        inside = np.all((target >= 0) & (target < np.asarray(organs.shape)), axis=1)
        expected = np.zeros(96 * 80, np.uint8)
        expected[inside] = organs[tuple(target[inside].T)]
        got = slice_labels(labels, z)["organs"].reshape(-1)
        assert inside.any() and (~inside).any()
        assert (got != expected).mean() < 1e-3, z  # equal but for float ties at exactly half a voxel


def test_the_worker_runs_below_the_uis_cpu_priority(data_dir: Path) -> None:
    """The UI never waits on inference: the worker lowers its own priority (every thread, inference pools
    included, inherits it); bench/bench_web.py measures what that buys the staff's pages."""
    import os
    import signal
    import subprocess
    import time

    from edgescreen.appliance.scheduler.worker import WORKER_NICE
    from tests.conftest import EDGESCREEN, REPO

    proc = subprocess.Popen([*EDGESCREEN, "--data-dir", str(data_dir), "worker", "--poll", "0.2"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "EDGESCREEN_CONFIG": ""})
    try:
        def niceness() -> list[int]:
            out = []
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                stat = Path(f"/proc/{proc.pid}/task/{tid}/stat").read_text()
                out.append(int(stat.rsplit(")", 1)[1].split()[16]))
            return out

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and min(niceness()) < WORKER_NICE:
            time.sleep(0.1)
        assert proc.poll() is None and min(niceness()) >= WORKER_NICE >= 10, niceness()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_the_organ_legend_shows_the_colours_the_outlines_are_drawn_in() -> None:
    from edgescreen.appliance.web import render

    css = (Path(render.__file__).parent / "static" / "style.css").read_text()
    swatch = dict(re.findall(r"\.sw-org-([a-z]+) \{ background: #([0-9a-f]{6}); \}", css))
    expected = {"kidneys": render.ORGAN_COLOURS["right_kidney"], "other": render.OTHER_ORGAN,
                **{k: v for k, v in render.ORGAN_COLOURS.items() if not k.endswith("_kidney") and k != "pancreas"}}
    assert swatch == {k: "{:02x}{:02x}{:02x}".format(*rgba[:3]) for k, rgba in expected.items()}
    assert render.organ_legend(("background", "liver", "right_kidney", "left_kidney", "aorta", "pancreas", "gut")) == \
        ["liver", "kidneys", "aorta", "other"]
    red = {c[:3] for c in (render.LESION_FILL, render.LESION_EDGE)}
    assert not any(c[0] > 200 and c[1] < 100 and c[2] < 100 for c in render.ORGAN_COLOURS.values()), red  # red = lesion
