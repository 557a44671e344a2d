"""Usage accounting: in memory on the request path, flushed in batches; the store's rollups on
both backends; over HTTP, a flush shows what was served, SIGTERM loses nothing, and kill -9 loses
at most what came after the last flush, leaving the database consistent."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from modelyard.control.db import open_database
from modelyard.control.usage import FLUSH, UsageRecorder, query, rename_keys
from testkit.servers import MODEL, modelyard_process, wait_ready
from testkit.until import until


def test_flushes_add_up_across_processes_and_roll_up(db):
    a, b = UsageRecorder(db), UsageRecorder(db)
    for _ in range(3):
        a.record("key_1", "m", 10, 5)
    b.record("key_1", "m", 1, 1)
    b.record("key_2", "m", 7, 0)
    assert asyncio.run(a.flush()) == 1 and asyncio.run(b.flush()) == 2
    assert asyncio.run(a.flush()) == 0              # nothing new: no write
    rows = query(db, "day", None, None, None, None)["data"]
    by_key = {r["key_id"]: r for r in rows}
    assert by_key["key_1"]["requests"] == 4 and by_key["key_1"]["prompt_tokens"] == 31
    assert by_key["key_1"]["completion_tokens"] == 16 and by_key["key_1"]["total_tokens"] == 47
    assert by_key["key_2"]["requests"] == 1 and by_key["key_1"]["start"] % 86400 == 0
    only = query(db, "minute", "key_2", "m", None, None)["data"]
    assert [r["prompt_tokens"] for r in only] == [7] and only[0]["start"] % 60 == 0



def test_renamed_keys_rows_move_and_add_to_the_new_ids(db):
    """Configured keys' ids changed once (quota/keys.configured_id): their rows move, adding to
    rows a process already wrote under the new id; running it again changes nothing."""
    a = UsageRecorder(db)
    a.record("config:old", "m", 10, 5)
    a.record("config:new", "m", 1, 1)           # the same minute, under the new id
    a.record("config:other", "m", 2, 2)
    asyncio.run(a.flush())
    assert rename_keys(db, [("config:old", "config:new")]) == 1
    assert rename_keys(db, [("config:old", "config:new")]) == 0
    by_key = {r["key_id"]: r for r in query(db, "minute", None, None, None, None)["data"]}
    assert set(by_key) == {"config:new", "config:other"}
    assert (by_key["config:new"]["requests"], by_key["config:new"]["prompt_tokens"],
            by_key["config:new"]["completion_tokens"]) == (2, 11, 6)


ADMIN = "usage-admin"


def config(path) -> str:
    return (f'[server]\ndatabase_url = "sqlite:///{path}"\n\n[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
            f'[[endpoints]]\nname = "{MODEL}"\ncontext = 128\nparallel = 2\nthreads = 1\n')


def stored(path) -> tuple[int, int]:
    db = open_database(f"sqlite:///{path}")
    try:
        rows = query(db, "day", None, None, None, None)["data"]
        return sum(r["requests"] for r in rows), sum(r["total_tokens"] for r in rows)
    finally:
        db.close()


@pytest.mark.model
def test_served_requests_reach_the_store_and_shutdowns_lose_at_most_one_interval(tmp_path):
    path = tmp_path / "control.db"
    srv = modelyard_process(tmp_path, config(path), name="usage", key=ADMIN).start()
    try:
        wait_ready(srv)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        key = httpx.post(f"{srv.base}/api/v1/control/api-keys", headers=admin, json={"name": "u"}).json()
        auth = {"Authorization": f"Bearer {key['secret']}"}

        def complete() -> int:
            r = httpx.post(f"{srv.api}/completions", headers=auth, timeout=60,
                           json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["total_tokens"]
        tokens = sum(complete() for _ in range(3))
        # the next flush makes them visible through the admin API
        rows = until(lambda: httpx.get(f"{srv.base}/api/v1/control/usage", headers=admin,
                                       params={"key_id": key["id"], "granularity": "minute"}).json()["data"],
                     3 * FLUSH, "a flush within three intervals", interval=0.2)
        assert sum(r["requests"] for r in rows) == 3 and sum(r["total_tokens"] for r in rows) == tokens
        assert rows[0]["endpoint"] == MODEL
        shown = httpx.get(f"{srv.base}/api/v1/control/api-keys/{key['id']}", headers=admin).json()
        assert shown["last_used_at"] == max(r["start"] for r in rows)       # the key's own use, from the rollups
        assert shown["usage_24h"] == {"requests": 3, "total_tokens": tokens}
        listed = httpx.get(f"{srv.base}/api/v1/control/api-keys", headers=admin).json()["data"]
        assert [k["usage_24h"]["requests"] for k in listed if k["id"] == key["id"]] == [3]
        # kill -9 right after two more: they were not flushed, and nothing else is lost
        complete(), complete()
        srv.kill()
        assert stored(path) == (3, tokens)
    finally:
        srv.stop(timeout=5)
    # SIGTERM: what was served after the last flush is written on the way out
    srv = modelyard_process(tmp_path, config(path), name="usage2", key=ADMIN).start()
    try:
        wait_ready(srv)
        key2 = httpx.post(f"{srv.base}/api/v1/control/api-keys", headers={"Authorization": f"Bearer {ADMIN}"},
                          json={"name": "v"}).json()
        r = httpx.post(f"{srv.api}/completions", headers={"Authorization": f"Bearer {key2['secret']}"},
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
        extra = r.json()["usage"]["total_tokens"]
    finally:
        assert srv.stop(timeout=30) in (0, -signal.SIGTERM)
    assert stored(path) == (4, tokens + extra)
