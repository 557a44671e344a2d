"""Admin tokens stored by `modelyard admin`: the store on both real backends, the command, and
real `modelyard serve` processes that accept them on the admin API, keep a viewer read-only,
refuse a token revoked by the command within 2 s, and never show or log a token. The servers
serve one remote endpoint whose upstream is down, so no model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from modelyard import cli
from modelyard.control import migrations
from modelyard.control.admin_tokens import TOKEN_PREFIX, AdminTokenStore, any_active
from modelyard.control.db import open_database
from modelyard.errors import ConfigError, Conflict, ObjectNotFound
from testkit.pg import fresh_database
from testkit.servers import modelyard_process, status_is, wait_for
from testkit.until import until
from test_admin_api import PROPAGATION


def test_a_token_is_stored_as_its_digest_listed_revoked_and_audited(db):
    store = AdminTokenStore(db)
    record, token = store.create("cli", "ops")
    assert token.startswith(TOKEN_PREFIX) and len(token) > 40 and record["prefix"] == token[:len(TOKEN_PREFIX) + 4]
    raw = json.dumps(db.query("SELECT * FROM admin_tokens") + db.query("SELECT * FROM audit_log"))
    assert token not in raw and token[len(TOKEN_PREFIX) + 4:] not in raw     # only a digest and a prefix
    _, viewer_token = store.create("cli", "auditor", "viewer")
    assert [(t["name"], t["role"]) for t in store.list()] == [("ops", "admin"), ("auditor", "viewer")]
    assert [(t.name, t.role, t.token.startswith("sha256:")) for t in store.active()] == \
        [("ops", "admin", True), ("auditor", "viewer", True)]
    with pytest.raises(Conflict, match="'ops'"):
        store.create("cli", "ops")
    with pytest.raises(ConfigError, match="role"):
        store.create("cli", "x", "root")
    assert store.revoke("cli", "ops")["revoked_at"] is not None
    assert [t.name for t in store.active()] == ["auditor"]
    with pytest.raises(ObjectNotFound, match="'ops'"):
        store.revoke("cli", "ops")
    store.create("cli", "ops")           # the name is free again once revoked
    actions = [e["action"] for e in db.query("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["admin_token.create"] * 2 + ["admin_token.revoke", "admin_token.create"]
    assert viewer_token not in json.dumps(db.query("SELECT * FROM audit_log"))


def test_a_migration_a_database_lacks_is_applied_even_below_its_highest(db):
    # numbers were reserved per branch: a database made on one branch may meet a lower number later
    top = max(v for v, _ in migrations.MIGRATIONS)
    db.execute("DROP TABLE model_endpoints")
    db.execute("DELETE FROM schema_version WHERE version = 5")
    assert db.migrate() == top
    assert db.query("SELECT COUNT(*) AS n FROM model_endpoints")[0]["n"] == 0
    assert 5 in {r["version"] for r in db.query("SELECT version FROM schema_version")}


def test_any_active_creates_nothing_and_follows_the_tokens(tmp_path, request):
    path = tmp_path / "control.db"
    assert any_active(f"sqlite:///{path}") is False and not path.exists()
    db = open_database(f"sqlite:///{path}")
    try:
        assert any_active(f"sqlite:///{path}") is False
        AdminTokenStore(db).create("cli", "ops")
        assert any_active(f"sqlite:///{path}") is True
        AdminTokenStore(db).revoke("cli", "ops")
        assert any_active(f"sqlite:///{path}") is False
    finally:
        db.close()
    url = fresh_database(request.getfixturevalue("pg_server"), "tokens_probe")
    assert any_active(url) is False           # a database nobody migrated
    db = open_database(url)
    try:
        AdminTokenStore(db).create("cli", "ops")
        assert any_active(url) is True
    finally:
        db.close()
    with pytest.raises(ConfigError, match="does not answer"):
        any_active(f"postgresql://nobody@/postgres?host={tmp_path / 'no-server'}")


def test_the_command_prints_the_token_once(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nstore_dir = "{tmp_path}"\n')
    assert cli.main(["admin", "create-token", "--config", str(cfg), "--name", "ops", "--role", "viewer"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith(TOKEN_PREFIX) and "shown only now" in err and token not in err
    assert (tmp_path / "control.db").exists()         # settings.database: the store directory's file
    assert cli.main(["admin", "list-tokens", "--config", str(cfg)]) == 0
    listed = capsys.readouterr().out
    assert "ops" in listed and "viewer" in listed and token[:len(TOKEN_PREFIX) + 4] in listed and token not in listed
    assert cli.main(["admin", "revoke-token", "--config", str(cfg), "ops"]) == 0
    assert cli.main(["admin", "revoke-token", "--config", str(cfg), "ops"]) == 2
    assert "no active admin token named 'ops'" in capsys.readouterr().err
    assert cli.main(["admin", "list-tokens", "--config", str(cfg)]) == 0 and capsys.readouterr().out == ""


def admin_cli(cfg, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "modelyard", "admin", *args, "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_server_accepts_stored_tokens_and_refuses_a_revoked_one_within_two_seconds(tmp_path):
    config = (f'[server]\nstore_dir = "{tmp_path}"\nlog_level = "debug"\n\n[[endpoints]]\nname = "remote"\n'
              'engine = "openai"\nurls = ["http://127.0.0.1:9/v1"]\n')
    cfg = tmp_path / "server.toml"
    cfg.write_text(config)
    # no token anywhere: no control plane, and no database file made for it
    srv = modelyard_process(tmp_path, config, name="plain").start()
    try:
        wait_for("plain up", status_is(srv.base + "/health"), srv)
        assert httpx.get(srv.base + "/api/v1/control/api-keys", headers={"Authorization": "Bearer x"}).status_code == 404
    finally:
        srv.stop()
    assert not (tmp_path / "control.db").exists()

    admin, viewer = admin_cli(cfg, "create-token", "--name", "ops"), \
        admin_cli(cfg, "create-token", "--name", "auditor", "--role", "viewer")
    srv = modelyard_process(tmp_path, config, name="control").start()
    seen = []
    try:
        wait_for("control up", status_is(srv.base + "/health"), srv)

        def call(method: str, path: str, token: str, **kw) -> httpx.Response:
            r = httpx.request(method, srv.base + "/api/v1/control" + path,
                              headers={"Authorization": f"Bearer {token}"}, timeout=30, **kw)
            seen.append(r.text + json.dumps(dict(r.headers)))
            return r
        created = call("POST", "/api-keys", admin, json={"name": "k"})
        assert created.status_code == 201, created.text
        assert call("GET", "/api-keys", viewer).status_code == 200
        r = call("POST", "/api-keys", viewer, json={"name": "nope"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "read_only_token"
        assert call("GET", "/models", viewer).status_code == 200
        audit = call("GET", "/audit-log", viewer, params={"limit": 100}).json()["data"]
        assert ("admin:ops", "api_key.create") in [(e["actor"], e["action"]) for e in audit]
        assert [e["actor"] for e in audit if e["action"] == "admin_token.create"] == ["cli", "cli"]
        # an admin token is no inference key
        assert httpx.post(srv.api + "/completions", headers={"Authorization": f"Bearer {admin}"},
                          json={"model": "remote", "prompt": "x"}).status_code == 401
        admin_cli(cfg, "revoke-token", "ops")
        until(lambda: call("GET", "/api-keys", admin).status_code == 401, PROPAGATION, "the revoked token refused")
        assert call("GET", "/api-keys", viewer).status_code == 200        # the other token stays
    finally:
        srv.stop()
    log = srv.log_text()
    assert "/api/v1/control/api-keys" in log                 # the calls were logged (debug)
    for token in (admin, viewer):
        assert token not in log and all(token not in text for text in seen)
