"""The console in process: every page for admin and viewer, the viewer refused on every change,
CSRF and auth refusals, the CSP and cookie flags, sessions shared through the database,
autoescaping, the vendored scripts' pinned hashes, usage CSV from the rollups."""

from __future__ import annotations

import csv
import io
import re
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from consoleapp import ADMIN, BASE, VIEWER, login, make_settings
from modelyard import create_app
from modelyard.console import CSP, check_vendored
from modelyard.console import internal, views
from modelyard.console.pages import ROUTERS, endpoints, models, playground
from modelyard.errors import ConfigError
from modelyard.settings import AdminToken, Settings

PAGES = ("endpoints", "live", "playground", "keys", "usage", "models", "batches")
FRAGMENTS = ("endpoints/table", "live/charts", "models/table", "batches/table")


def change_routes(app) -> list[str]:
    """Every state-changing console route (POST), with sample path parameters filled in."""
    paths = []
    for r in [r for router in ROUTERS for r in router.routes]:      # a router per page (console/pages)
        if getattr(r, "path", "").startswith("/console") and "POST" in (getattr(r, "methods", None) or ()):
            if r.path in ("/console/login", "/console/logout"):
                continue
            if r.path == "/console/endpoints/{endpoint_id}/{action}":
                paths += [f"/console/endpoints/ep_x/{a}" for a in ("load", "unload", "delete")]
            elif r.path == "/console/keys/{key_id}/{action}":
                paths += [f"/console/keys/KEY/{a}" for a in ("revoke", "rotate")]
            elif r.path == "/console/batches/{batch_id}/cancel":
                paths.append("/console/batches/batch_x/cancel")
            else:
                paths.append(r.path)
    return paths


def test_change_routes_are_all_known(app):
    # the refusal tests below cover every POST the console has: a new one must be added here
    assert set(change_routes(app)) == {
        "/console/endpoints", "/console/endpoints/ep_x/load", "/console/endpoints/ep_x/unload",
        "/console/endpoints/ep_x/delete", "/console/playground/key", "/console/keys", "/console/keys/KEY/revoke",
        "/console/keys/KEY/rotate", "/console/models/pull", "/console/models/delete",
        "/console/batches/batch_x/cancel"}


@pytest.mark.parametrize("token,role", [(ADMIN, "admin"), (VIEWER, "viewer")])
def test_every_page_renders_for_admin_and_viewer(client, token, role):
    login(client, token)
    for page in PAGES:
        r = client.get(f"/console/{page}")
        assert r.status_code == 200, (page, r.text)
        assert f'href="/console/{page}" aria-current="page"' in r.text
        assert f"({role}" in r.text
        # the viewer's pages have no change controls (hx-post) but the sign-out button
        posts = set(re.findall(r'hx-post="([^"]+)"', r.text))
        if role == "viewer":
            assert posts == {"/console/logout"}, (page, posts)
    for fragment in FRAGMENTS:
        assert client.get(f"/console/{fragment}").status_code == 200, fragment
    assert client.get("/console/usage.csv").status_code == 200


def test_admin_pages_have_their_controls(client):
    login(client, ADMIN)
    assert 'hx-post="/console/keys"' in client.get("/console/keys").text
    assert 'hx-post="/console/playground/key"' in client.get("/console/playground").text
    assert 'hx-post="/console/models/pull"' in client.get("/console/models").text


def test_viewer_is_refused_every_change(app, client):
    csrf = login(client, VIEWER)
    admin_client = TestClient(app, base_url=BASE)
    admin_csrf = login(admin_client, ADMIN)
    made = admin_client.post("/console/keys", json={"name": "victim"}, headers={"X-CSRF-Token": admin_csrf})
    key_id = re.search(r'data-key="([^"]+)"', made.text).group(1)
    for path in change_routes(app):
        path = path.replace("KEY", key_id)
        r = client.post(path, json={"name": "x", "ref": "smollm2-135m", "model": "m"}, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "viewer" in r.text
    keys = app.state.key_store.list(100)["data"]
    assert [k["name"] for k in keys] == ["victim"] and keys[0]["revoked_at"] is None
    # the API itself refuses the viewer too (the console's in-process call runs as the viewer)
    viewer = next(t for t in app.state.settings.admin_tokens if t.role == "viewer")
    answer = client.portal.call(internal.call, app, viewer, "POST", "/api-keys")
    assert answer.status == 403 and "viewer" in answer.message()


def test_csrf_token_is_required_and_checked(app, client):
    csrf = login(client, ADMIN)
    for headers in ({}, {"X-CSRF-Token": "forged"}, {"X-CSRF-Token": csrf[:-2] + "xx"}):
        r = client.post("/console/keys", json={"name": "k"}, headers=headers)
        assert r.status_code == 403 and "CSRF" in r.text, (headers, r.text)
    assert app.state.key_store.list(100)["data"] == []
    r = client.post("/console/keys", json={"name": "k"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and len(app.state.key_store.list(100)["data"]) == 1
    # another session's token is not this session's
    other = TestClient(app, base_url=BASE)
    login(other, ADMIN)
    assert other.post("/console/keys", json={"name": "k2"}, headers={"X-CSRF-Token": csrf}).status_code == 403


def test_signed_out_is_refused(app, client):
    for page in PAGES:
        r = client.get(f"/console/{page}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/console/login", page
    r = client.get("/console/endpoints/table", headers={"HX-Request": "true"})
    assert r.status_code == 401 and r.headers["HX-Redirect"] == "/console/login"
    assert client.get("/console/usage.csv").status_code == 401
    assert client.get("/console/endpoints/stream").status_code == 401
    for path in change_routes(app):
        assert client.post(path, json={}, headers={"X-CSRF-Token": "x"}).status_code == 401, path
    assert client.post("/console/login", json={"token": "wrong"}).status_code == 401
    assert client.post("/console/login", json={"token": ""}).status_code == 401
    # an inference key is not an admin token
    assert client.post("/console/login", json={"token": "sk-my-anything"}).status_code == 401
    client.cookies.set("modelyard_console", "v1.eyJuIjoib3BzIn0.AAAA", path="/console")
    assert client.get("/console/endpoints", follow_redirects=False).status_code == 303


def test_refusals_are_answered_one_way(app, client, monkeypatch):
    """console/guard's refusals: an unknown action is a 404 before the session is read; htmx's 401
    sends it to sign-in; a stale control store is a 503 that signing in again would not cure."""
    for path in ("/console/endpoints/ep_x/bogus", "/console/keys/KEY/bogus"):
        r = client.post(path, json={})
        assert r.status_code == 404 and "bogus" in r.text and 'role="alert"' in r.text, path
    r = client.post("/console/keys", json={"name": "k"}, headers={"HX-Request": "true"})
    assert r.status_code == 401 and r.headers["HX-Redirect"] == "/console/login" and "sign in again" in r.text
    login(client, ADMIN)
    monkeypatch.setattr(app.state.control_sync, "stale", lambda: 120.0)
    r = client.get("/console/keys", headers={"HX-Request": "true"})
    assert r.status_code == 503 and "HX-Redirect" not in r.headers and "console sessions" in r.text


def test_tampered_cookie_is_refused(client):
    login(client, VIEWER)
    cookie = client.cookies.get("modelyard_console")
    assert cookie.startswith("v2.")           # a random session id: nothing in it to edit but the id
    forged = cookie[:-1] + ("A" if cookie[-1] != "A" else "B")
    client.cookies.clear()
    client.cookies.set("modelyard_console", forged, path="/console")
    assert client.get("/console/keys", follow_redirects=False).status_code == 303


def test_logout_clears_the_cookie(client):
    csrf = login(client, ADMIN)
    assert client.post("/console/logout", json={}).status_code == 403          # CSRF applies
    r = client.post("/console/logout", json={}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 204 and r.headers["HX-Redirect"] == "/console/login"
    assert 'modelyard_console=""' in r.headers["set-cookie"] and "Max-Age=0" in r.headers["set-cookie"]
    assert client.get("/console/keys", follow_redirects=False).status_code == 303


def test_security_headers_and_cookie_flags(app, client):
    r = client.post("/console/login", json={"token": ADMIN})
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Path=/console" in cookie and "Secure" not in cookie          # plain http on loopback
    for path in ("/console/login", "/console/endpoints", "/console/static/console.js",
                 "/console/static/vendor/htmx.org-2.0.10/htmx.min.js"):
        h = client.get(path).headers
        assert h["content-security-policy"] == CSP, path
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff", path
    assert "script-src 'self';" in CSP and "unsafe" not in CSP and "frame-ancestors 'none'" in CSP
    page = client.get("/console/endpoints").text
    assert page.count("<script") == page.count('<script src="/console/static/')      # no inline script
    assert not re.search(r"\son[a-z]+=", page)                                          # no inline handlers
    with TestClient(create_app(app.state.settings), base_url="http://console.example") as remote:
        assert "Secure" in remote.post("/console/login", json={"token": ADMIN}).headers["set-cookie"]


def test_session_is_valid_in_another_process_sharing_the_database(tmp_path):
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings), base_url=BASE) as one, \
            TestClient(create_app(settings), base_url=BASE) as two:
        csrf = login(one, ADMIN)
        two.cookies.set("modelyard_console", one.cookies.get("modelyard_console"), path="/console")
        assert two.get("/console/keys").status_code == 200
        assert two.post("/console/keys", json={"name": "from-two"}, headers={"X-CSRF-Token": csrf}).status_code == 200
    # the token removed from the configuration: its sessions end
    fewer = Settings(**{**settings.__dict__, "admin_tokens": (AdminToken("other", "another-token"),)})
    with TestClient(create_app(fewer), base_url=BASE) as three:
        three.cookies.set("modelyard_console", one.cookies.get("modelyard_console"), path="/console")
        assert three.get("/console/keys", follow_redirects=False).status_code == 303


def test_user_text_is_escaped(app, client):
    csrf = login(client, ADMIN)
    r = client.post("/console/keys", json={"name": "<script>alert(1)</script>"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200
    page = client.get("/console/keys").text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_key_created_shown_once_then_revoked_and_rotated(app, client):
    csrf = login(client, ADMIN)
    r = client.post("/console/keys", json={"name": "svc", "rpm": "5", "expires_hours": "2"},
                    headers={"X-CSRF-Token": csrf})
    secret = re.search(r'<code id="new-secret">([^<]+)</code>', r.text).group(1)
    assert secret.startswith("sk-my-") and 'data-copy="new-secret"' in r.text
    assert secret not in client.get("/console/keys").text                    # once only
    key = app.state.key_store.list(10)["data"][0]
    assert key["rpm"] == 5 and key["expires_at"] > time.time() + 3600
    assert app.state.keys.knows(f"Bearer {secret}")
    rotated = client.post(f"/console/keys/{key['id']}/rotate", json={}, headers={"X-CSRF-Token": csrf})
    new = re.search(r'<code id="new-secret">([^<]+)</code>', rotated.text).group(1)
    assert new != secret and "old secret valid until" in rotated.text
    revoked = client.post(f"/console/keys/{key['id']}/revoke", json={}, headers={"X-CSRF-Token": csrf})
    assert 'data-status="revoked"' in revoked.text and "revoked" in revoked.text
    assert app.state.key_store.get(key["id"])["revoked_at"] is not None
    assert not app.state.keys.knows(f"Bearer {new}")
    again = client.post(f"/console/keys/{key['id']}/revoke", json={}, headers={"X-CSRF-Token": csrf})
    assert "Refused (409)" in again.text                                      # the API's own conflict


def test_bad_form_values_name_the_field(client):
    csrf = login(client, ADMIN)
    r = client.post("/console/keys", json={"name": "k", "rpm": "ten"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422 and "rpm must be a whole number from 1 to 1000000000, got &#39;ten&#39;" in r.text
    r = client.post("/console/keys", json={"name": "k", "endpoints": "nope"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422 and "unknown model endpoint &#39;nope&#39;" in r.text    # the API's 422


def test_playground_key_is_short_lived(app, client):
    csrf = login(client, ADMIN)
    r = client.post("/console/playground/key", json={}, headers={"X-CSRF-Token": csrf})
    secret = re.search(r'id="pg-key" type="password" autocomplete="off" value="([^"]+)"', r.text).group(1)
    key = app.state.key_store.list(10)["data"][0]
    assert key["name"] == "console playground (ops)"
    assert time.time() < key["expires_at"] <= time.time() + playground.PLAYGROUND_KEY_SECONDS
    assert app.state.keys.knows(f"Bearer {secret}")
    audit = app.state.key_store.audit(10)["data"]
    assert audit[-1]["actor"] == "admin:ops" and audit[-1]["action"] == "api_key.create"


def test_usage_page_and_csv_come_from_the_rollups(app, client):
    csrf = login(client, ADMIN)
    client.post("/console/keys", json={"name": "=HYPERLINK(1)"}, headers={"X-CSRF-Token": csrf})
    key = app.state.key_store.list(10)["data"][0]
    app.state.usage.record(key["id"], "remote", 7, 5)
    app.state.usage.record(key["id"], "remote", 3, 1)
    assert "No usage in this period" in client.get("/console/usage").text    # not flushed yet
    client.portal.call(app.state.usage.flush)
    page = client.get("/console/usage?granularity=hour&days=1").text
    assert key["id"] in page and ">16<" in page and ">10<" in page
    csv = client.get("/console/usage.csv?granularity=day").text.splitlines()
    assert csv[0] == ",".join(views.CSV_FIELDS)
    assert csv[1].endswith(f",day,{key['id']},'=HYPERLINK(1),remote,2,10,6,16")     # no formula
    keys = client.get("/console/keys").text
    assert re.search(r"data-usage-requests[^>]*>2<", keys)


def test_endpoints_stream_sends_the_table(app, client, monkeypatch):
    login(client, ADMIN)
    monkeypatch.setattr(endpoints, "SSE_MAX_POLLS", 1)
    with client.stream("GET", "/console/endpoints/stream") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    assert text.startswith("event: endpoints\ndata: ") and 'data-endpoint="remote"' in text
    # its replica is down: the count and why (the endpoints API says "ready" with a reason; the
    # registry's own view, before it, "unavailable")
    assert re.search(r"<td data-replicas[^>]*>0/1\s", text) and "connection refused" in text
    # and each replica by its index with its load, or down
    assert re.search(r'<li data-replica="0"[^>]*>#0 down</li>', text)


def test_endpoints_page_drives_the_api(app, client):
    """The console creates a remote endpoint through the run-time endpoints API and lists it."""
    csrf = login(client, ADMIN)
    page = client.get("/console/endpoints").text
    assert 'hx-post="/console/endpoints"' in page
    r = client.post("/console/endpoints", json={"name": "made", "engine": "openai", "urls": "http://127.0.0.1:9/v1",
                                                "upstream_model": "m"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and "Endpoint &#39;made&#39; created" in r.text, r.text
    assert 'data-endpoint="made"' in client.get("/console/endpoints/table").text


def test_models_page_lists_the_store(app, client):
    login(client, ADMIN)
    page = client.get("/console/models").text
    assert "model store API" not in page and "<caption>" in page


def test_vendored_scripts_match_their_pins(tmp_path, monkeypatch):
    sums = check_vendored()
    assert set(sums) == {"htmx.org-2.0.10/htmx.min.js", "htmx-ext-sse-2.2.4/sse.min.js",
                         "htmx-ext-json-enc-2.0.3/json-enc.min.js"}
    import modelyard.console as console
    for name in sums:                                       # each ships with its licence
        assert (console.VENDOR / name).with_name("LICENSE").is_file()
    copy = tmp_path / "vendor"
    shutil.copytree(console.VENDOR, copy)
    (copy / "htmx.org-2.0.10/htmx.min.js").write_text("alert(1)")
    monkeypatch.setattr(console, "VENDOR", copy)
    with pytest.raises(ConfigError, match="htmx.min.js is .* not the pinned sha256"):
        check_vendored()


def test_stored_admin_tokens_sign_in_and_their_removal_ends_the_session(app, client):
    """Admin tokens kept in the control database (app.state.admin_tokens, `modelyard admin
    create-token`) sign in like configured ones, by digest; once gone, their sessions end."""
    stored = app.state.admin_tokens            # the real StoredAdmins on the app's control database
    _, raw = stored.store.create("test", name="robot")
    stored.refresh()
    csrf = login(client, raw)
    r = client.post("/console/keys", json={"name": "by-robot"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200
    assert app.state.key_store.audit(10)["data"][-1]["actor"] == "admin:robot"
    stored.store.revoke("test", "robot")
    stored.refresh()
    assert client.get("/console/keys", follow_redirects=False).status_code == 303


def test_pull_progress_reads_ollamas_ndjson_shape():
    job = {"state": "pulling", "status": "", "completed": 0, "total": None, "error": None}
    models._progress(job, b'{"status": "pulling manifest"}')
    models._progress(job, b'{"status": "downloading model.gguf", "digest": "sha256:ab", '
                          b'"total": 200, "completed": 50}')
    assert job["state"] == "pulling" and (job["completed"], job["total"]) == (50, 200)
    models._progress(job, b'{"status": "success"}')
    assert job["state"] == "done"
    failed = {"state": "pulling", "status": "", "completed": 0, "total": None, "error": None}
    models._progress(failed, b'{"error": "upstream answered 404 for model.gguf"}')
    assert failed["state"] == "failed" and failed["error"] == "upstream answered 404 for model.gguf"
    early = dict(failed, state="pulling", error=None, http_status=422)       # refused before the stream
    models._progress(early, b'{"detail": [{"loc": ["body", "model"], "msg": "not a model reference"}]}')
    assert early["state"] == "failed" and early["error"] == "model: not a model reference"
    garbage = dict(failed, state="pulling", error=None)
    models._progress(garbage, b"<html>")
    assert garbage["state"] == "failed" and garbage["error"] == "<html>"


def test_console_calls_are_not_counted_as_api_traffic(app, client):
    login(client, ADMIN)
    for _ in range(3):
        assert client.get("/console/keys").status_code == 200
    scraped = client.get("/metrics").text
    assert 'route="/api/v1/control/api-keys"' not in scraped and 'route="/api/v1/control/usage"' not in scraped
    # a real admin API call still is
    assert client.get("/api/v1/control/api-keys", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert 'route="/api/v1/control/api-keys"' in client.get("/metrics").text


def test_endpoint_form_values_name_the_field(client):
    csrf = login(client, ADMIN)
    r = client.post("/console/endpoints", json={"name": "e", "model": "smollm2-135m", "threads": "many"},
                    headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422 and "threads must be a whole number from 0 to 1024, got &#39;many&#39;" in r.text
    r = client.post("/console/endpoints", json={"name": "e", "engine": "openai"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422 and "urls is required for a remote endpoint" in r.text


def test_usage_csv_neutralises_every_formula_start():
    """OWASP's CSV-injection starts: = + - @, and tab or carriage return (spreadsheets skip those
    before reading a formula); key names and endpoint names are user text."""
    row = {"start": 0, "granularity": "day", "key_id": "key_1", "requests": 1, "prompt_tokens": 1,
           "completion_tokens": 1, "total_tokens": 2}
    for name in ("=1+1", "+1", "-1", "@SUM(A1)", "\t=1+1", "\r=1+1"):
        cells = list(csv.reader(io.StringIO(views.usage_csv([{**row, "key_name": name, "endpoint": name}]))))[1]
        assert cells[3] == cells[4] == "'" + name, cells
    plain = list(csv.reader(io.StringIO(views.usage_csv([{**row, "key_name": "ops", "endpoint": "e"}]))))[1]
    assert plain[3:5] == ["ops", "e"]
