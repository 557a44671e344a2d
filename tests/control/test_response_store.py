"""control/responses: stored responses are their key's alone (another key: not found), their
input items page in order either way, and retention sweeps them with their items; conversations
likewise; a background response whose gateway died is failed. On SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest

from modelyard.control.responses import ResponseStore
from modelyard.errors import InvalidRequest, ObjectNotFound


@pytest.fixture
def store(db):          # tests/control/conftest.py: SQLite and PostgreSQL, the same SQL
    return ResponseStore(db, 30)


def body(rid: str) -> dict:
    return {"id": rid, "model": "m", "status": "completed", "created_at": int(time.time()),
            "previous_response_id": None, "output": [{"id": "msg_out", "type": "message"}]}


def items(n: int) -> list[dict]:
    return [{"id": f"msg_{i}", "type": "message", "role": "user", "content": str(i)} for i in range(n)]


def test_a_response_is_its_key_s_alone(store):
    store.save("key-a", body("resp_1"), items(2))
    assert store.get("key-a", "resp_1")["id"] == "resp_1"
    for call in (lambda k: store.get(k, "resp_1"), lambda k: store.delete(k, "resp_1"),
                 lambda k: store.items_page(k, "resp_1", 10, None, "asc"), lambda k: store.context(k, "resp_1")):
        with pytest.raises(ObjectNotFound):
            call("key-b")
        with pytest.raises(ObjectNotFound):
            call(None)
    assert [i["id"] for i in store.context("key-a", "resp_1")] == ["msg_0", "msg_1", "msg_out"]
    store.delete("key-a", "resp_1")
    with pytest.raises(ObjectNotFound):
        store.get("key-a", "resp_1")
    assert store.db.query("SELECT count(*) AS n FROM response_items")[0]["n"] == 0


def test_input_items_page_both_ways(store):
    store.save(None, body("resp_1"), items(5))
    page = store.items_page(None, "resp_1", 2, None, "asc")
    assert [i["id"] for i in page["data"]] == ["msg_0", "msg_1"] and page["has_more"]
    assert (page["first_id"], page["last_id"]) == ("msg_0", "msg_1")
    page = store.items_page(None, "resp_1", 10, "msg_1", "asc")
    assert [i["id"] for i in page["data"]] == ["msg_2", "msg_3", "msg_4"] and not page["has_more"]
    page = store.items_page(None, "resp_1", 2, "msg_3", "desc")
    assert [i["id"] for i in page["data"]] == ["msg_2", "msg_1"] and page["has_more"]
    with pytest.raises(InvalidRequest):
        store.items_page(None, "resp_1", 2, "msg_nope", "asc")


def test_retention_sweeps_a_response_and_its_items(store):
    store.save("k", body("resp_1"), items(3))
    assert store.sweep(int(time.time())) == 0
    assert store.sweep(int(time.time()) + 31 * 86_400) == 1
    assert store.db.query("SELECT count(*) AS n FROM response_items")[0]["n"] == 0


def test_a_conversation_is_its_key_s_and_its_use_keeps_it(store):
    from modelyard.control.conversations import ConversationStore
    conversations = ConversationStore(store.db, 30)
    conv = conversations.create("key-a", {"k": "v"}, items(2))
    conversations.add("key-a", conv["id"], items(1))
    assert [i["id"] for i in conversations.items("key-a", conv["id"])] == ["msg_0", "msg_1", "msg_0"]
    with pytest.raises(ObjectNotFound):
        conversations.add("key-b", conv["id"], items(1))
    with pytest.raises(ObjectNotFound):
        conversations.page("key-b", conv["id"], 10, None, "asc")
    assert conversations.sweep(int(time.time()) + 29 * 86_400) == 0
    assert conversations.sweep(int(time.time()) + 31 * 86_400) == 1
    assert store.db.query("SELECT count(*) AS n FROM conversation_items")[0]["n"] == 0


def test_a_background_response_whose_gateway_died_is_failed(store):
    running = {**body("resp_1"), "status": "in_progress", "background": True, "output": []}
    store.save("k", running, items(1), lease_until=int(time.time()) + 30)
    assert store.fail_stale(int(time.time())) == 0
    store.renew(["resp_1"], int(time.time()) + 60)
    assert store.fail_stale(int(time.time()) + 59) == 0
    store.db.execute("UPDATE responses SET lease_until = ? WHERE id = 'resp_1'", (int(time.time()) - 1,))
    failed = store.get("k", "resp_1")          # a poll sees it failed at once
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert not store.finish({**failed, "status": "completed"})       # an ended one stays ended
