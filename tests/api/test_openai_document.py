"""Every OpenAI-compatible route's answers against OpenAI's own published document
(../shared/spec/openai/openapi.yaml) with a JSON Schema validator: whole bodies, every stream
chunk, the models list and error bodies, on the session's server (smollm2-135m) and its
embeddings endpoint. The official client's types are lenient (they let a missing required field
pass); the document is not."""

from __future__ import annotations

import json

import httpx
import pytest

from testkit.openai_document import conforms
from testkit.servers import MODEL

pytestmark = pytest.mark.model

CHAT = [{"role": "user", "content": "Name a colour."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def chunks(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# (echo with logprobs gives the first prompt token a null logprob, as OpenAI's own API and vLLM
# do; the document's number-only arrays leave no room for it, so echo is not among these)
@pytest.mark.parametrize("extra", [{}, {"n": 2, "temperature": 0.8, "seed": 3}, {"logprobs": 2},
                                   {"prompt": ["One", "Two"]}])
def test_completions_bodies_and_chunks(client, extra):
    body = {"model": MODEL, "prompt": "The sky is", "max_tokens": 6, **extra}
    r = client.post("/completions", json=body)
    assert r.status_code == 200, r.text
    conforms("CreateCompletionResponse", r.json())
    for chunk in chunks(client, "/completions", body):
        # The document has no stream schema for legacy completions: a chunk is the response's
        # shape, but OpenAI's own API sends finish_reason null until a choice's last chunk, and
        # usage null in every chunk but the last with include_usage, and so do we. Anything else
        # of each chunk is held to the document.
        assert all(c["finish_reason"] in (None, "stop", "length") for c in chunk["choices"]), chunk
        documented = {k: v for k, v in chunk.items() if not (k == "usage" and v is None)}
        conforms("CreateCompletionResponse", {**documented, "choices": [
            {**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]})


@pytest.mark.parametrize("extra", [{}, {"n": 2, "temperature": 0.8, "seed": 3}, {"logprobs": True, "top_logprobs": 2},
                                   {"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                       "function": {"name": "get_weather"}}},
                                   {"response_format": {"type": "json_object"}}])
def test_chat_bodies_and_chunks(client, extra):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 24, **extra}
    r = client.post("/chat/completions", json=body)
    assert r.status_code == 200, r.text
    conforms("CreateChatCompletionResponse", r.json())
    for chunk in chunks(client, "/chat/completions", body):
        conforms("CreateChatCompletionStreamResponse", chunk)


def test_models_list_and_errors(client):
    r = client.get("/models")
    assert r.status_code == 200
    conforms("ListModelsResponse", r.json())
    for status, request in ((404, {"model": "nope", "prompt": "x"}),                  # unknown endpoint
                            (400, {"model": MODEL, "prompt": "x" * 4000, "max_tokens": 1})):   # context overflow
        r = client.post("/completions", json=request)
        assert r.status_code == status, r.text
        conforms("ErrorResponse", r.json())
    r = client.post("/completions", json={"model": MODEL, "prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    conforms("ErrorResponse", r.json())
