"""Request fields whose defaults or validation a real client trips over, against the session's
real server (tests/conftest.py: smollm2-135m, context 512, parallel 4)."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.model

MODEL = "smollm2-135m"
CONTEXT = 512
# SmolLM2's end-of-text and end-of-turn tokens, banned so that greedy text runs to its limit.
NO_EOG = {"0": -100, "2": -100}


# -- logit_bias keys -----------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["²", "٣", "-1", "+1", "1.0", " 1", "1e3", "0x10", "07", "", "abc"])
@pytest.mark.parametrize("route", ["/completions", "/chat/completions"])
def test_a_logit_bias_key_that_is_not_a_token_id_is_422_naming_it(client, route, key):
    body = {"model": MODEL, "max_tokens": 2, "logit_bias": {key: 1}}
    body.update({"prompt": "hi"} if route == "/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    r = client.post(route, json=body)
    assert r.status_code == 422, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert [d["loc"] for d in detail] == [["body", "logit_bias", key, "[key]"]], detail
    assert "token ids" in detail[0]["msg"] and detail[0]["input"] == key


# -- max_tokens defaults -------------------------------------------------------------------------

def _chat(client: httpx.Client, content: str, **extra) -> httpx.Response:
    return client.post("/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": content}],
                                                  **extra})


def test_chat_without_max_tokens_generates_up_to_the_room_left_in_the_context(client):
    # A long message leaves a little room (about 60 tokens): cheap to fill, far above 16.
    r = _chat(client, " ".join(["dragon"] * 440), logit_bias=NO_EOG)
    assert r.status_code == 200, r.text
    body = r.json()
    usage = body["usage"]
    assert usage["completion_tokens"] > 16, usage
    assert usage["prompt_tokens"] + usage["completion_tokens"] == CONTEXT, usage
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_max_tokens_or_max_completion_tokens_still_limit(client):
    for field in ("max_tokens", "max_completion_tokens"):
        r = _chat(client, "Write a long story about a dragon.", logit_bias=NO_EOG, **{field: 20})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 20, (field, r.json()["usage"])


def test_chat_whose_prompt_fills_the_context_is_400_naming_the_numbers(client):
    r = _chat(client, " ".join(["dragon"] * 600))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and str(CONTEXT) in err["message"] and "no room" in err["message"], err


def test_completions_keep_openai_default_of_16(client):
    r = client.post("/completions", json={"model": MODEL, "prompt": "Once upon a time", "logit_bias": NO_EOG})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16
    assert r.json()["choices"][0]["finish_reason"] == "length"


# -- one pipeline: both routes stream the same way -------------------------------------------------

@pytest.mark.parametrize("route, body", [
    ("/completions", {"prompt": "hi"}),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_both_routes_stream_with_the_same_headers(client, route, body):
    with client.stream("POST", route, json={"model": MODEL, "max_tokens": 2, "stream": True, **body}) as r:
        assert r.status_code == 200
        r.read()
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-store" and r.headers["x-accel-buffering"] == "no"
