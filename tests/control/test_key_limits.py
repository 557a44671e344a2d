"""A stored key's max_parallel and token budget over real HTTP: a real `modelyard serve` whose
control store is a real SQLite file. A request's slot is given back however it ends (finished,
failed, client gone mid-stream or before the answer, stream read to the end); the budget counts
the usage of the period and says when it resets; the fields are validated, shown and reset."""

from __future__ import annotations

import threading

import httpx
import pytest

from testkit.servers import MODEL, served
from testkit.until import until
from test_admin_api import ADMIN, INFER, complete, config, ctl

pytestmark = pytest.mark.model

PROMPT = list(range(1000, 1010))            # 10 tokens, exactly
NO_EOG = {"0": -100, "1": -100, "2": -100}  # generation always runs to max_tokens


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("limits")
    with served(d, config(f"sqlite:///{d / 'control.db'}"), key=INFER) as s:
        yield s
        for secret in getattr(s, "secrets", []):
            assert secret not in s.log_text()


def new_key(srv, **fields) -> tuple[str, str]:
    with ctl(srv.base, ADMIN) as admin:
        r = admin.post("/api-keys", json={"name": "limited", **fields})
        assert r.status_code == 201, r.text
    srv.secrets = [*getattr(srv, "secrets", []), r.json()["secret"]]
    return r.json()["secret"], r.json()["id"]


def long_body(stream: bool) -> dict:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "logit_bias": NO_EOG, "stream": stream}


def test_max_parallel_slot_is_released_however_the_request_ends(srv):
    key, kid = new_key(srv, max_parallel=1)
    auth = {"Authorization": f"Bearer {key}"}
    # finished, one after another: each gives its slot back
    assert [complete(srv, key).status_code for _ in range(3)] == [200, 200, 200]
    # failed before the engine (unknown endpoint, 404): released too
    assert [complete(srv, key, "nope").status_code for _ in range(2)] == [404, 404]
    assert complete(srv, key).status_code == 200
    with httpx.Client(timeout=60) as client:
        # a stream holds its slot while it runs; a second request is refused, naming the limit
        with client.stream("POST", f"{srv.api}/completions", headers=auth, json=long_body(True)) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            r = complete(srv, key)
            assert r.status_code == 429 and r.json()["error"]["code"] == "parallel_limit_exceeded", r.text
            assert "1 requests in flight" in r.json()["error"]["message"]
        # the client left mid-stream: the slot comes back (bounded wait for the server to see it)
        until(lambda: complete(srv, key).status_code == 200, 10, "the slot back")
        # a stream read to its end
        with client.stream("POST", f"{srv.api}/completions", headers=auth,
                           json={**long_body(True), "max_tokens": 3}) as stream:
            assert "data: [DONE]" in list(stream.iter_lines())
        assert complete(srv, key).status_code == 200
    # a non-streaming client that gives up before its answer
    outcome: list[str] = []

    def leave() -> None:
        try:
            httpx.post(f"{srv.api}/completions", headers=auth, json=long_body(False), timeout=0.5)
            outcome.append("answered")
        except httpx.ReadTimeout:
            outcome.append("left")
    gone = threading.Thread(target=leave)
    gone.start()
    gone.join(30)
    assert outcome == ["left"]
    until(lambda: complete(srv, key).status_code == 200, 10, "the slot back")
    srv.wait_idle()


def test_token_budget_per_day_says_limit_used_and_reset(srv):
    # 32: two requests of 16 fit exactly (each holds its 16 from reserve to settle)
    key, kid = new_key(srv, budget_tokens=32, budget_period="day")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "logit_bias": NO_EOG}

    def call() -> httpx.Response:
        return httpx.post(f"{srv.api}/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60)
    assert call().status_code == 200 and call().status_code == 200       # 16 each: 32 used
    r = call()
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == "budget_exceeded"
    assert "32 tokens per day" in err["message"] and "32 used" in err["message"] and "resets at" in err["message"]
    assert 0 < int(r.headers["retry-after"]) <= 86400
    with ctl(srv.base, ADMIN) as admin:
        shown = admin.get(f"/api-keys/{kid}").json()
        assert (shown["budget_tokens"], shown["budget_period"], shown["max_parallel"]) == (32, "day", None)
        assert admin.patch(f"/api-keys/{kid}", json={"budget_tokens": 100}).json()["budget_tokens"] == 100
        assert call().status_code == 200                                 # 48 of 100
        r = admin.patch(f"/api-keys/{kid}", json={"budget_tokens": None})
        assert r.status_code == 200 and r.json()["budget_tokens"] is None
        listed = {k["id"]: k for k in admin.get("/api-keys", params={"limit": 100}).json()["data"]}
        assert listed[kid]["budget_tokens"] is None and listed[kid]["budget_period"] == "day"
    assert call().status_code == 200


@pytest.mark.parametrize("fields, loc, shown", [
    ({"max_parallel": 0}, "max_parallel", 0),
    ({"budget_tokens": -5, "budget_period": "day"}, "budget_tokens", -5),
    ({"budget_tokens": 10, "budget_period": "week"}, "budget_period", "week"),
    ({"budget_tokens": 10}, "budget_period", None),
])
def test_limits_are_validated_naming_field_and_value(srv, fields, loc, shown):
    with ctl(srv.base, ADMIN) as admin:
        r = admin.post("/api-keys", json={"name": "bad", **fields})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", loc] and detail["input"] == shown
        kid = admin.post("/api-keys", json={"name": "ok"}).json()["id"]
        r = admin.patch(f"/api-keys/{kid}", json=fields)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", loc]
