"""The studies page in a real browser against a real server on loopback."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from appliance import RESEARCH_USE_BANNER
from appliance.store import Store
from appliance.store.instances import IncomingInstance, store_instance
from tests.browser import chromium_page, web_server


def _seed_store(data_dir: Path) -> None:
    store = Store(data_dir)
    for n in range(3):
        inst = IncomingInstance(
            f"1.2.826.0.1.3680043.10.1.1.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.10.1",
            "1.2.826.0.1.3680043.10.1.1", instance_number=n,
            study={"patient_id": "PHANTOM-CT-0101", "patient_name": "PHANTOM^CT^S0101",
                   "description": "CT ABDOMEN WO CONTRAST"},
            series={"modality": "CT", "description": "Axial 3.0mm", "number": 2},
        )
        store_instance(store, inst, b"not a real image, the page only lists")
    store.close()


def test_api_and_page_list_received_studies(data_dir: Path) -> None:
    _seed_store(data_dir)
    with web_server(data_dir) as url:
        with urllib.request.urlopen(f"{url}/api/studies", timeout=10) as resp:
            body = json.load(resp)
        assert body["disclaimer"] == RESEARCH_USE_BANNER
        assert body["studies"][0]["series"][0]["instances"] == 3
        with chromium_page() as page:
            page.goto(url + "/")
            assert page.locator(".banner").inner_text() == RESEARCH_USE_BANNER
            row = page.locator("table.studies tbody tr").first
            assert "PHANTOM^CT^S0101" in row.inner_text()
            assert "Axial 3.0mm" in row.inner_text()
            assert row.locator("td.num").inner_text() == "3"


def test_empty_store_says_how_to_get_studies(data_dir: Path) -> None:
    with web_server(data_dir) as url, chromium_page() as page:
        page.goto(url + "/")
        assert "No studies received yet" in page.inner_text("main")


def test_page_says_why_a_study_waits(data_dir: Path) -> None:
    from appliance.store import jobs

    _seed_store(data_dir)
    store = Store(data_dir)
    jobs.enqueue(store, "1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.1.1", "pancreas")
    reason = "waiting: scanner busy: MPPS exam in progress since 10:42 (mpps)"
    jobs.set_waiting_reason(store, reason)
    store.add_event("scanner", "scheduler", "busy", reason)
    store.close()
    with web_server(data_dir) as url, chromium_page() as page:
        page.goto(url + "/")
        row = page.locator("table.studies tbody tr").first
        assert row.locator(".state").inner_text() == "queued"
        assert row.locator(".why").inner_text() == reason
        assert "scanner: busy" in page.locator(".status").inner_text()


def test_patient_names_are_escaped_and_pages_are_not_cached(data_dir: Path) -> None:
    store = Store(data_dir)
    evil = '<img src=x onerror="document.title=1">'
    store_instance(store, IncomingInstance("1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.3.4.9",
                                           study={"patient_name": evil}, series={"modality": "CT"}), b"x")
    store.close()
    with web_server(data_dir) as url:
        with urllib.request.urlopen(url + "/", timeout=10) as resp:
            html = resp.read().decode()
            assert resp.headers["Cache-Control"] == "no-store"
            assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        assert evil not in html and "&lt;img" in html
        with chromium_page() as page:
            page.goto(url + "/")
            assert page.title() != "1"
            assert page.locator("table.studies img").count() == 0
