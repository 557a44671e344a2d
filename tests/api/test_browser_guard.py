"""Web pages cannot drive a keyless server (DNS rebinding, cross-site forms), while curl, the
openai client and allowed origins keep working. A real keyless `modelyard serve` on loopback
whose one endpoint ("broken") fails at load: no model loads, and a request that gets past the
guard answers 400 model_not_ready (which also proves its body was read as JSON)."""

from __future__ import annotations

import json

import httpx
import pytest

from testkit.servers import served

from modelyard.api.middleware.browser_guard import allowed_origin_keys
from modelyard.errors import ConfigError

ALLOWED = "http://localhost:3000"
BODY = json.dumps({"model": "broken", "prompt": "hi", "max_tokens": 1})


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    cfg = f'[server]\nallowed_origins = ["{ALLOWED}"]\n\n[[endpoints]]\nname = "broken"\nmodel = "/nonexistent/x.gguf"\n'
    with served(tmp_path_factory.mktemp("guard"), cfg, endpoints=()) as s:
        yield s


def post(srv, headers: dict, content: str = BODY) -> httpx.Response:
    return httpx.post(f"{srv.api}/completions", content=content, headers=headers, timeout=10)


def refused(r: httpx.Response, code: str) -> str:
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "permission_error", err
    return err["message"]


def served_ok(r: httpx.Response) -> None:
    """Past the guard: the route read the body and named the endpoint."""
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "model_not_ready", r.text


JSON = {"Content-Type": "application/json"}


def test_a_rebound_host_name_is_refused(srv):
    msg = refused(post(srv, {**JSON, "Host": f"evil.example:{srv.port}"}), "forbidden_host")
    assert "evil.example" in msg and "DNS rebinding" in msg
    refused(httpx.get(f"{srv.base}/ready", headers={"Host": "evil.example"}, timeout=10), "forbidden_host")
    refused(httpx.get(f"{srv.api}/models", headers={"Host": "127.0.0.1.evil.example"}, timeout=10),
            "forbidden_host")


@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "app.localhost:{port}", "127.0.0.1:{port}",
                                  "[::1]:{port}", "127.0.0.5"])
def test_loopback_hosts_are_served(srv, host):
    served_ok(post(srv, {**JSON, "Host": host.format(port=srv.port)}))


def test_a_cross_origin_page_is_refused(srv):
    msg = refused(post(srv, {**JSON, "Origin": "https://evil.example"}), "forbidden_origin")
    assert "allowed_origins" in msg
    refused(post(srv, {**JSON, "Origin": "null"}), "forbidden_origin")
    refused(post(srv, {**JSON, "Sec-Fetch-Site": "cross-site"}), "forbidden_origin")
    refused(httpx.options(f"{srv.api}/completions", timeout=10, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}), "forbidden_origin")


def test_a_browser_post_must_be_json(srv):
    same = {"Origin": srv.base}
    served_ok(post(srv, {**JSON, **same}))                      # same origin, JSON: served
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        msg = refused(post(srv, {**same, "Content-Type": ctype}), "unsupported_content_type")
        assert "application/json" in msg
    refused(post(srv, {"Sec-Fetch-Site": "same-origin", "Content-Type": "text/plain"}), "unsupported_content_type")


def test_an_allowed_origin_gets_cors_answers(srv):
    pre = httpx.options(f"{srv.api}/completions", timeout=10, headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ALLOWED, pre.headers
    r = post(srv, {**JSON, "Origin": ALLOWED})
    served_ok(r)
    assert r.headers["access-control-allow-origin"] == ALLOWED


def test_curl_and_the_openai_client_still_work(srv):
    # curl -d sends application/x-www-form-urlencoded: still read as JSON (no Origin: not a browser).
    served_ok(post(srv, {"Content-Type": "application/x-www-form-urlencoded"}))
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as err:      # past the guard: the endpoint's own 400
        openai.OpenAI(base_url=srv.api, api_key="none", max_retries=0).completions.create(
            model="broken", prompt="hi", max_tokens=1)
    assert err.value.status_code == 400


def test_keyed_servers_check_origins_too(server):
    r = httpx.post(f"{server.api}/completions", content=BODY, timeout=10,
                   headers={**server.headers, **JSON, "Origin": "https://evil.example"})
    refused(r, "forbidden_origin")
    # a key makes other Host names fine (a page cannot send the key)
    r = httpx.post(f"{server.api}/completions", content=BODY, timeout=10,
                   headers={**server.headers, **JSON, "Host": "gateway.example"})
    assert r.status_code == 400, r.text


def test_allowed_origins_must_be_origins():
    assert allowed_origin_keys(("http://localhost:3000", "https://app.example", "*")) == {
        "localhost:3000", "app.example:443", "*"}
    for bad in ("localhost:3000", "http://a.example/path", "ftp://x", "null"):
        with pytest.raises(ConfigError, match="allowed_origins"):
            allowed_origin_keys((bad,))


def test_a_proxied_request_to_a_keyless_server_is_warned_of_once(srv):
    """A keyless server behind a reverse proxy on its host is open to everyone the proxy serves:
    the log says so at the first request carrying X-Forwarded-For, and only once."""
    for _ in range(3):
        served_ok(post(srv, {"X-Forwarded-For": "203.0.113.7"}))
    warnings = [line for line in srv.log_text().splitlines() if "arrived through a proxy" in line]
    assert len(warnings) == 1 and "203.0.113.7" in warnings[0] and "api_keys" in warnings[0], warnings
