"""Secrets of remote endpoints over real HTTP, on a real `modelyard serve` with the control plane
and no model to load: URL credentials never leave the process, whichever view renders the
endpoint (the admin API's get/list and event stream, /api/v1/endpoints, the console)."""

from __future__ import annotations

import json

import httpx
import pytest

from servers import free_port, served
from test_admin_api import ADMIN, INFER, VIEWER, ctl, until

SECRET = "SEKRETPW"


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
    assert SECRET not in log, "a secret reached the log"


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
        until(probed, timeout=15)
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
        assert admin.delete(f"/model-endpoints/{created['id']}").status_code == 202
