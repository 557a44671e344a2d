"""GET /models, /ready and /api/v1/endpoints against the session's real server, which serves
one ready endpoint (smollm2-135m) and one that failed to load (broken: its file is missing)."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.model

MODEL = "smollm2-135m"
MISSING = "/nonexistent/x.gguf"


@pytest.mark.parametrize("prefix", ["/api/v1/compatibility/openai/v1", "/v1"])
def test_models_lists_endpoints_with_state(server, prefix):
    r = httpx.get(f"{server.base}{prefix}/models", headers=server.headers, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {MODEL, "broken"}
    for m in body["data"]:
        assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]
    assert by_id[MODEL]["state"] == "ready" and by_id[MODEL]["ready"] is True
    assert by_id["broken"]["state"] == "failed" and by_id["broken"]["ready"] is False
    assert (by_id[MODEL]["model_type"], by_id[MODEL]["model_engine"]) == ("COMPLETIONS", "LLAMA_CPP")
    # broken's file never opened: its kind is unknown (a store model or a GGUF header tells it)
    assert (by_id["broken"]["model_type"], by_id["broken"]["model_engine"]) == (None, "LLAMA_CPP")


def test_models_needs_the_key(server):
    r = httpx.get(f"{server.api}/models", timeout=10)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_openai_client_lists_models(server):
    openai = pytest.importorskip("openai")
    ids = {m.id for m in openai.OpenAI(base_url=server.api, api_key=server.key, max_retries=0).models.list()}
    assert ids == {MODEL, "broken"}


def test_ready_is_503_listing_the_failed_endpoint_by_state(server):
    r = httpx.get(f"{server.base}/ready", timeout=10)      # open: no key, so states only
    assert r.status_code == 503, r.text
    assert r.json() == {"status": "not ready", "not_ready": {"broken": "failed"}}
    assert "nonexistent" not in r.text and "Error" not in r.text


def test_ready_gives_reasons_to_a_key_holder(server):
    r = httpx.get(f"{server.base}/ready", headers=server.headers, timeout=10)
    assert r.status_code == 503, r.text
    body = r.json()
    assert set(body["not_ready"]) == {"broken"}
    assert body["not_ready"]["broken"].startswith("failed") and MISSING in body["not_ready"]["broken"]
    wrong = httpx.get(f"{server.base}/ready", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert wrong.json()["not_ready"] == {"broken": "failed"}


def test_health_is_200_even_with_a_failed_endpoint(server):
    r = httpx.get(f"{server.base}/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_endpoints_show_states_and_reasons(server):
    server.wait_idle()
    r = httpx.get(f"{server.base}/api/v1/endpoints", headers=server.headers, timeout=10)
    assert r.status_code == 200, r.text
    eps = {e["name"]: e for e in r.json()["endpoints"]}
    assert set(eps) == {MODEL, "broken"}
    ok, bad = eps[MODEL], eps["broken"]
    assert ok["state"] == "ready" and ok["ready"] is True and ok["reason"] is None
    assert ok["engine"] == "llamacpp" and ok["model"] == MODEL and ok["model_path"].endswith(".gguf")
    assert (ok["model_type"], ok["model_engine"]) == ("COMPLETIONS", "LLAMA_CPP")
    assert (ok["slots_total"], ok["slots_used"], ok["in_flight"], ok["queue_depth"]) == (4, 0, 0, 0), ok
    assert bad["state"] == "failed" and bad["ready"] is False
    assert MISSING in bad["reason"] and bad["model_path"] is None


def test_one_endpoint(server):
    r = httpx.get(f"{server.base}/api/v1/endpoints/broken", headers=server.headers, timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "failed"
    r = httpx.get(f"{server.base}/api/v1/endpoints/nope", headers=server.headers, timeout=10)
    assert r.status_code == 404
    assert "nope" in r.json()["error"]["message"]


def test_endpoints_need_the_key(server):
    assert httpx.get(f"{server.base}/api/v1/endpoints", timeout=10).status_code == 401
    assert httpx.get(f"{server.base}/api/v1/endpoints/{MODEL}", timeout=10).status_code == 401
