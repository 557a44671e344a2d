"""The key store's contract, run against a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import json

import pytest

from modelyard.control.db import open_database
from modelyard.control.keys import SECRET_PREFIX, KeyStore, digest
from modelyard.errors import Conflict, ObjectNotFound, PreconditionFailed


def test_migrations_are_versioned_and_idempotent(db):
    from modelyard.control.migrations import MIGRATIONS
    latest = MIGRATIONS[-1][0]
    assert db.migrate() == latest and db.migrate() == latest
    assert [r["version"] for r in db.query("SELECT version FROM schema_version ORDER BY version")] == \
        [v for v, _ in MIGRATIONS]


def test_the_secret_is_returned_once_and_stored_only_as_a_digest(db):
    keys = KeyStore(db)
    record, secret = keys.create("admin:ops", name="ci", rpm=10, endpoints=["smollm2-135m"])
    assert secret.startswith(SECRET_PREFIX) and len(secret) > 40
    assert record["prefix"] == secret[:len(record["prefix"])] and len(record["prefix"]) < len(secret) // 3
    assert record["rpm"] == 10 and record["tpm"] is None and record["endpoints"] == ["smollm2-135m"]
    stored = json.dumps(db.query("SELECT * FROM api_keys")) + json.dumps(db.query("SELECT * FROM audit_log"))
    assert secret not in stored and digest(secret) in stored
    assert secret not in json.dumps(keys.get(record["id"])) and "digest" not in keys.get(record["id"])
    (active,) = keys.active()
    assert active.digest.hex() == digest(secret) and active.endpoints == frozenset({"smollm2-135m"})


def test_list_pages_by_cursor_in_creation_order(db):
    keys = KeyStore(db)
    ids = [keys.create("admin:a", name=f"k{i}")[0]["id"] for i in range(5)]
    first = keys.list(limit=2)
    assert [k["id"] for k in first["data"]] == ids[:2] and first["has_more"] and first["last_id"] == ids[1]
    second = keys.list(limit=2, after=first["last_id"])
    third = keys.list(limit=2, after=second["last_id"])
    assert [k["id"] for k in second["data"] + third["data"]] == ids[2:] and not third["has_more"]
    assert keys.list(limit=2, after=ids[-1]) == {"object": "list", "data": [], "has_more": False, "last_id": None}


def test_patch_sets_and_resets_with_optimistic_concurrency(db):
    keys = KeyStore(db)
    record, _ = keys.create("admin:a", name="k", rpm=5, tpm=100)
    changed = keys.patch("admin:a", record["id"], {"rpm": None, "tpm": 50}, if_match=record["revision"])
    assert changed["rpm"] is None and changed["tpm"] == 50 and changed["revision"] == record["revision"] + 1
    with pytest.raises(PreconditionFailed):
        keys.patch("admin:b", record["id"], {"tpm": 1}, if_match=record["revision"])      # stale
    assert keys.get(record["id"])["tpm"] == 50
    with pytest.raises(ObjectNotFound):
        keys.patch("admin:a", "key_nope", {"tpm": 1}, if_match=None)


def test_revoke_removes_the_key_from_the_active_set_and_is_final(db):
    keys = KeyStore(db)
    a, _ = keys.create("admin:a", name="a")
    b, _ = keys.create("admin:a", name="b")
    revoked = keys.revoke("admin:a", a["id"])
    assert revoked["revoked_at"] is not None
    assert [k.id for k in keys.active()] == [b["id"]]
    with pytest.raises(Conflict):
        keys.revoke("admin:a", a["id"])
    with pytest.raises(Conflict):
        keys.patch("admin:a", a["id"], {"rpm": 1}, if_match=None)


def test_every_change_is_audited_with_ids_and_never_secrets(db):
    keys = KeyStore(db)
    record, secret = keys.create("admin:ops", name="k", rpm=1)
    keys.patch("viewer-cannot-but-admin-can", record["id"], {"rpm": 2}, if_match=None)
    keys.revoke("admin:ops", record["id"])
    log = keys.audit(limit=10)["data"]
    assert [(e["action"], e["object_id"]) for e in log] == [
        ("api_key.create", record["id"]), ("api_key.update", record["id"]), ("api_key.revoke", record["id"])]
    assert log[0]["actor"] == "admin:ops" and log[1]["detail"] == {"rpm": 2}
    assert secret not in json.dumps(log) and secret[len(SECRET_PREFIX):][:12] not in json.dumps(log)


def test_two_processes_worth_of_connections_see_each_others_writes(db, tmp_path):
    """A second connection (as a second gateway process has) sees a key the first created and
    its revocation: what control/sync relies on."""
    url = f"sqlite:///{db.path}" if db.kind == "sqlite" else None
    other = open_database(url) if url else None
    if other is None:       # PostgreSQL: a second connection to the same database
        from modelyard.control.db import PostgresDatabase
        info = db._conn.info
        other = PostgresDatabase(f"postgresql://{info.user}@/{info.dbname}?host={info.host}")
    try:
        record, _ = KeyStore(db).create("admin:a", name="k")
        assert [k.id for k in KeyStore(other).active()] == [record["id"]]
        KeyStore(db).revoke("admin:a", record["id"])
        assert KeyStore(other).active() == []
    finally:
        other.close()


def test_rotation_gives_a_new_secret_and_keeps_the_old_one_for_its_grace(db):
    keys = KeyStore(db)
    record, old = keys.create("admin:a", name="k", rpm=3)
    rotated, new = keys.rotate("admin:a", record["id"], grace_seconds=600)
    assert new != old and rotated["id"] == record["id"] and rotated["rpm"] == 3
    assert rotated["prefix"] == new[:len(rotated["prefix"])] and rotated["revision"] == record["revision"] + 1
    assert rotated["previous_valid_until"] is not None
    (active,) = keys.active()
    assert active.digest.hex() == digest(new) and active.previous.hex() == digest(old)
    gone, newest = keys.rotate("admin:a", record["id"], grace_seconds=0)
    (active,) = keys.active()
    assert active.previous.hex() == digest(new) and gone["previous_valid_until"] is None
    stored = json.dumps(db.query("SELECT * FROM api_keys")) + json.dumps(keys.audit(limit=10))
    assert not any(s in stored for s in (old, new, newest))
    keys.revoke("admin:a", record["id"])
    assert keys.active() == []
    with pytest.raises(Conflict):
        keys.rotate("admin:a", record["id"], grace_seconds=1)


def test_processes_migrating_one_new_postgresql_at_once_all_succeed(pg_server):
    """Four gateways starting together on a fresh database: the first migrates, the others wait
    (a CREATE TABLE IF NOT EXISTS before the lock failed one of them with a unique violation)."""
    import threading
    from testkit.pg import fresh_database
    from modelyard.control.migrations import MIGRATIONS
    for round_ in range(3):
        url = fresh_database(pg_server, f"race{round_}")
        errors, versions = [], []
        start = threading.Barrier(4)

        def open_one():
            start.wait(10)
            try:
                db = open_database(url)
                versions.append(db.migrate())
                db.close()
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)
        threads = [threading.Thread(target=open_one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and versions == [MIGRATIONS[-1][0]] * 4, errors
