"""Run-time model endpoints through the admin API, over real HTTP on real `modelyard serve`
processes: created endpoints serve the official openai client, reload on PATCH, unload and load,
are deleted cleanly while a stream runs on them (listed as model.deleted meanwhile), stream
their state changes as server-sent events, survive a restart, and propagate between two
gateways on one real PostgreSQL within 2 s. Config endpoints are read-only (409)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from testkit.pg import fresh_database
from testkit.servers import MODEL, served
from testkit.until import until
from test_admin_api import ADMIN, INFER, PROPAGATION, VIEWER, complete, config, ctl

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.model

SMALL = {"model": MODEL, "context": 256, "parallel": 2, "threads": 1}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("endpoints")
    with served(d, config(f"sqlite:///{d / 'control.db'}"), key=INFER) as s:
        yield s
    log = s.log_text()
    assert "upstream-secret-1" not in log, "an upstream api_key reached the log"


def state_of(admin: httpx.Client, endpoint_id: str) -> str:
    r = admin.get(f"/model-endpoints/{endpoint_id}")
    return r.json()["state"] if r.status_code == 200 else str(r.status_code)


def wait_state(admin: httpx.Client, endpoint_id: str, state: str, timeout: float = 60.0) -> None:
    def reached() -> bool:
        now = state_of(admin, endpoint_id)
        assert now not in ("failed",) or state == "failed", admin.get(f"/model-endpoints/{endpoint_id}").text
        return now == state
    until(reached, timeout, f"{endpoint_id} {state}", interval=0.05)


def test_config_endpoints_are_listed_and_read_only_and_roles_hold(srv):
    with ctl(srv.base, ADMIN) as admin, ctl(srv.base, VIEWER) as viewer, ctl(srv.base, INFER) as infer, \
            ctl(srv.base, None) as nobody:
        listed = viewer.get("/model-endpoints").json()
        configured = {e["id"]: e for e in listed["data"] if e["source"] == "config"}
        assert set(configured) == {f"config:{MODEL}", "config:other"}
        ep = configured[f"config:{MODEL}"]
        assert ep["object"] == "model_endpoint" and ep["state"] == "ready" and ep["kind"] == "completions"
        assert ep["config"]["context"] == 256 and ep["model"] == MODEL
        for r in (admin.patch(f"/model-endpoints/config:{MODEL}", json={"parallel": 1}),
                  admin.delete(f"/model-endpoints/config:{MODEL}"),
                  admin.post(f"/model-endpoints/config:{MODEL}/unload")):
            assert r.status_code == 409 and r.json()["error"]["code"] == "config_managed", r.text
            assert "config file" in r.json()["error"]["message"]
        r = viewer.post("/model-endpoints", json={"name": "v", **SMALL})
        assert r.status_code == 403 and "viewer" in r.json()["error"]["message"]
        assert infer.get("/model-endpoints").status_code == 403
        assert nobody.get("/model-endpoints").status_code == 401
        assert complete(srv, INFER).status_code == 200          # the config endpoint still serves


def test_bad_requests_name_the_field_and_conflicts_are_409(srv):
    with ctl(srv.base, ADMIN) as admin:
        def loc(body):
            r = admin.post("/model-endpoints", json=body)
            assert r.status_code == 422, r.text
            return r.json()["detail"][0]["loc"], r.json()["detail"][0]["msg"]
        assert loc({"name": "a/b", **SMALL})[0] == ["body", "name"]
        assert loc({"name": "x", "engine": "tgi"})[0] == ["body", "engine"]
        assert loc({"name": "x", **SMALL, "context": 0})[0] == ["body", "context"]
        assert loc({"name": "x", **SMALL, "surprise": 1})[0] == ["body", "surprise"]
        assert loc({"name": "x", **SMALL, "batch_share": 0})[0] == ["body", "batch_share"]
        where, msg = loc({"name": "x", "engine": "openai", "upstream_model": "m"})
        assert where == ["body", "urls"] and "urls" in msg
        # the routing fields (issue 25), each bounded
        remote = {"name": "x", "engine": "openai", "urls": ["http://127.0.0.1:9/v1"], "upstream_model": "m"}
        for field, value in (("balance", "random"), ("balance_abs_threshold", -1), ("balance_rel_threshold", 0.5),
                             ("prefix_blocks", 10_000_001), ("session_header", "x session")):
            assert loc({**remote, field: value})[0] == ["body", field], field
        where, msg = loc({"name": "x", "model": "no-such-model"})
        assert where == ["body", "model"] and "no-such-model" in msg
        r = admin.post("/model-endpoints", json={"name": MODEL, **SMALL})
        assert r.status_code == 409 and "config file" in r.json()["error"]["message"]
        assert admin.get("/model-endpoints/ep_nope").status_code == 404
        assert admin.post("/model-endpoints/ep_nope/load").status_code == 404
        # found by schemathesis (issue 19, 3b): an explicit null was a 500 (TypeError), and a
        # timeout of 5e-324 s was accepted; null is the default, a timeout under 0.1 s a 422
        where, msg = loc({"name": "0", "model": "0", "timeout": 5e-324, "context": 16, "parallel": 1, "batch": 1,
                          "max_queue": 0, "threads": 0, "desired": "loaded", "urls": None})
        assert where == ["body", "timeout"] and "0.1" in msg
        where, msg = loc({"name": "0", "model": "0", "timeout": 5, "urls": None})
        assert where == ["body", "model"] and "unknown model '0'" in msg
        # a cloud metadata service is no upstream (issue 19), in any spelling of its address
        for url in ("http://169.254.169.254/v1", "http://2852039166/v1", "http://[fd00:ec2::254]/v1",
                    "http://metadata.google.internal/v1"):
            where, msg = loc({"name": "meta", "engine": "openai", "urls": ["http://127.0.0.1:9/v1", url],
                              "upstream_model": "m"})
            assert where == ["body", "urls", 1] and "allow_private_upstreams" in msg, (url, msg)


def test_create_serve_patch_unload_load_and_delete_with_the_openai_client(srv):
    with ctl(srv.base, ADMIN) as admin:
        r = admin.post("/model-endpoints", json={"name": "rt-small", **SMALL})
        assert r.status_code == 201, r.text
        ep = r.json()
        assert ep["id"].startswith("ep_") and ep["source"] == "api" and ep["state"] in ("loading", "ready")
        assert r.headers["etag"] == '"1"' and ep["desired"] == "loaded"
        assert admin.post("/model-endpoints", json={"name": "rt-small", **SMALL}).status_code == 409
        wait_state(admin, ep["id"], "ready")
        client = openai.OpenAI(base_url=srv.api, api_key=INFER, max_retries=0)
        out = client.completions.create(model="rt-small", prompt="The capital of France is", max_tokens=4, seed=1)
        ref = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, seed=1)
        assert out.choices[0].text == ref.choices[0].text          # the same model, the same answer
        models = {m.id for m in client.models.list().data}
        assert {"rt-small", MODEL} <= models

        assert admin.patch(f"/model-endpoints/{ep['id']}", json={"parallel": 1},
                           headers={"If-Match": '"0"'}).status_code == 412
        r = admin.patch(f"/model-endpoints/{ep['id']}", json={"parallel": 1}, headers={"If-Match": '"1"'})
        assert r.status_code == 200 and r.json()["config"]["parallel"] == 1 and r.headers["etag"] == '"2"'
        wait_state(admin, ep["id"], "ready")
        status = httpx.get(f"{srv.base}/api/v1/endpoints/rt-small", headers=srv.headers).json()
        assert status["slots_total"] == 1, status                  # the reloaded engine has the new config
        r = admin.patch(f"/model-endpoints/{ep['id']}", json={"name": "renamed"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]

        assert admin.post(f"/model-endpoints/{ep['id']}/unload").status_code == 202
        wait_state(admin, ep["id"], "unloaded")
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="rt-small", prompt="Hi", max_tokens=1)
        assert "not ready (unloaded)" in str(err.value)
        assert admin.post(f"/model-endpoints/{ep['id']}/load").status_code == 202
        wait_state(admin, ep["id"], "ready")
        assert client.completions.create(model="rt-small", prompt="Hi", max_tokens=1).choices

        r = admin.delete(f"/model-endpoints/{ep['id']}")
        assert r.status_code == 202 and r.json()["desired"] == "deleted"
        wait_state(admin, ep["id"], "404")
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="rt-small", prompt="Hi", max_tokens=1)
        actions = [e["action"] for e in admin.get("/audit-log", params={"limit": 100}).json()["data"]
                   if e["object_id"] == ep["id"]]
        assert actions == ["model_endpoint.create", "model_endpoint.update", "model_endpoint.unload",
                           "model_endpoint.load", "model_endpoint.delete"]


def test_delete_while_a_stream_runs_finishes_it_and_lists_model_deleted_meanwhile(srv):
    with ctl(srv.base, ADMIN) as admin:
        ep = admin.post("/model-endpoints", json={"name": "rt-del", **SMALL, "context": 1024}).json()
        wait_state(admin, ep["id"], "ready")
        client = openai.OpenAI(base_url=srv.api, api_key=INFER, max_retries=0)
        stream = client.completions.create(model="rt-del", prompt="Once upon a time", max_tokens=600,
                                           stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)
        assert first.choices[0].text is not None
        r = admin.delete(f"/model-endpoints/{ep['id']}")
        assert r.status_code == 202 and r.json()["state"] == "deleting", r.text
        listed = {m["id"]: m for m in httpx.get(f"{srv.api}/models", headers=srv.headers).json()["data"]}
        assert listed["rt-del"]["object"] == "model.deleted"
        r = complete(srv, INFER, "rt-del")
        assert r.status_code == 400 and "deleting" in r.json()["error"]["message"]
        rest = list(chunks)                   # the stream in flight finishes normally
        assert rest[-1].choices[0].finish_reason == "length"
        tokens = 1 + sum(1 for c in rest if c.choices and c.choices[0].text)
        assert tokens >= 550, tokens
        wait_state(admin, ep["id"], "404")
        assert "rt-del" not in {m["id"] for m in httpx.get(f"{srv.api}/models", headers=srv.headers).json()["data"]}
        assert complete(srv, INFER, "rt-del").status_code == 404


def _collect(url: str, headers: dict, events: list, stop: threading.Event) -> None:
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(60, read=30)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
            if stop.is_set():
                return


def test_state_changes_stream_as_server_sent_events(srv):
    events: list = []
    stop = threading.Event()
    reader = threading.Thread(target=_collect, args=(f"{srv.base}/api/v1/control/model-endpoints/events",
                                                     {"Authorization": f"Bearer {VIEWER}"}, events, stop), daemon=True)
    reader.start()
    try:
        until(lambda: any(e[1].get("id") == f"config:{MODEL}" for e in events), 10, "the first snapshot")
        with ctl(srv.base, ADMIN) as admin:
            # a remote endpoint whose replica is this very server
            ep = admin.post("/model-endpoints", json={
                "name": "rt-remote", "engine": "openai", "urls": [srv.api], "upstream_model": MODEL,
                "api_key": INFER}).json()
            assert ep["config"]["api_key_set"] is True and INFER not in json.dumps(ep)

            def mine():
                return [d for k, d in events if k == "endpoint" and d["id"] == ep["id"]]
            until(lambda: any(d["state"] == "ready" and d["replicas"]["healthy"] == d["replicas"]["total"] == 1
                              for d in mine()), 20, "rt-remote ready in the events")
            states = [d["state"] for d in mine()]
            assert states[0] == "loading" and "ready" in states, states
            assert mine()[-1]["serving"] is True and mine()[0]["serving"] is False
            assert complete(srv, INFER, "rt-remote").status_code == 200
            admin.delete(f"/model-endpoints/{ep['id']}")
            until(lambda: ("deleted", {"id": ep["id"], "name": "rt-remote"}) in events, 20, "the deleted event")
            assert "deleting" in [d["state"] for d in mine()]
    finally:
        stop.set()
        reader.join(timeout=35)


def test_a_created_endpoint_survives_a_restart(tmp_path: Path):
    cfg = config(f"sqlite:///{tmp_path / 'control.db'}")
    with served(tmp_path / "one", cfg, name="one", key=INFER) as one:
        with ctl(one.base, ADMIN) as admin:
            ep = admin.post("/model-endpoints", json={"name": "kept", **SMALL}).json()
            gone = admin.post("/model-endpoints", json={"name": "parked", **SMALL, "desired": "unloaded"}).json()
            assert gone["state"] == "unloaded"
            wait_state(admin, ep["id"], "ready")
    with served(tmp_path / "two", cfg, name="two", key=INFER) as two:
        with ctl(two.base, ADMIN) as admin:
            wait_state(admin, ep["id"], "ready")
            assert state_of(admin, gone["id"]) == "unloaded"
        client = openai.OpenAI(base_url=two.api, api_key=INFER, max_retries=0)
        assert client.completions.create(model="kept", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_two_gateways_on_one_postgresql_apply_endpoint_changes_within_two_seconds(tmp_path: Path, request):
    url = fresh_database(request.getfixturevalue("pg_server"), "endpoints")
    with served(tmp_path / "a", config(url), name="a", key=INFER) as a, \
            served(tmp_path / "b", config(url), name="b", key=INFER) as b:
        with ctl(a.base, ADMIN) as admin_a, ctl(b.base, ADMIN) as admin_b:
            ep = admin_a.post("/model-endpoints", json={
                "name": "shared-remote", "engine": "openai", "urls": [a.api], "upstream_model": MODEL,
                "api_key": INFER}).json()
            # B creates it and probes its replica (health interval included): longer than the 2 s
            until(lambda: complete(b, INFER, "shared-remote").status_code == 200, 10, "b serves the new endpoint")
            assert admin_b.post(f"/model-endpoints/{ep['id']}/unload").status_code == 202
            until(lambda: complete(a, INFER, "shared-remote").status_code == 400, PROPAGATION,
                  "a applies b's unload", interval=0.05)
            assert admin_a.post(f"/model-endpoints/{ep['id']}/load").status_code == 202
            until(lambda: complete(b, INFER, "shared-remote").status_code == 200, 10, "b serves it loaded again")
            assert admin_a.delete(f"/model-endpoints/{ep['id']}").status_code == 202
            until(lambda: complete(b, INFER, "shared-remote").status_code == 404, PROPAGATION,
                  "b applies a's delete", interval=0.05)


def test_lists_page_through_config_and_stored_endpoints_once_each(srv):
    with ctl(srv.base, ADMIN) as admin:
        made = {admin.post("/model-endpoints", json={"name": f"page-{i}", **SMALL, "desired": "unloaded"}).json()["id"]
                for i in range(3)}
        seen, after = [], None
        for _ in range(20):
            params = {"limit": 2, **({"after": after} if after else {})}
            page = admin.get("/model-endpoints", params=params).json()
            assert page["object"] == "list" and len(page["data"]) <= 2
            seen += [e["id"] for e in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert len(seen) == len(set(seen)) and {f"config:{MODEL}", "config:other"} | made <= set(seen)
        assert seen == sorted(seen)
        for endpoint_id in made:
            assert admin.delete(f"/model-endpoints/{endpoint_id}").status_code == 202


def test_an_upstream_api_key_is_never_shown(srv):
    secret = "upstream-secret-1"           # the module's fixture also greps the server log for it
    with ctl(srv.base, ADMIN) as admin:
        r = admin.post("/model-endpoints", json={"name": "keyed", "engine": "openai", "urls": [srv.api],
                                                 "upstream_model": MODEL, "api_key": secret})
        assert r.status_code == 201
        ep = r.json()
        patched = admin.patch(f"/model-endpoints/{ep['id']}", json={"api_key": secret + "-b"})
        shown = json.dumps([r.json(), patched.json(), admin.get(f"/model-endpoints/{ep['id']}").json(),
                            admin.get("/model-endpoints", params={"limit": 100}).json(),
                            admin.get("/audit-log", params={"limit": 100}).json()])
        assert secret not in shown and ep["config"]["api_key_set"] is True
        assert admin.delete(f"/model-endpoints/{ep['id']}").status_code == 202


def test_deterministic_completions_join_the_fast_kernels_and_only_embeddings_are_refused(tmp_path: Path):
    """The tiled K-quant matmul's switch is process-wide (local/ffi.choose_kernels), but a
    deterministic completions engine pins ggml's fixed-order kernels to its own thread
    (ffi.use_fixed_order_kernels): it is accepted beside a deterministic = false endpoint, which
    keeps its fast kernels. A deterministic embeddings endpoint needs the process-wide switch,
    which is gone once the fast kernels run: it would silently lose its invariance. 409."""
    cfg = (f'[server]\napi_keys = ["{INFER}"]\ndatabase_url = "sqlite:///{tmp_path / "control.db"}"\n\n'
           f'[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
           f'[[endpoints]]\nname = "fast"\nmodel = "{MODEL}"\ndeterministic = false\n'
           'context = 256\nparallel = 1\nthreads = 1\n')
    with served(tmp_path, cfg, key=INFER) as srv, ctl(srv.base, ADMIN) as admin:
        r = admin.post("/model-endpoints", json={"name": "exact", **SMALL})
        assert r.status_code == 201, r.text
        wait_state(admin, r.json()["id"], "ready")

        def kernels(name: str) -> dict:
            r = httpx.get(f"{srv.base}/api/v1/endpoints/{name}", headers={"Authorization": f"Bearer {INFER}"},
                          timeout=10)
            assert r.status_code == 200, r.text
            return r.json()["kernels"]
        # smollm2's Q4_1 has no repacked kernels on x86: neither endpoint holds repacked weights
        assert kernels("exact") == {"weight_repacking": False, "flash_attention": True, "fixed_order": True,
                                    "tiled_kquant_matmul": False}
        assert kernels("fast") == {"weight_repacking": False, "flash_attention": True, "fixed_order": False,
                                   "tiled_kquant_matmul": True}
        r = complete(srv, INFER, "exact")
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text

        r = admin.post("/model-endpoints", json={"name": "exact-vectors", "model": "minilm-l6-v2",
                                                 "context": 256, "parallel": 2, "threads": 1})
        assert r.status_code == 409 and r.json()["error"]["code"] == "kernel_conflict", r.text
        assert r.json()["error"]["param"] == "deterministic"
        assert "exact-vectors" not in [e["name"] for e in admin.get("/model-endpoints").json()["data"]]
        r = admin.post("/model-endpoints", json={"name": "fast-vectors", "model": "minilm-l6-v2", "context": 256,
                                                 "parallel": 2, "threads": 1, "deterministic": False})
        assert r.status_code == 201, r.text
        wait_state(admin, r.json()["id"], "ready")
