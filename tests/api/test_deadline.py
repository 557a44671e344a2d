"""A per-request time limit (X-Request-Timeout) ends generation: 504 before the response started,
an error event once streaming; the slot comes back; a bad header value is a 400 naming it."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.model

LONG = {"prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 480,
        "logit_bias": {"0": -100, "2": -100}}   # no end-of-text: it would run to max_tokens


def test_deadline_ends_a_non_streaming_request_with_504(server, client):
    r = client.post("/completions", json={"model": server.model, **LONG},
                    headers={"X-Request-Timeout": "0.5"})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["type"] == "timeout_error"
    assert server.wait_idle(timeout=10)["slots_used"] == 0


def test_deadline_ends_a_stream_with_an_error_event(server, client):
    with client.stream("POST", "/completions", json={"model": server.model, "stream": True, **LONG},
                       headers={"X-Request-Timeout": "1.0"}) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    assert last["error"]["type"] == "timeout_error", last
    texts = [json.loads(d)["choices"][0]["text"] for d in data[:-2]]
    assert texts and len(texts) < 480
    assert server.wait_idle(timeout=10)["slots_used"] == 0


def test_bad_timeout_header_is_a_400_naming_it(server, client):
    r = client.post("/completions", json={"model": server.model, "prompt": "x", "max_tokens": 1},
                    headers={"X-Request-Timeout": "soon"})
    assert r.status_code == 400 and "X-Request-Timeout" in r.json()["error"]["message"]
