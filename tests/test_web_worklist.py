"""The worklist's derived state, its filters and paging, and its cost: a fixed number of queries per page.

Why: staff decide what to read first from this list. A study shown "done" while a second series still
waits, or a suspicious result hidden behind a not-suspicious one, would mislead them; a query per row
made the old page take 1.8 s at 5,000 studies.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from edgescreen.appliance import accounts
from edgescreen.appliance.config.site import SiteConfig
from edgescreen.appliance.context import AppContext
from edgescreen.appliance.store import Store, jobs
from edgescreen.appliance.store.instances import IncomingInstance, set_series_state, store_instance
from edgescreen.appliance.store.worklist import WorklistQuery, ensure_worklist, query_worklist, study_summary
from edgescreen.appliance.web import create_app


def _instance(store: Store, study: str, series: str, n: int, *, modality: str = "CT", name: str = "DOE^JANE",
              patient_id: str = "P1") -> None:
    store_instance(store, IncomingInstance(f"{series}.{n}", "1.2.840.10008.5.1.4.1.1.2", study, series,
                                           instance_number=n, study={"patient_name": name, "patient_id": patient_id,
                                                                     "description": "CT ABDOMEN"},
                                           series={"modality": modality}), b"x")


def _done(store: Store, study: str, series: str, triage: str, pipeline: str = "pancreas") -> int:
    set_series_state(store, series, "queued", pipeline=pipeline)
    job = jobs.enqueue(store, study, series, pipeline)
    with store.transaction() as conn:  # what the worker's claim + finish leave behind
        conn.execute("UPDATE jobs SET state = 'done' WHERE id = ?", (job,))
        conn.execute("INSERT INTO results (job_id, study_uid, triage, findings, created_at) VALUES (?, ?, ?, '{}', ?)",
                     (job, study, triage, time.time()))
    return job


@pytest.fixture
def store(data_dir: Path) -> Store:
    s = Store(data_dir)
    ensure_worklist(s)
    return s


def test_state_follows_series_jobs_and_results(store: Store) -> None:
    _instance(store, "1.1", "1.1.1", 1)
    assert study_summary(store, "1.1")["state"] == "receiving"
    set_series_state(store, "1.1.1", "queued", pipeline="pancreas")
    job = jobs.enqueue(store, "1.1", "1.1.1", "pancreas")
    jobs.set_waiting_reason(store, "waiting: scanner busy: MPPS exam in progress on CT1 since 10:42 (mpps)")
    row = study_summary(store, "1.1")
    assert (row["state"], row["reason"], row["job_id"]) == (
        "waiting", "waiting: scanner busy: MPPS exam in progress on CT1 since 10:42 (mpps)", job)
    jobs.set_flag(store, job, "urgent", "cleo")
    assert study_summary(store, "1.1")["urgent"] is True
    claimed = jobs.claim_next(store, "w1", 60)
    assert claimed["id"] == job and study_summary(store, "1.1")["state"] == "running"
    jobs.report_progress(store, job, "w1", "stage2", 0.4)
    row = study_summary(store, "1.1")
    assert (row["stage"], row["progress"]) == ("stage2", 0.4)
    assert jobs.finish(store, job, "w1", triage="not_suspicious", findings_json="{}", output_dir="")
    row = study_summary(store, "1.1")
    assert (row["state"], row["triage"], row["reviewed"]) == ("done", "not_suspicious", False)
    # a second series of the same study arrives and waits: the study is not "done" any more
    _instance(store, "1.1", "1.1.2", 1)
    set_series_state(store, "1.1.2", "queued", pipeline="pancreas")
    jobs.enqueue(store, "1.1", "1.1.2", "pancreas")
    assert study_summary(store, "1.1")["state"] == "waiting"


def test_worst_triage_wins_and_review_needs_every_result(store: Store) -> None:
    for k in (1, 2):
        _instance(store, "2.1", f"2.1.{k}", 1)
    _done(store, "2.1", "2.1.1", "not_suspicious")
    _done(store, "2.1", "2.1.2", "suspicious")
    assert study_summary(store, "2.1")["triage"] == "suspicious"
    with store.transaction() as conn:
        conn.execute("UPDATE results SET reviewed_at = 1, reviewed_by = 'x' WHERE job_id = 1")
    assert study_summary(store, "2.1")["reviewed"] is False
    with store.transaction() as conn:
        conn.execute("UPDATE results SET reviewed_at = 1, reviewed_by = 'x'")
    assert study_summary(store, "2.1")["reviewed"] is True


def test_not_analysed_and_quarantined_say_why(store: Store) -> None:
    _instance(store, "3.1", "3.1.1", 1, modality="CR")
    set_series_state(store, "3.1.1", "not_analysed", reason="CR: no pipeline reads this modality")
    row = study_summary(store, "3.1")
    assert (row["state"], row["reason"]) == ("not_analysed", "CR: no pipeline reads this modality")
    _instance(store, "3.2", "3.2.1", 1)
    set_series_state(store, "3.2.1", "quarantined", reason="series mixes two image sizes")
    assert study_summary(store, "3.2")["state"] == "quarantined"


def test_filters_search_sort_and_pages(store: Store) -> None:
    names = ["Wang^XiaoMing=王^小明", "አበበ^ቢቂላ", "Müller^Jürgen", "DOE^JOHN", "O'Brien^Siobhán"]
    for i in range(25):
        study = f"4.{i}"
        _instance(store, study, f"{study}.1", 1, modality="MG" if i % 5 == 0 else "CT", name=names[i % 5],
                  patient_id=f"ID{i:03d}")
        if i % 3 == 0:
            _done(store, study, f"{study}.1", "suspicious" if i % 2 else "not_suspicious")
    page = query_worklist(store, WorklistQuery(per_page=10))
    assert (page.total, len(page.rows), page.pages) == (25, 10, 3)
    received = [r["received_at"] for r in page.rows]
    assert received == sorted(received, reverse=True)
    last = query_worklist(store, WorklistQuery(per_page=10, page=3))
    assert len(last.rows) == 5
    assert not {r["study_uid"] for r in last.rows} & {r["study_uid"] for r in page.rows}
    assert query_worklist(store, WorklistQuery(search="小明")).total == 5
    assert query_worklist(store, WorklistQuery(search="ቢቂላ")).total == 5
    assert query_worklist(store, WorklistQuery(search="ID007")).total == 1
    assert query_worklist(store, WorklistQuery(search="%")).total == 0  # LIKE wildcards are literal
    assert query_worklist(store, WorklistQuery(modality="MG")).total == 5
    susp = query_worklist(store, WorklistQuery(triage="suspicious"))
    assert susp.total == 4 and all(r["triage"] == "suspicious" for r in susp.rows)
    assert query_worklist(store, WorklistQuery(state="done")).total == 9
    assert query_worklist(store, WorklistQuery(reviewed=False)).total == 9
    assert query_worklist(store, WorklistQuery(state="done")).counts["receiving"] == 16
    by_triage = query_worklist(store, WorklistQuery(sort="triage", per_page=4)).rows
    assert [r["triage"] for r in by_triage] == ["suspicious"] * 4
    t0 = time.time() - 3600
    assert query_worklist(store, WorklistQuery(date_from=t0)).total == 25
    assert query_worklist(store, WorklistQuery(date_to=t0)).total == 0


def test_triggers_are_reinstalled_and_the_table_rebuilt(store: Store) -> None:
    _instance(store, "5.1", "5.1.1", 1)
    with store.transaction() as conn:
        conn.execute("DROP TRIGGER worklist_v1_series_upd")  # what a table rebuild in a later migration does
        conn.execute("UPDATE worklist SET state = 'done'")  # and a row left stale meanwhile
    assert ensure_worklist(store) is True
    assert study_summary(store, "5.1")["state"] == "receiving"
    assert ensure_worklist(store) is False


def _page_queries(app, url: str) -> tuple[int, str]:
    """Run a page and count the SQL statements it sent (sqlite3's trace callback on the thread's connection)."""
    ctx = app.config["EDGESCREEN"]
    statements: list[str] = []
    conn = ctx.store.connect()
    conn.set_trace_callback(statements.append)
    try:
        client = app.test_client()
        html = client.get("/login").get_data(as_text=True)
        token = re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)
        client.post("/login", data={"username": "ada", "password": "a long secret 1", "csrf_token": token})
        client.get(url)  # warm: the first request of a process checks the worklist triggers once
        statements.clear()
        body = client.get(url).get_data(as_text=True)
    finally:
        conn.set_trace_callback(None)
    return len([s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]), body


def test_a_page_costs_the_same_queries_for_5_or_50_rows(data_dir: Path) -> None:
    store = Store(data_dir)
    accounts.create_user(store, "ada", "admin", "a long secret 1", actor="t")
    app = create_app(AppContext(config=SiteConfig(), data_dir=data_dir))
    app.config["TESTING"] = True
    for i in range(5):
        _instance(store, f"6.{i}", f"6.{i}.1", 1)
    few, body = _page_queries(app, "/worklist?per_page=50")
    assert body.count('data-study="') == 5
    for i in range(5, 60):
        _instance(store, f"6.{i}", f"6.{i}.1", 1)
        if i % 4 == 0:
            _done(store, f"6.{i}", f"6.{i}.1", "indeterminate")
    many, body = _page_queries(app, "/worklist?per_page=50")
    assert body.count('data-study="') == 50
    assert many == few, (few, many)
    assert many <= 12


def test_masked_names(data_dir: Path) -> None:
    store = Store(data_dir)
    accounts.create_user(store, "ada", "admin", "a long secret 1", actor="t")
    _instance(store, "7.1", "7.1.1", 1, name="Wang^XiaoMing=王^小明", patient_id="CN123456")
    config = SiteConfig.model_validate({"web": {"mask_patient": True}})
    app = create_app(AppContext(config=config, data_dir=data_dir))
    _, body = _page_queries(app, "/worklist")
    assert "XiaoMing" not in body and "王小明" not in body and "CN123456" not in body
    assert "W. X." in body and "…456" in body
