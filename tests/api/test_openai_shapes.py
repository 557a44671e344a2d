"""Every body, stream chunk and error of the OpenAI-compatible routes has the shape OpenAI's API
defines, checked against the official `openai` package's response types, which its publisher
generates from OpenAI's OpenAPI description (openai/openai-openapi). They are validated in
pydantic's strict mode: required fields present, no type coercion, enums (object, finish_reason,
role) exact.

Where the seed contract differs, the seed wins: 422s are FastAPI's `{"detail": [...]}` (tested
in test_completions_contract), and our extra fields (a model's `state`) are allowed, as the
document allows additional properties. Where OpenAI's live API sends what the document omits,
the live API wins, stated once in `live_api`: `finish_reason` is null in a stream's chunks
before the last of a choice, `usage` is null in every chunk but the final usage chunk, and with
`echo` the prompt's first token has null `token_logprobs` and `top_logprobs` entries (nothing
precedes it to predict it).
"""

from __future__ import annotations

import json

import httpx
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.shared import ErrorObject

from testkit.servers import MODEL

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a colour."}]


def valid(kind, body: dict) -> None:
    kind.model_validate(body, strict=True)


def live_api(body: dict, echo: bool, chunk: bool) -> dict:
    """A completions body or chunk as the document's type reads it, where the live API sends
    nulls the document has no place for: an unfinished choice's finish_reason in a chunk, and
    the echoed first token's logprobs (only that one, only with echo)."""
    out = json.loads(json.dumps(body))
    for choice in out.get("choices", []):
        if chunk and choice.get("finish_reason") is None:
            choice["finish_reason"] = "stop"
        lp = choice.get("logprobs")
        if echo and lp and lp["token_logprobs"] and lp["token_logprobs"][0] is None and not lp["text_offset"][0]:
            lp["token_logprobs"][0] = 0.0
            lp["top_logprobs"][0] = {}
    return out


def events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


COMPLETIONS = [
    {"prompt": PROMPT, "max_tokens": 4},
    {"prompt": [PROMPT, "Once upon a time"], "max_tokens": 3, "n": 2, "temperature": 0.8, "seed": 1},
    {"prompt": PROMPT, "max_tokens": 3, "logprobs": 2, "echo": True},
    {"prompt": PROMPT, "max_tokens": 8, "stop": ["."]},
    {"prompt": [330, 331, 330], "max_tokens": 2, "logprobs": 0},
]


@pytest.mark.parametrize("body", COMPLETIONS)
def test_completions_bodies_and_chunks(client, body):
    r = client.post("/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    echo = bool(body.get("echo"))
    valid(Completion, live_api(r.json(), echo, chunk=False))
    chunks = events(client, "/completions", {"model": MODEL, **body, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    for chunk in chunks:
        valid(Completion, live_api(chunk, echo, chunk=True))
    assert all(c["usage"] is None for c in chunks[:-1])


CHATS = [
    {"messages": CHAT, "max_tokens": 4},
    {"messages": CHAT, "max_tokens": 3, "n": 2, "temperature": 0.9, "seed": 3, "logprobs": True, "top_logprobs": 2},
    {"messages": [{"role": "system", "content": "Be brief."}, *CHAT], "max_completion_tokens": 3, "stop": "\n"},
]


@pytest.mark.parametrize("body", CHATS)
def test_chat_bodies_and_chunks(client, body):
    r = client.post("/chat/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    valid(ChatCompletion, r.json())
    chunks = events(client, "/chat/completions", {"model": MODEL, **body, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    for chunk in chunks:
        valid(ChatCompletionChunk, chunk)     # its finish_reason is nullable in the document
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_models_list(client):
    r = client.get("/models")
    body = r.json()
    assert r.status_code == 200 and body["object"] == "list" and body["data"]
    for entry in body["data"]:
        valid(Model, entry)


@pytest.mark.parametrize("path, body, status", [
    ("/completions", {"model": "nope", "prompt": "x"}, 404),
    ("/completions", {"model": "broken", "prompt": "x"}, 400),
    ("/completions", {"model": MODEL, "prompt": "x" * 3000, "max_tokens": 1}, 400),     # past the context
    ("/chat/completions", {"model": "nope", "messages": CHAT}, 404),
])
def test_errors(client, path, body, status):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    valid(ErrorObject, r.json()["error"])


def test_error_without_a_key(server):
    r = httpx.post(server.api + "/completions", json={"model": MODEL, "prompt": "x"}, timeout=10)
    assert r.status_code == 401
    valid(ErrorObject, r.json()["error"])


def test_a_stream_that_fails_after_its_headers_ends_with_an_error_object(client):
    """A deadline that passes mid-generation: the stream's last event is OpenAI's error object
    (if the machine is so slow that it passes before the first token, the error comes as the
    HTTP body instead: the same object either way)."""
    body = {"model": MODEL, "prompt": PROMPT, "stream": True, "max_tokens": 400,
            "logit_bias": {"0": -100, "1": -100, "2": -100}}     # no end token: it runs until cut
    with client.stream("POST", "/completions", json=body, headers={"X-Request-Timeout": "0.6"}) as r:
        if r.status_code != 200:
            r.read()
            assert r.status_code == 504, r.text
            error = r.json()["error"]
        else:
            data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
            assert data[-1] == "[DONE]" and len(data) >= 3, data[-3:]
            error = json.loads(data[-2])["error"]
            for chunk in data[:-2]:
                valid(Completion, live_api(json.loads(chunk), False, chunk=True))
    valid(ErrorObject, error)
    assert error["type"] == "timeout_error", error
