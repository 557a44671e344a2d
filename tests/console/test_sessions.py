"""Console sessions against hostile input (issue 19, item 11): a read of the control database
forges no session (the file is 0600, and it holds only digests of session ids); logout ends the
session on the server (a copied cookie stops working); sign-in is throttled per client address
(429 with Retry-After) and audited without the token; Rotate now (grace 0) on the keys page."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import sqlite3
import stat
import time
from dataclasses import replace

from fastapi.testclient import TestClient

from consoleapp import ADMIN, BASE, VIEWER, login, make_settings
from modelyard import create_app
from modelyard.control.admin_tokens import AdminTokenStore
from modelyard.control.db import open_database

COOKIE = "modelyard_console"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _stored_admin(tmp_path) -> tuple:
    """Settings whose control database also holds a stored admin token `stored-ops`; its secret."""
    settings = replace(make_settings(tmp_path), stored_admin_tokens=True)
    db = open_database(settings.database)
    try:
        _, secret = AdminTokenStore(db).create("cli", "stored-ops")
    finally:
        db.close()
    return settings, secret


def _dump(path) -> str:
    """Every table's every row, as an attacker with a copy of the file would read them."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return json.dumps({t: conn.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables})
    finally:
        conn.close()


def _forge_from_database(path, name: str, role: str) -> str | None:
    """What a reader of the database could make of it before sessions became records: a v1
    cookie signed with the console key stored there, for a stored token whose digest is there."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        key = conn.execute("SELECT value FROM console_secret WHERE name = 'session_hmac'").fetchall()
        digest = conn.execute("SELECT digest FROM admin_tokens WHERE name = ?", (name,)).fetchall()
    finally:
        conn.close()
    if not key or not digest:
        return None          # nothing to sign with
    key_bytes = bytes.fromhex(key[0][0])

    def mac(*parts: bytes) -> bytes:
        return hmac.new(key_bytes, b"|".join(parts), hashlib.sha256).digest()
    fingerprint = _b64(mac(b"token", bytes.fromhex(digest[0][0])))[:22]
    payload = _b64(json.dumps({"n": name, "r": role, "f": fingerprint, "s": "x" * 24,
                               "e": int(time.time()) + 3600}, separators=(",", ":")).encode())
    return f"v1.{payload}.{_b64(mac(b'session', payload.encode()))}"


def test_a_read_of_the_database_forges_no_session(tmp_path):
    settings, stored = _stored_admin(tmp_path)
    path = tmp_path / "control.db"
    with TestClient(create_app(settings), base_url=BASE) as client:
        login(client, stored)
        cookie = client.cookies.get(COOKIE)
        forged = _forge_from_database(path, "stored-ops", "admin") or "v1.nothing.to-sign-with"
        attacker = TestClient(client.app, base_url=BASE)
        attacker.cookies.set(COOKIE, forged, path="/console")
        assert attacker.get("/console/keys", follow_redirects=False).status_code == 303
        dump = _dump(path)
        session_id = cookie.split(".", 1)[1]
        assert session_id not in dump and stored not in dump and ADMIN not in dump
        assert hashlib.sha256(session_id.encode()).hexdigest() in dump      # only its digest is kept
        for each in (path, path.with_name("control.db-wal"), path.with_name("control.db-shm")):
            assert each.exists() and stat.S_IMODE(each.stat().st_mode) == 0o600, each


def test_an_existing_database_file_is_narrowed_to_0600(tmp_path):
    path = tmp_path / "control.db"
    open_database(f"sqlite:///{path}").close()
    path.chmod(0o644)
    open_database(f"sqlite:///{path}").close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_logout_ends_the_session_on_the_server(app, client):
    csrf = login(client, ADMIN)
    copy = TestClient(app, base_url=BASE)
    copy.cookies.set(COOKIE, client.cookies.get(COOKIE), path="/console")
    assert copy.get("/console/keys").status_code == 200           # a copied cookie is the session
    assert client.post("/console/logout", json={}, headers={"X-CSRF-Token": csrf}).status_code == 204
    assert copy.get("/console/keys", follow_redirects=False).status_code == 303
    assert copy.post("/console/keys", json={"name": "late"}, headers={"X-CSRF-Token": csrf}).status_code == 401


def test_revoking_a_stored_token_ends_its_sessions_at_once(tmp_path):
    settings, stored = _stored_admin(tmp_path)
    with TestClient(create_app(settings), base_url=BASE) as client:
        login(client, stored)
        db = open_database(settings.database)
        try:
            AdminTokenStore(db).revoke("cli", "stored-ops")
            assert db.query("SELECT COUNT(*) AS n FROM console_sessions")[0]["n"] == 0
        finally:
            db.close()
        # no wait for the poll: the session's record went with the token
        assert client.get("/console/keys", follow_redirects=False).status_code == 303


def _audit(settings) -> list[dict]:
    db = open_database(settings.database)
    try:
        return db.query("SELECT actor, action, object_id, detail FROM audit_log WHERE action LIKE 'console.%' "
                        "ORDER BY id")
    finally:
        db.close()


def test_sign_in_is_throttled_per_address_and_audited(tmp_path):
    settings = replace(make_settings(tmp_path), login_failures_per_minute=3)
    app = create_app(settings)
    with TestClient(app, base_url=BASE, client=("192.0.2.7", 1234)) as guesser:
        for i in range(3):
            assert guesser.post("/console/login", json={"token": f"guess-{i}"}).status_code == 401
        r = guesser.post("/console/login", json={"token": ADMIN})     # even the right one, now
        assert r.status_code == 429, r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert "login_failures_per_minute = 3" in r.text and "192.0.2.7" in r.text
        other = TestClient(app, base_url=BASE, client=("192.0.2.8", 1234))     # another address may
        login(other, VIEWER)
    rows = _audit(settings)
    assert [(r["action"], r["actor"]) for r in rows] == [("console.login_failed", "anonymous")] * 3 + \
        [("console.login", "viewer:audit")]
    assert all(json.loads(r["detail"])["client"] in ("192.0.2.7", "192.0.2.8") for r in rows)
    text = json.dumps(rows)
    assert ADMIN not in text and VIEWER not in text and "guess-" not in text


def test_a_bad_login_limit_is_refused_naming_it():
    import pytest

    from modelyard.errors import ConfigError
    from modelyard.settings import Settings
    for name, value in (("login_failures_per_minute", 0), ("max_streams_per_token", 10_000),
                        ("control_fail_closed_after", 0.5)):
        with pytest.raises(ConfigError) as got:
            Settings(**{name: value})
        assert name in str(got.value) and str(value) in str(got.value)


def test_rotate_now_ends_the_old_secret_at_once(app, client):
    csrf = login(client, ADMIN)
    created = client.post("/console/keys", json={"name": "leaked"}, headers={"X-CSRF-Token": csrf})
    assert created.status_code == 200
    db = open_database(app.state.settings.database)
    try:
        key_id = db.query("SELECT id FROM api_keys WHERE name = 'leaked'")[0]["id"]
    finally:
        db.close()
    found = re.search(r'<code id="new-secret">([^<]+)</code>', created.text)
    assert found and found.group(1).startswith("sk-my-"), created.text[:500]
    old = found.group(1)
    page = client.get("/console/keys").text
    assert f'/console/keys/{key_id}/rotate-now' in page and "Rotate now" in page
    assert client.get("/api/v1/endpoints", headers={"Authorization": f"Bearer {old}"}).status_code == 200
    r = client.post(f"/console/keys/{key_id}/rotate-now", json={}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and "the old secret no longer works" in r.text, r.text[:500]
    assert client.get("/api/v1/endpoints", headers={"Authorization": f"Bearer {old}"}).status_code == 401
    audit = client.get("/api/v1/control/audit-log", params={"limit": 100},
                       headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
    assert {"grace_seconds": 0} in [e["detail"] for e in audit if e["action"] == "api_key.rotate"]
