"""A real `modelyard serve` gateway in front of a scripted upstream (a tiny OpenAI-style server in
this process, on loopback: testkit.upstream): what a client sees when the upstream rejects our configuration,
reports a finish reason, or sends garbage. The prompt (or the chat message) picks the script."""

from __future__ import annotations

import json
from typing import Iterator

import httpx
import pytest

from modelyard.proxy.wire import CHAT_MARKUP_TOKENS
from testkit.servers import served
from testkit.upstream import sse, upstream as scripted_upstream

KEY = "gateway-key"
SECRET = "sk-upstream-0123456789abcdef"     # the key the gateway sends upstream
REMOTE = "remote"
TPM_KEY, TPM = "gateway-tpm-key", 2500
UPSTREAM_DEFAULT = 4000     # what the scripted upstream generates when it is not sent max_tokens

SCRIPTS = {
    "401": (401, {"error": {"message": f"Incorrect API key provided: {SECRET}.", "type": "invalid_request_error",
                            "code": "invalid_api_key"}}),
    "403": (403, {"error": {"message": "Project does not have access to this model"}}),
    "404": (404, {"error": {"message": "The model `org/nope` does not exist or you do not have access to it."}}),
    "400": (400, {"error": {"message": "prompt is too long for this model"}}),
}


def _chunk(text: str = "", finish: str | None = None, chat: bool = False) -> dict:
    choice = ({"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text})
    return {"id": "up", "object": "chat.completion.chunk" if chat else "text_completion",
            "choices": [{**choice, "logprobs": None, "finish_reason": finish}]}


def _events(script: str, chat: bool) -> list[str]:
    usage = {"id": "up", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    if script.startswith("finish:"):
        parts = [_chunk("hel", chat=chat), _chunk("lo", script.split(":", 1)[1], chat=chat), usage]
    elif script == "garbage-first":
        parts = [{"choices": [{"index": 0, "delta": None}]}, _chunk("x", "stop", chat=chat)]
    elif script == "garbage-mid":
        return ["data: " + json.dumps(_chunk("hel", chat=chat)) + "\n\n", "data: {not json\n\n"]
    else:
        parts = [_chunk("ok", "stop", chat=chat), usage]
    return ["data: " + json.dumps(p) + "\n\n" for p in parts] + ["data: [DONE]\n\n"]


async def _long(body: dict, chat: bool):
    n, each = body.get("n", 1), min(body.get("max_tokens") or UPSTREAM_DEFAULT, UPSTREAM_DEFAULT)
    for i in range(n):
        chunk = _chunk("x" * each, "length", chat=chat)
        chunk["choices"][0]["index"] = i
        yield "data: " + json.dumps(chunk) + "\n\n"
    usage = {"prompt_tokens": 3, "completion_tokens": n * each, "total_tokens": 3 + n * each}
    yield "data: " + json.dumps({"id": "up", "choices": [], "usage": usage}) + "\n\n"
    yield "data: [DONE]\n\n"


def _answer(script: str, body: dict, request):
    from starlette.responses import JSONResponse

    chat = "messages" in body
    if script in SCRIPTS:
        status, payload = SCRIPTS[script]
        return JSONResponse(payload, status_code=status)
    if script == "long":     # generates what it is allowed, or (no max_tokens) its own 4000 a choice
        return sse(_long(body, chat))
    return sse(_events(script, chat))


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, list[dict]]]:
    with scripted_upstream(_answer, model="org/model") as (url, seen):
        yield url, seen


@pytest.fixture(scope="module")
def gateway(upstream, tmp_path_factory) -> Iterator[httpx.Client]:
    url, _ = upstream
    config = (f'[server]\napi_keys = ["{KEY}"]\nlog_level = "info"\n\n[[keys]]\nkey = "{TPM_KEY}"\ntpm = {TPM}\n\n'
              f'[[endpoints]]\nname = "{REMOTE}"\n'
              f'engine = "openai"\nurls = ["{url}"]\nupstream_model = "org/model"\napi_key = "{SECRET}"\n')
    with served(tmp_path_factory.mktemp("upstream-http"), config, name="gateway", key=KEY) as srv:
        with httpx.Client(base_url=srv.api, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            yield c


def complete(gateway: httpx.Client, script: str, **extra) -> httpx.Response:
    return gateway.post("/completions", json={"model": REMOTE, "prompt": script, "max_tokens": 4, **extra})


def chat(gateway: httpx.Client, script: str, **extra) -> httpx.Response:
    return gateway.post("/chat/completions", json={"model": REMOTE, "messages": [{"role": "user", "content": script}],
                                                   **extra})


def stream_events(gateway: httpx.Client, script: str) -> tuple[int, list]:
    with gateway.stream("POST", "/completions", json={"model": REMOTE, "prompt": script, "max_tokens": 4,
                                                      "stream": True}) as r:
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    return r.status_code, [line if line == "[DONE]" else json.loads(line) for line in lines]


@pytest.mark.parametrize("status", ["401", "403", "404"])
def test_upstream_rejecting_our_config_is_502_saying_what_it_said(gateway, status):
    for r in (complete(gateway, status), chat(gateway, status)):
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert err["type"] == "upstream_error" and err["code"] == "upstream_misconfigured", err
        assert f"HTTP {status}" in err["message"]
        assert SCRIPTS[status][1]["error"]["message"].split(":")[0].split("`")[0] in err["message"], err
        assert SECRET not in r.text and "sk-upstream" not in r.text


def test_an_upstream_400_is_still_the_clients_400(gateway):
    r = complete(gateway, "400")
    assert r.status_code == 400 and "prompt is too long" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("reason", ["stop", "length", "content_filter", "tool_calls", "function_call"])
def test_openai_finish_reasons_pass_through(gateway, reason):
    r = complete(gateway, f"finish:{reason}")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == reason and r.json()["choices"][0]["text"] == "hello"
    r = chat(gateway, f"finish:{reason}")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == reason
    status, events = stream_events(gateway, f"finish:{reason}")
    assert status == 200 and events[-1] == "[DONE]"
    assert [c["finish_reason"] for e in events[:-1] for c in e["choices"]] == [None, reason]


def test_an_upstream_abort_is_an_error_not_a_stop(gateway):
    r = complete(gateway, "finish:abort")
    assert r.status_code == 502 and "abort" in r.json()["error"]["message"], r.text
    status, events = stream_events(gateway, "finish:abort")
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "upstream_error" and "abort" in events[-2]["error"]["message"]


def test_a_malformed_first_chunk_is_a_502_before_any_header(gateway):
    for r in (complete(gateway, "garbage-first"), chat(gateway, "garbage-first")):
        assert r.status_code == 502, r.text
        assert "malformed chunk" in r.json()["error"]["message"]
    status, events = stream_events(gateway, "garbage-first")
    assert status == 502


def test_garbage_mid_stream_is_an_error_event_or_a_502(gateway):
    r = complete(gateway, "garbage-mid")
    assert r.status_code == 502 and "not JSON" in r.json()["error"]["message"], r.text
    status, events = stream_events(gateway, "garbage-mid")
    assert status == 200 and events[-1] == "[DONE]"
    assert events[0]["choices"][0]["text"] == "hel"
    assert events[-2]["error"]["type"] == "upstream_error", events


def test_chat_without_max_tokens_sends_the_room_its_prompt_leaves(gateway, upstream):
    """The upstream is always sent a max_tokens: a chat without one gets the room its prompt's
    bound leaves in the endpoint's context (2048 here), the most its reservation allowed for."""
    _, seen = upstream
    assert chat(gateway, "finish:stop").status_code == 200
    bound = len(b"finish:stop") + 2 * CHAT_MARKUP_TOKENS
    assert seen[-1]["max_tokens"] == 2048 - bound and seen[-1]["model"] == "org/model"
    assert chat(gateway, "finish:stop", max_tokens=7).status_code == 200
    assert seen[-1]["max_tokens"] == 7
    assert gateway.post("/completions", json={"model": REMOTE, "prompt": "finish:stop"}).status_code == 200
    assert seen[-1]["max_tokens"] == 16              # completions: OpenAI's default, said explicitly
    sent = len(seen)
    r = chat(gateway, "y" * 2100)                     # its bound leaves no room: refused, nothing sent
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    assert "2048" in r.json()["error"]["message"] and len(seen) == sent


def test_a_chat_without_max_tokens_cannot_take_more_than_the_key_s_tpm(gateway, upstream):
    """Issue 20, hole 1: the upstream used to generate up to its own limit (4000 here) on a key
    whose tpm is 2500. Now what is reserved is what it may generate: the tokens served in the
    minute stay within tpm, and a request that could take more than the quota is told so."""
    limited = {"Authorization": f"Bearer {TPM_KEY}"}
    served_tokens, refused = 0, None
    for _ in range(4):
        r = gateway.post("/chat/completions", headers=limited,
                         json={"model": REMOTE, "messages": [{"role": "user", "content": "long"}]})
        if r.status_code == 429:
            refused = r.json()["error"]
            break
        assert r.status_code == 200, r.text
        served_tokens += r.json()["usage"]["total_tokens"]
    assert refused is not None and refused["code"] == "rate_limit_exceeded", refused
    assert 0 < served_tokens <= TPM, served_tokens
    r = gateway.post("/chat/completions", headers=limited,
                     json={"model": REMOTE, "n": 2, "messages": [{"role": "user", "content": "long"}]})
    assert r.status_code == 429 and "more than the whole quota" in r.json()["error"]["message"], r.text


