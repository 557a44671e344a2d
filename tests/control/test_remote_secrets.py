"""Secrets of remote endpoints over real HTTP, on a real `modelyard serve` with the control plane
and no model to load: URL credentials never leave the process, whichever view renders the
endpoint (the admin API's get/list and event stream, /api/v1/endpoints, the console), and an
upstream api_key goes only to the hosts it was given for (PATCH of `urls` alone to a new host
drops it). The upstreams are tiny HTTP servers in threads that record what they are sent."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import httpx
import pytest

from testkit.servers import free_port, served
from testkit.until import until
from test_admin_api import ADMIN, INFER, VIEWER, ctl

from modelyard.api.admin.endpoints import same_hosts

SECRET = "SEKRETPW"
UPSTREAM_KEY, NEW_KEY = "upstream-key-K", "upstream-key-K2"


def config(database_url: str, closed_port: int) -> str:
    return (f'[server]\napi_keys = ["{INFER}"]\ndatabase_url = "{database_url}"\n\n'
            f'[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
            f'[[admin_tokens]]\nname = "audit"\nrole = "viewer"\ntoken = "{VIEWER}"\n\n'
            f'[[endpoints]]\nname = "cfg-remote"\nengine = "openai"\n'
            f'urls = ["http://user:{SECRET}@127.0.0.1:{closed_port}/v1"]\nupstream_model = "m"\n')


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote-secrets")
    # endpoints=(): ready once it answers; its remote endpoints' replicas are down on purpose
    with served(d, config(f"sqlite:///{d / 'control.db'}", free_port()), key=INFER, endpoints=()) as s:
        yield s
    log = s.log_text()
    assert SECRET not in log and UPSTREAM_KEY not in log and NEW_KEY not in log, "a secret reached the log"


# -- one rendering, redacted ---------------------------------------------------------------------

def _first_snapshots(base: str, count: int) -> list[dict]:
    """The event stream's first `count` snapshot events (the initial snapshot of each endpoint)."""
    got: list[dict] = []
    with httpx.stream("GET", f"{base}/api/v1/control/model-endpoints/events", timeout=30,
                      headers={"Authorization": f"Bearer {VIEWER}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
                if len(got) == count:
                    return got
    return got


def test_url_credentials_of_a_down_replica_are_masked_in_every_view(srv):
    closed = free_port()
    with ctl(srv.base, ADMIN) as admin, ctl(srv.base, VIEWER) as viewer:
        r = admin.post("/model-endpoints", json={"name": "rt-remote", "engine": "openai", "upstream_model": "m",
                                                 "urls": [f"http://user:{SECRET}@127.0.0.1:{closed}/v1"]})
        assert r.status_code == 201, r.text
        created = r.json()

        def probed() -> bool:      # both are ready and say why they do not serve (a failed probe)
            data = viewer.get("/model-endpoints", params={"limit": 100}).json()["data"]
            remote = [e for e in data if e["name"] in ("cfg-remote", "rt-remote")]
            return len(remote) == 2 and all(e["state"] == "ready" and e["reason"]
                                            and "not probed yet" not in e["reason"] for e in remote)
        until(probed, 15, "both remote endpoints probed")
        listed = viewer.get("/model-endpoints", params={"limit": 100}).json()
        remote = [e for e in listed["data"] if e["name"] in ("cfg-remote", "rt-remote")]
        for e in remote:
            assert e["serving"] is False and "no replica answers: http://***@127.0.0.1" in e["reason"], e
            assert e["last_error"].startswith("http://***@127.0.0.1"), e
        views = {
            "created": created, "list": listed,
            "get": viewer.get(f"/model-endpoints/{created['id']}").json(),
            "get config": viewer.get("/model-endpoints/config:cfg-remote").json(),
            "events": _first_snapshots(srv.base, len(listed["data"])),
            "endpoints (key)": httpx.get(f"{srv.base}/api/v1/endpoints", headers=srv.headers).json(),
            "endpoint (key)": httpx.get(f"{srv.base}/api/v1/endpoints/cfg-remote", headers=srv.headers).json(),
            "endpoints (admin)": httpx.get(f"{srv.base}/api/v1/endpoints",
                                           headers={"Authorization": f"Bearer {ADMIN}"}).json(),
            "ready": httpx.get(f"{srv.base}/ready", headers=srv.headers).json(),
        }
        assert {e["name"] for e in views["events"]} >= {"cfg-remote", "rt-remote"}
        assert any("no replica answers" in (e.get("reason") or "") for e in views["endpoints (key)"]["endpoints"])
        for name, body in views.items():
            assert SECRET not in json.dumps(body), f"{name}: {body}"

        with httpx.Client(base_url=srv.base, timeout=30) as browser:
            assert browser.post("/console/login", json={"token": VIEWER}).status_code == 204
            page = browser.get("/console/endpoints")
            assert page.status_code == 200 and "rt-remote" in page.text and "cfg-remote" in page.text
            assert "http://***@127.0.0.1" in page.text and SECRET not in page.text
        deleted = admin.delete(f"/model-endpoints/{created['id']}")
        assert deleted.status_code == 202 and deleted.json()["desired"] == "deleted" and SECRET not in deleted.text


# -- the upstream api_key follows its hosts ----------------------------------------------------

class Upstream:
    """A loopback OpenAI-ish upstream answering GET .../models, recording (path, Authorization)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:       # noqa: N802 - http.server's name
                seen.append((self.path, self.headers.get("Authorization")))
                body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
                self.send_response(200 if self.path.endswith("/models") else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def keys(self, path_prefix: str = "") -> set[str | None]:
        return {auth for path, auth in list(self.seen) if path.startswith(path_prefix)}

    def probes(self, path_prefix: str = "") -> int:
        return sum(1 for path, _ in list(self.seen) if path.startswith(path_prefix))


@pytest.fixture
def upstreams() -> Iterator[tuple[Upstream, Upstream, Upstream]]:
    made = (Upstream(), Upstream(), Upstream())
    yield made
    for u in made:
        u.server.shutdown()
        u.server.server_close()


def test_patching_urls_to_another_host_drops_the_upstream_key(srv, upstreams):
    a, b, c = upstreams
    with ctl(srv.base, ADMIN) as admin:
        r = admin.post("/model-endpoints", json={"name": "keyed-remote", "engine": "openai", "upstream_model": "m",
                                                 "urls": [a.url + "/v1"], "api_key": UPSTREAM_KEY})
        assert r.status_code == 201, r.text
        ep = r.json()
        until(lambda: f"Bearer {UPSTREAM_KEY}" in a.keys("/v1/"), 15, "a probed with the key")

        # Another path on the same scheme, host and port: the same upstream, the key stays.
        r = admin.patch(f"/model-endpoints/{ep['id']}", json={"urls": [a.url + "/alt/v1"]})
        assert r.status_code == 200 and r.json()["config"]["api_key_set"] is True, r.text
        until(lambda: a.probes("/alt/v1/") >= 1, 15, "a probed on the new path")
        assert a.keys("/alt/v1/") == {f"Bearer {UPSTREAM_KEY}"}

        # Another port (another host to the key's owner): the key is dropped, the answer says so.
        r = admin.patch(f"/model-endpoints/{ep['id']}", json={"urls": [b.url + "/v1"]})
        assert r.status_code == 200 and r.json()["config"]["api_key_set"] is False, r.text
        until(lambda: b.probes() >= 2, 15, "two probes of b")         # its first probe and the next
        assert b.keys() == {None}

        # urls and api_key in one PATCH: the new host gets the new key, and only that.
        r = admin.patch(f"/model-endpoints/{ep['id']}", json={"urls": [c.url + "/v1"], "api_key": NEW_KEY})
        assert r.status_code == 200 and r.json()["config"]["api_key_set"] is True, r.text
        until(lambda: c.probes() >= 1, 15, "a probe of c")
        assert c.keys() == {f"Bearer {NEW_KEY}"}
        assert f"Bearer {UPSTREAM_KEY}" not in b.keys() | c.keys()
        changes = [e for e in admin.get("/audit-log", params={"limit": 100}).json()["data"]
                   if e["object_id"] == ep["id"] and e["action"] == "model_endpoint.update"]
        assert any(e.get("detail", {}).get("api_key_set") is False for e in changes), changes
        assert admin.delete(f"/model-endpoints/{ep['id']}").status_code == 202


def test_same_hosts_compares_scheme_host_and_port():
    assert same_hosts(["http://h:80/v1"], ["http://H/other/v1"])                 # default port, case
    assert same_hosts(["https://u:p@h/v1", "http://g:8000/v1"], ["https://h:443/x"])   # credentials aside
    assert not same_hosts(["http://h/v1"], ["https://h/v1"])                     # scheme
    assert not same_hosts(["http://h/v1"], ["http://h:8080/v1"])                 # port
    assert not same_hosts(["http://h/v1"], ["http://h/v1", "http://evil/v1"])    # one new host is enough
    assert same_hosts(["http://h/v1", "http://g/v1"], ["http://g/v1"])           # fewer hosts: the key stays
