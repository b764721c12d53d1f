"""Access control of the web UI and API: deny by default, CSRF, roles, tokens, sessions, rate limit.

Why: the UI may listen on the clinic LAN and shows patient names. These tests walk Flask's URL map, so a
route added tomorrow without thought is caught by the same test.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from edgescreen.appliance import accounts
from edgescreen.appliance.config.site import SiteConfig
from edgescreen.appliance.context import AppContext
from edgescreen.appliance.store import Store
from edgescreen.appliance.web import PUBLIC_ENDPOINTS, create_app
from tests.browser import first_run_password, web_server

PASSWORD = "a long secret 1"


@pytest.fixture
def app(data_dir: Path):
    store = Store(data_dir)
    for name, role in (("ada", "admin"), ("tess", "technician"), ("cleo", "clinician")):
        accounts.create_user(store, name, role, PASSWORD, actor="test")
    app = create_app(AppContext(config=SiteConfig(), data_dir=data_dir))
    app.config["TESTING"] = True
    return app


def _csrf(client, path: str = "/login") -> str:
    html = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)


def login(client, name: str, password: str = PASSWORD):
    return client.post("/login", data={"username": name, "password": password, "csrf_token": _csrf(client)})


def _example(rule) -> str:
    values = {arg: ("1" if rule._converters[arg].__class__.__name__ == "IntegerConverter" else "x")
              for arg in rule.arguments}
    return rule.build(values, append_unknown=False)[1]


def _routes(app):
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield rule, method, _example(rule)


def test_every_route_but_login_static_and_healthz_refuses_anonymous(app) -> None:
    client = app.test_client()
    public_seen = set()
    checked = 0
    for rule, method, path in _routes(app):
        if rule.endpoint in PUBLIC_ENDPOINTS:
            public_seen.add(rule.endpoint)
            continue
        # with a valid CSRF token, so the refusal is the login check and not the CSRF check
        headers = {"X-CSRFToken": _csrf(client)} if method != "GET" else {}
        resp = client.open(path, method=method, headers=headers)
        if path.startswith("/api/"):
            assert resp.status_code == 401, (method, path, resp.status_code)
            assert "authentication required" in resp.get_json()["error"]
        else:
            assert resp.status_code == 302 and "/login" in resp.headers["Location"], (method, path, resp.status_code)
        checked += 1
    assert public_seen == PUBLIC_ENDPOINTS
    assert checked > 30
    assert client.get("/healthz").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/login").status_code == 200


def test_state_changing_requests_need_a_csrf_token(app) -> None:
    client = app.test_client()
    assert login(client, "ada").status_code == 302
    for _rule, method, path in _routes(app):
        if method == "GET":
            continue
        resp = client.open(path, method=method)  # no token, with a valid session
        assert resp.status_code == 400, (method, path, resp.status_code)
    # the login form itself is protected against login CSRF
    other = app.test_client()
    assert other.post("/login", data={"username": "ada", "password": PASSWORD}).status_code == 400
    # and with the token, a state change works
    token = _csrf(client, "/system")
    assert client.post("/scheduler/pause", data={"csrf_token": token, "reason": "test"}).status_code == 302
    store = Store(app.config["EDGESCREEN"].data_dir)
    assert store.query_one("SELECT actor, action, detail FROM audit WHERE action = 'scheduler.pause'")[:] == \
        ("ada", "scheduler.pause", "test")


def test_roles(app) -> None:
    clinician = app.test_client()
    login(clinician, "cleo")
    assert clinician.get("/worklist").status_code == 200
    for path in ("/admin", "/audit", "/quarantine", "/upload", "/api/v1/users", "/api/v1/audit", "/api/v1/quarantine"):
        assert clinician.get(path).status_code == 403, path
    token = _csrf(clinician, "/worklist")
    assert clinician.post("/scheduler/pause", data={"csrf_token": token}).status_code == 403
    assert clinician.post("/api/v1/scheduler/pause", headers={"X-CSRFToken": token}).status_code == 403
    tech = app.test_client()
    login(tech, "tess")
    assert tech.get("/quarantine").status_code == 200 and tech.get("/upload").status_code == 200
    assert tech.get("/admin").status_code == 403
    token = _csrf(tech, "/system")
    assert tech.post("/api/v1/scheduler/pause", headers={"X-CSRFToken": token}, json={"reason": "x"}).status_code == 200
    assert tech.post("/quarantine/1/delete", data={"csrf_token": token}).status_code == 403


def test_session_cookie_flags_and_fresh_session_on_login(app) -> None:
    client = app.test_client()
    client.get("/login")
    resp = login(client, "ada")
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    tls = app.test_client()
    resp = tls.get("/login", base_url="https://box.local")
    token = re.search(r'name="csrf-token" content="([^"]+)"', resp.get_data(as_text=True)).group(1)
    resp = tls.post("/login", data={"username": "ada", "password": PASSWORD, "csrf_token": token},
                    base_url="https://box.local", headers={"Referer": "https://box.local/login"})
    assert "Secure" in resp.headers["Set-Cookie"]


def test_idle_timeout_and_background_refresh(app) -> None:
    client = app.test_client()
    login(client, "ada")
    with client.session_transaction() as sess:
        sess["seen"] = time.time() - 29 * 60
    # the worklist's own refresh does not count as activity
    assert client.get("/worklist?partial=1", headers={"X-Background": "1"}).status_code == 200
    with client.session_transaction() as sess:
        assert time.time() - sess["seen"] > 28 * 60
        sess["seen"] = time.time() - 31 * 60
    resp = client.get("/worklist")
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]
    assert "without activity" in client.get("/login").get_data(as_text=True)


def test_password_change_ends_other_sessions_and_disable_ends_all(app) -> None:
    a, b = app.test_client(), app.test_client()
    login(a, "cleo")
    login(b, "cleo")
    token = _csrf(a, "/account")
    resp = a.post("/account/password", data={"csrf_token": token, "current_password": PASSWORD,
                                              "new_password": "another long one", "confirm_password": "another long one"})
    assert resp.status_code == 302
    assert a.get("/worklist").status_code == 200
    assert b.get("/worklist").status_code == 302  # the other session ended
    admin = app.test_client()
    login(admin, "ada")
    admin.post("/admin/users/cleo/disable", data={"csrf_token": _csrf(admin, "/admin")})
    assert a.get("/worklist").status_code == 302


def test_one_time_password_forces_a_change(app) -> None:
    store = Store(app.config["EDGESCREEN"].data_dir)
    one_time = accounts.create_user(store, "newbie", "clinician", actor="ada")
    client = app.test_client()
    resp = login(client, "newbie", one_time)
    assert resp.headers["Location"].startswith("/account")
    assert client.get("/worklist").headers["Location"].startswith("/account")
    assert client.get("/api/v1/studies").status_code == 403


def test_rate_limit_answers_429(app) -> None:
    client = app.test_client()
    for _ in range(accounts.MAX_FAILURES_PER_ACCOUNT):
        assert login(client, "ada", "wrong password").status_code == 401
    resp = login(client, "ada", PASSWORD)
    assert resp.status_code == 429 and "Too many failed logins" in resp.get_data(as_text=True)


def test_login_never_redirects_off_the_box(app) -> None:
    client = app.test_client()
    token = _csrf(client)
    for target in ("https://evil.example/", "//evil.example/x", "javascript:alert(1)"):
        resp = client.post("/login", data={"username": "ada", "password": PASSWORD, "csrf_token": token,
                                           "next": target})
        assert resp.headers["Location"] == "/worklist", target
        client.post("/logout", data={"csrf_token": _csrf(client, "/worklist")})
        token = _csrf(client)


def test_api_tokens_work_without_csrf_and_die_when_revoked(app) -> None:
    store = Store(app.config["EDGESCREEN"].data_dir)
    token = accounts.create_token(store, "tess", "script", actor="ada")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/studies", headers=auth).status_code == 200
    assert client.post("/api/v1/scheduler/pause", headers=auth, json={}).status_code == 200
    assert store.query_one("SELECT actor FROM audit WHERE action = 'scheduler.pause'")[0] == "tess (token)"
    assert client.get("/api/v1/studies", headers={"Authorization": "Bearer est_nope"}).status_code == 401
    # a token never creates a browser session
    assert "Set-Cookie" not in client.get("/api/v1/studies", headers=auth).headers
    accounts.revoke_token(store, accounts.list_tokens(store, "tess")[0]["id"], actor="ada")
    assert client.get("/api/v1/studies", headers=auth).status_code == 401


def test_serve_prints_the_first_admin_password_once(data_dir: Path) -> None:
    import urllib.error
    import urllib.request

    with web_server(data_dir) as url:
        password = first_run_password(data_dir)
        with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
            assert resp.status == 200
        try:
            urllib.request.urlopen(url + "/api/v1/studies", timeout=10)
            raise AssertionError("anonymous API call was answered")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
        opener = urllib.request.build_opener(urllib.request.HTTPRedirectHandler())
        with opener.open(url + "/worklist", timeout=10) as resp:
            assert resp.url.startswith(url + "/login")
    log = (data_dir / "serve.log").read_text()
    assert log.count(password) == 1
    store = Store(data_dir)
    assert accounts.authenticate(store, "admin", password, "127.0.0.1").user.must_change_password
    with web_server(data_dir):
        pass
    assert "one-time password" not in (data_dir / "serve.log").read_text()  # printed once, never again
