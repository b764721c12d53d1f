"""The JSON API against its OpenAPI document (docs/openapi.yaml), property-based with schemathesis, on a real
`edgescreen serve` over a store that analysed phantoms; and what a script on the LAN does with a token.

Why: scripts in the clinic (a RIS export, a monitoring probe) are written from the document; a route that
answers something the document does not say, or a 500 on odd input, breaks them silently.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from edgescreen.appliance import accounts
from edgescreen.appliance.store import Store
from tests.browser import web_server
from tests.conftest import REPO
from tests.web_fixtures import analysed_template, study_uids  # noqa: F401 - fixture

schema = schemathesis.openapi.from_path(REPO / "docs" / "openapi.yaml")
# Positive cases only: every call carries a valid token (injected below), so a negative case whose violation is a
# missing Authorization header would be answered 200 and counted as "invalid data accepted". Anonymous refusal is
# proved route by route in tests/test_web_security.py; bad filters in tests/test_web_studies.py.
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE])


@pytest.fixture(scope="module")
def api(analysed_template: Path, tmp_path_factory) -> tuple[str, str, Path]:  # noqa: F811 - pytest fixture
    data = tmp_path_factory.mktemp("api") / "data"
    shutil.copytree(analysed_template, data)
    token = accounts.create_token(Store(data), "ada", "schemathesis", actor="test")
    with web_server(data) as url:
        yield url, token, data


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_matches_its_openapi_document(case, api) -> None:
    url, token, _ = api
    case.call_and_validate(base_url=url + "/api/v1", headers={"Authorization": f"Bearer {token}"})


def _get(url: str, token: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Cache-Control"] == "no-store"
        return json.load(resp)


def test_a_script_reads_the_worklist_and_a_study(api) -> None:
    url, token, data = api
    body = _get(f"{url}/api/v1/studies?per_page=1&sort=patient&dir=asc", token)
    assert body["total"] >= 2 and len(body["studies"]) == 1 and body["pages"] >= 2
    assert body["disclaimer"].startswith("RESEARCH USE ONLY")
    ct = study_uids(data)["CT"]
    detail = _get(f"{url}/api/v1/studies/{ct}", token)
    job = next(j for j in detail["jobs"] if j["pipeline"] == "pancreas")
    assert job["findings"]["triage"] in ("suspicious", "indeterminate")
    assert {d["name"] for d in job["downloads"]} >= {"seg.dcm", "sr.dcm"}
    assert Store(data).query_one("SELECT COUNT(*) FROM audit WHERE action = 'study.view' AND target = ?",
                                 (ct,))[0] >= 1
    bad = urllib.request.Request(f"{url}/api/v1/studies?state=lost", headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(bad, timeout=30)
    assert exc.value.code == 400 and "use one of" in json.load(exc.value)["error"]
