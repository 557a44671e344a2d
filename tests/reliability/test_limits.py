"""Hostile sizes: every request limit answers a 4xx that names the field (or the body), the limit
and the value sent, before any engine work. Server: [limits] max_body_bytes = 2000, the other
limits at their defaults (max_n 16, max_stop 4, max_stop_chars 200, max_logprobs 5,
max_prompts 16), context 256, parallel 2."""

from __future__ import annotations

import json

import httpx
import pytest

from helpers import assert_openai_error, assert_validation_error, config, live_server

pytestmark = pytest.mark.model

MAX_BODY = 2000
CONTEXT = 256
PARALLEL = 2
TIMEOUT = httpx.Timeout(30.0, connect=10.0)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    cfg = config(parallel=PARALLEL, context=CONTEXT, extra=f"[limits]\nmax_body_bytes = {MAX_BODY}\n")
    with live_server(tmp_path_factory.mktemp("limits"), cfg) as s:
        yield s
        ep = s.wait_idle()
        assert ep["in_flight"] == 0 and ep["slots_used"] == 0, ep


def _post(srv, body: dict | bytes, route: str = "completions", **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{srv.api}/{route}", content=content, timeout=TIMEOUT,
                      headers={**srv.headers, "Content-Type": "application/json"}, **kw)


def _only_detail(r: httpx.Response, field: str) -> dict:
    assert r.status_code == 422, r.text
    detail = assert_validation_error(r.json())
    assert len(detail) == 1, detail
    d = detail[0]
    assert d["loc"] == ["body", field], d
    return d


# -- 413: the body ------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_body_over_max_body_bytes_is_413_naming_both_sizes(srv, route):
    filler = "x" * 2500
    body = ({"model": srv.model, "prompt": filler, "max_tokens": 1} if route == "completions"
            else {"model": srv.model, "messages": [{"role": "user", "content": filler}], "max_tokens": 1})
    content = json.dumps(body).encode()
    assert len(content) > MAX_BODY
    r = _post(srv, content, route)
    assert r.status_code == 413, r.text
    err = assert_openai_error(r.json(), "invalid_request_error")
    assert str(MAX_BODY) in err["message"] and str(len(content)) in err["message"], err


def test_chunked_body_over_the_limit_is_413_too(srv):
    """No Content-Length to trust: the limit is counted as the body streams in."""
    def chunks():
        yield b'{"model": "' + srv.model.encode() + b'", "prompt": "'
        for _ in range(10):
            yield b"y" * 400
        yield b'", "max_tokens": 1}'
    r = httpx.post(f"{srv.api}/completions", content=chunks(), timeout=TIMEOUT,
                   headers={**srv.headers, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    err = assert_openai_error(r.json(), "invalid_request_error")
    assert str(MAX_BODY) in err["message"], err
    sizes = [int(w) for w in err["message"].split() if w.isdigit()]
    assert any(s > MAX_BODY for s in sizes), err      # how much it had read when it stopped


def test_body_just_under_the_limit_is_served(srv):
    body = {"model": srv.model, "prompt": "Hi", "max_tokens": 1}
    # padded with a field the server ignores (`user` itself is bounded: 256 characters)
    pad = MAX_BODY - len(json.dumps({**body, "x_pad": ""}).encode())
    body["x_pad"] = "u" * pad
    assert len(json.dumps(body).encode()) == MAX_BODY
    r = _post(srv, body)
    assert r.status_code == 200, r.text


# -- 422: settings limits on fields -------------------------------------------------------

def _names(d: dict, limit: int, value: int) -> None:
    assert str(limit) in d["msg"] and str(value) in d["msg"], d


def test_n_over_max_n(srv):
    d = _only_detail(_post(srv, {"model": srv.model, "prompt": "Hi", "n": 17, "max_tokens": 1}), "n")
    _names(d, 16, 17)


def test_chat_n_over_max_n(srv):
    r = _post(srv, {"model": srv.model, "messages": [{"role": "user", "content": "Hi"}], "n": 40,
                    "max_tokens": 1}, "chat/completions")
    _names(_only_detail(r, "n"), 16, 40)


def test_n_over_parallel_names_n_and_both_numbers(srv):
    """Within max_n but above what the endpoint decodes at once: a 400 on n."""
    r = _post(srv, {"model": srv.model, "prompt": "Hi", "n": PARALLEL + 1, "max_tokens": 1})
    assert r.status_code == 400, r.text
    err = assert_openai_error(r.json(), "invalid_request_error")
    assert err["param"] == "n" and str(PARALLEL + 1) in err["message"] and str(PARALLEL) in err["message"]


def test_too_many_stop_strings(srv):
    stops = ["a", "b", "c", "d", "e"]
    d = _only_detail(_post(srv, {"model": srv.model, "prompt": "Hi", "stop": stops, "max_tokens": 1}),
                     "stop")
    _names(d, 4, 5)


def test_too_long_stop_string(srv):
    d = _only_detail(_post(srv, {"model": srv.model, "prompt": "Hi", "stop": ["z" * 201], "max_tokens": 1}),
                     "stop")
    _names(d, 200, 201)


def test_chat_too_long_stop_string(srv):
    r = _post(srv, {"model": srv.model, "messages": [{"role": "user", "content": "Hi"}],
                    "stop": "q" * 333, "max_tokens": 1}, "chat/completions")
    _names(_only_detail(r, "stop"), 200, 333)


def test_too_many_prompts(srv):
    d = _only_detail(_post(srv, {"model": srv.model, "prompt": ["p"] * 17, "max_tokens": 1}), "prompt")
    _names(d, 16, 17)


def test_logprobs_6(srv):
    d = _only_detail(_post(srv, {"model": srv.model, "prompt": "Hi", "logprobs": 6, "max_tokens": 1}),
                     "logprobs")
    assert d["input"] == 6, d
    assert "5" in d["msg"], d


def test_logprobs_5_is_served(srv):
    r = _post(srv, {"model": srv.model, "prompt": "Hi", "logprobs": 5, "max_tokens": 1})
    assert r.status_code == 200, r.text
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    assert 1 <= len(top) <= 6


# -- 400: the context --------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [CONTEXT + 44, 10**9])
def test_max_tokens_above_context(srv, max_tokens):
    r = _post(srv, {"model": srv.model, "prompt": "Hi", "max_tokens": max_tokens})
    assert r.status_code == 400, r.text
    err = assert_openai_error(r.json(), "invalid_request_error")
    assert err["param"] == "max_tokens", err
    assert str(CONTEXT) in err["message"] and str(max_tokens) in err["message"], err


def test_chat_max_tokens_above_context(srv):
    r = _post(srv, {"model": srv.model, "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 1000}, "chat/completions")
    assert r.status_code == 400, r.text
    err = assert_openai_error(r.json(), "invalid_request_error")
    assert err["param"] == "max_tokens" and str(CONTEXT) in err["message"] and "1000" in err["message"], err


def test_limits_cost_no_engine_work(srv):
    """After all of the above the endpoint holds nothing."""
    ep = srv.wait_idle()
    assert ep["state"] == "ready" and ep["in_flight"] == 0 and ep["slots_used"] == 0, ep
