"""Secrets never leave the server, and callers without a key learn states, not reasons.

A real `modelyard serve` with an API key, an upstream endpoint whose URL carries credentials and
which has an api_key of its own (its port refuses connections, so it is never ready and its
reason names it), and an endpoint whose model file is missing. No model is loaded, so it starts
at once. Nothing the server answers, and nothing it logs, holds the URL's password or the keys.
"""

from __future__ import annotations


import httpx
import pytest

from testkit.servers import free_port, served
from testkit.until import until

KEY = "sk-client-key-1234"
UPSTREAM_KEY = "sk-upstream-secret-5678"
PASSWORD = "hunter2pw"
MISSING = "/nonexistent/private-dir/x.gguf"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    port = free_port()          # nothing listens there
    cfg = f"""\
[server]
api_keys = ["{KEY}"]
log_level = "debug"

[[endpoints]]
name = "remote"
engine = "openai"
urls = ["http://alice:{PASSWORD}@127.0.0.1:{port}/v1"]
upstream_model = "m"
api_key = "{UPSTREAM_KEY}"

[[endpoints]]
name = "broken"
model = "{MISSING}"
"""
    with served(tmp_path_factory.mktemp("secrets"), cfg, key=KEY, endpoints=()) as s:
        def settled() -> bool:      # broken failed, remote probed (and refused)
            r = httpx.get(f"{s.base}/ready", headers=s.headers, timeout=5).json()["not_ready"]
            return r.get("broken", "").startswith("failed") and "refused" in r.get("remote", "")
        until(settled, 30, "both endpoints settled")
        yield s


def _clean(text: str) -> None:
    for secret in (PASSWORD, UPSTREAM_KEY, KEY, "alice"):
        assert secret not in text, (secret, text)


def test_open_ready_says_states_only(srv):
    r = httpx.get(f"{srv.base}/ready", timeout=5)
    assert r.status_code == 503
    assert r.json() == {"status": "not ready", "not_ready": {"broken": "failed", "remote": "unavailable"}}
    assert "127.0.0.1" not in r.text and "nonexistent" not in r.text
    _clean(r.text)


def test_key_holders_get_reasons_without_secrets(srv):
    r = httpx.get(f"{srv.base}/ready", headers=srv.headers, timeout=5)
    reasons = r.json()["not_ready"]
    assert MISSING in reasons["broken"] and "127.0.0.1" in reasons["remote"], reasons
    _clean(r.text)
    eps = httpx.get(f"{srv.base}/api/v1/endpoints", headers=srv.headers, timeout=5)
    assert eps.status_code == 200 and "127.0.0.1" in eps.text and MISSING in eps.text, eps.text
    _clean(eps.text)


def test_error_bodies_hold_no_secrets(srv):
    for model in ("remote", "broken"):
        r = httpx.post(f"{srv.api}/completions", headers=srv.headers, timeout=10,
                       json={"model": model, "prompt": "hi", "max_tokens": 1})
        assert r.status_code in (400, 502), r.text
        assert "not ready" in r.json()["error"]["message"] or "upstream" in r.json()["error"]["message"]
        _clean(r.text)


def test_the_log_holds_no_secrets(srv):
    log = srv.log_text()
    assert "endpoint remote ready (['http://***@127.0.0.1:" in log, log   # the URL was logged...
    _clean(log)                                                          # ...without its password
