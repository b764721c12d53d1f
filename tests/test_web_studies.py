"""Study pages and the worklist as staff see them: why a study waits, escaping of hostile names, headers that
keep patient data out of caches and frames, the study detail and the overrides through the CLI's functions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance import RESEARCH_USE_BANNER, accounts
from appliance.config.site import SiteConfig
from appliance.context import AppContext
from appliance.store import Store, jobs
from appliance.store.instances import IncomingInstance, set_series_state, store_instance
from appliance.web import create_app


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
    assert reason in html and "PHANTOM, CT S0101" in html and "3 images" in html
    page = client.get("/studies/1.2.826.0.1.3680043.10.1").get_data(as_text=True)
    assert f"Why it waits: {reason}" in page
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
