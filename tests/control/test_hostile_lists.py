"""Bounded answers of the control plane (issue 19, item 13): usage is paged like the other lists
(`limit` up to USAGE_PAGE_MAX, `after` = last_id; a viewer's start=0 was every row ever stored),
and server-sent-event streams are bounded per admin token (max_streams_per_token, then 429) and
end when their token is revoked (the admin API's stream and the console's)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from modelyard.control.admin_tokens import AdminTokenStore
from modelyard.control.db import open_database
from modelyard.control.usage import USAGE_PAGE, USAGE_PAGE_MAX, query
from modelyard.errors import InvalidRequest
from testkit.servers import modelyard_process, status_is, wait_for

ADMIN = "lists-admin-token"


def _fill(db, n: int, base: int = 600_000) -> None:
    with db.transaction() as tx:
        for i in range(n):
            tx.execute("INSERT INTO usage (key_id, endpoint, minute, requests, prompt_tokens, completion_tokens) "
                       "VALUES (?, ?, ?, 1, 2, 3)", (f"key_{i % 3}", f"ep{i % 2}", base + (i // 3) * 60))


def test_usage_is_paged_in_order_on_both_backends(db):
    _fill(db, 25)
    whole = query(db, "minute", None, None, 0, None, limit=USAGE_PAGE_MAX)
    assert len(whole["data"]) == 25 and whole["has_more"] is False
    got, after = [], None
    while True:
        page = query(db, "minute", None, None, 0, None, limit=10, after=after)
        assert len(page["data"]) <= 10
        got += page["data"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert got == whole["data"]
    keys = [(b["start"], b["key_id"], b["endpoint"]) for b in got]
    assert keys == sorted(keys) and len(set(keys)) == 25
    assert len(query(db, "minute", None, None, 0, None)["data"]) == 25 <= USAGE_PAGE    # the default limit
    with pytest.raises(InvalidRequest) as bad:
        query(db, "minute", None, None, 0, None, after="ub_not-a-cursor")
    assert bad.value.param == "after" and "ub_not-a-cursor" in bad.value.message


@pytest.fixture
def server(tmp_path):
    path = tmp_path / "control.db"
    db = open_database(f"sqlite:///{path}")
    try:
        store = AdminTokenStore(db)
        tokens = {name: store.create("cli", name, role)[1]
                  for name, role in (("streamer", "viewer"), ("console-user", "admin"))}
        _fill(db, 150)
    finally:
        db.close()
    config = (f'[server]\ndatabase_url = "sqlite:///{path}"\nmax_streams_per_token = 2\n\n'
              f'[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
              '[[endpoints]]\nname = "remote"\nengine = "openai"\nurls = ["http://127.0.0.1:9/v1"]\n')
    srv = modelyard_process(tmp_path, config, name="lists").start()
    try:
        wait_for("up", status_is(srv.base + "/health"), srv)
        yield srv, path, tokens
    finally:
        srv.stop()


def test_a_viewer_reads_usage_a_page_at_a_time(server):
    srv, _, tokens = server
    viewer = {"Authorization": f"Bearer {tokens['streamer']}"}
    url = srv.base + "/api/v1/control/usage"
    first = httpx.get(url, params={"granularity": "minute", "start": 0}, headers=viewer, timeout=10)
    assert first.status_code == 200, first.text
    body = first.json()
    assert len(body["data"]) == USAGE_PAGE and body["has_more"] is True and body["last_id"] == body["data"][-1]["id"]
    too_many = httpx.get(url, params={"granularity": "minute", "start": 0, "limit": USAGE_PAGE_MAX + 1},
                         headers=viewer, timeout=10)
    assert too_many.status_code == 422
    detail = too_many.json()["detail"][0]
    assert detail["loc"] == ["query", "limit"] and str(USAGE_PAGE_MAX) in detail["msg"]
    rest = httpx.get(url, params={"granularity": "minute", "start": 0, "after": body["last_id"], "limit": 1000},
                     headers=viewer, timeout=10).json()
    assert len(rest["data"]) == 50 and rest["has_more"] is False
    bad = httpx.get(url, params={"granularity": "minute", "after": "nonsense"}, headers=viewer, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"


def _ends_within(response: httpx.Response, seconds: float) -> float:
    """Reads the stream to its end; how long that took (a stream still open past the client's
    read timeout raises)."""
    start = time.monotonic()
    for _ in response.iter_lines():
        assert time.monotonic() - start < seconds, "the stream went on"
    return time.monotonic() - start


def test_streams_are_bounded_per_token(server):
    srv, _, tokens = server
    events = srv.base + "/api/v1/control/model-endpoints/events"
    streamer = {"Authorization": f"Bearer {tokens['streamer']}"}
    timeout = httpx.Timeout(10, read=20)
    with httpx.Client(timeout=timeout) as one, httpx.Client(timeout=timeout) as two, \
            httpx.Client(timeout=timeout) as three, httpx.Client(base_url=srv.base, timeout=timeout) as browser:
        with one.stream("GET", events, headers=streamer) as a, two.stream("GET", events, headers=streamer) as b:
            assert a.status_code == b.status_code == 200
            with three.stream("GET", events, headers=streamer) as refused:   # (a stream if not refused)
                assert refused.status_code == 429
                error = json.loads(refused.read())["error"]
            assert error["code"] == "too_many_streams" and "max_streams_per_token = 2" in error["message"]
            assert "Retry-After" in refused.headers
            # another token has its own streams
            with three.stream("GET", events, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
                assert c.status_code == 200
            # the console's stream counts against its session's token too
            assert browser.post("/console/login", json={"token": tokens["streamer"]}).status_code == 204
            with browser.stream("GET", "/console/endpoints/stream") as page:
                assert page.status_code == 429
                assert "max_streams_per_token = 2" in page.read().decode()


def test_streams_end_when_their_token_is_revoked(server):
    srv, path, tokens = server
    events = srv.base + "/api/v1/control/model-endpoints/events"
    timeout = httpx.Timeout(10, read=20)
    with httpx.Client(timeout=timeout) as one, httpx.Client(base_url=srv.base, timeout=timeout) as browser:
        with one.stream("GET", events, headers={"Authorization": f"Bearer {tokens['streamer']}"}) as api:
            assert api.status_code == 200
            # the console's stream, signed in with another stored token, revoked too
            assert browser.post("/console/login", json={"token": tokens["console-user"]}).status_code == 204
            with browser.stream("GET", "/console/endpoints/stream") as page:
                assert page.status_code == 200
                db = open_database(f"sqlite:///{path}")
                try:
                    store = AdminTokenStore(db)
                    store.revoke("cli", "streamer")
                    store.revoke("cli", "console-user")
                finally:
                    db.close()
                # within the sync bound (2 s) plus a stream's own tick (1 s)
                assert _ends_within(api, 5) < 5 and _ends_within(page, 5) < 5


def test_a_stream_never_started_gives_its_slot_back():
    """A client gone before the first chunk: the generator never runs its `finally`; the slot
    comes back when it is collected, else a token would lose its streams one by one."""
    import gc

    from modelyard.api.admin.auth import StreamSlots
    from modelyard.errors import RateLimited
    from modelyard.settings import AdminToken

    async def body():
        yield "x"
    slots, who = StreamSlots(1), AdminToken("ops", "a-token")
    held = slots.stream(who, body())
    with pytest.raises(RateLimited) as refused:
        slots.stream(who, body())
    assert "max_streams_per_token = 1" in refused.value.message and refused.value.retry_after
    del held
    gc.collect()
    assert slots.open == {}
    slots.stream(who, body())
