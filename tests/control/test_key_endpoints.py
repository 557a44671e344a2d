"""A key limited to some endpoints sees only those, over real HTTP: a real `modelyard serve` with
two endpoints, a control-plane key and a configured [[keys]] entry each limited to one of them.
Lists are filtered, a request naming the other endpoint gets the very 404 of an unknown name
(a 403 would confirm it exists), and no answer names it; admin tokens and unrestricted keys see
both (issue 19, item 14)."""

from __future__ import annotations

import httpx
import pytest

from testkit.servers import MODEL, served
from test_admin_api import ADMIN, ENGINE, INFER, ctl

pytestmark = pytest.mark.model

HIDDEN, SHOWN = MODEL, "other"          # the limited keys may use SHOWN only
CONFIGURED = "sk-configured-limited"


def config() -> str:
    return (f'[server]\napi_keys = ["{INFER}"]\n\n'
            f'[[keys]]\nkey = "{CONFIGURED}"\nendpoints = ["{SHOWN}"]\n\n'
            f'[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
            f'[[endpoints]]\nname = "{HIDDEN}"\n{ENGINE}\n[[endpoints]]\nname = "{SHOWN}"\nmodel = "{MODEL}"\n{ENGINE}')


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("key-endpoints")
    with served(d, config(), key=INFER) as s:
        with ctl(s.base, ADMIN) as admin:
            r = admin.post("/api-keys", json={"name": "one endpoint", "endpoints": [SHOWN]})
            assert r.status_code == 201, r.text
        s.stored = r.json()["secret"]
        yield s


def calls(srv, key: str, model: str) -> dict[str, httpx.Response]:
    """Every route that names an endpoint, asked about `model` with `key`."""
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(headers=auth, timeout=60) as c:
        return {
            "completions": c.post(f"{srv.api}/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1}),
            "chat": c.post(f"{srv.api}/chat/completions",
                           json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
            "embeddings": c.post(f"{srv.api}/embeddings", json={"model": model, "input": "Hi"}),
            "tokenize": c.post(f"{srv.base}/tokenize", json={"model": model, "prompt": "Hi"}),
            "endpoint": c.get(f"{srv.base}/api/v1/endpoints/{model}"),
        }


def listed(srv, key: str) -> tuple[list[str], list[str]]:
    auth = {"Authorization": f"Bearer {key}"}
    models = httpx.get(f"{srv.api}/models", headers=auth, timeout=10)
    endpoints = httpx.get(f"{srv.base}/api/v1/endpoints", headers=auth, timeout=10)
    assert models.status_code == 200 and endpoints.status_code == 200, (models.text, endpoints.text)
    return sorted(m["id"] for m in models.json()["data"]), sorted(e["name"] for e in endpoints.json()["endpoints"])


@pytest.mark.parametrize("which", ["stored", "configured"])
def test_a_limited_key_sees_only_its_endpoints(srv, which):
    key = srv.stored if which == "stored" else CONFIGURED
    assert listed(srv, key) == ([SHOWN], [SHOWN])
    hidden, unknown = calls(srv, key, HIDDEN), calls(srv, key, "no-such-endpoint")
    for route in hidden:
        h, u = hidden[route], unknown[route]
        assert h.status_code == u.status_code == 404, (route, h.text, u.text)
        # the same answer as for a name that does not exist, naming only the key's endpoint
        assert h.json()["error"]["code"] == u.json()["error"]["code"] == "model_not_found"
        assert h.json()["error"]["message"].replace(HIDDEN, "?") == \
            u.json()["error"]["message"].replace("no-such-endpoint", "?"), route
        assert h.json()["error"]["message"].endswith(f"this server serves: {SHOWN}")
    # nothing it can read names the other endpoint, except its own echo of the name it sent
    for r in unknown.values():
        assert HIDDEN not in r.text, r.text
    # its own endpoint serves; /tokenize picks it as the one embedded endpoint the key knows
    assert calls(srv, key, SHOWN)["completions"].status_code == 200
    r = httpx.post(f"{srv.base}/tokenize", headers={"Authorization": f"Bearer {key}"}, json={"prompt": "Hi"})
    assert r.status_code == 200 and r.json()["count"] >= 1, r.text


def test_admin_tokens_and_unrestricted_keys_see_every_endpoint(srv):
    both = sorted([HIDDEN, SHOWN])
    assert listed(srv, INFER) == (both, both)
    r = httpx.get(f"{srv.base}/api/v1/endpoints", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert sorted(e["name"] for e in r.json()["endpoints"]) == both
    for route, r in calls(srv, INFER, HIDDEN).items():
        assert r.status_code in (200, 400), (route, r.text)      # embeddings: 400, the wrong kind
    r = calls(srv, INFER, "no-such-endpoint")["completions"]
    assert r.status_code == 404 and r.json()["error"]["message"].endswith(f"this server serves: {', '.join(both)}")
    # /tokenize without a model: two embedded endpoints, so one must be named
    r = httpx.post(f"{srv.base}/tokenize", headers={"Authorization": f"Bearer {INFER}"}, json={"prompt": "Hi"})
    assert r.status_code == 400 and "model is required" in r.json()["error"]["message"]
