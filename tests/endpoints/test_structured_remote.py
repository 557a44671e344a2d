"""Structured output through remote endpoints: the constraint is translated into the fields the
upstream's dialect takes (`upstream_server`), and what it cannot take is a 400, never an
unconstrained answer. The upstream is a second real modelyard, which accepts every dialect, so
each translation is checked end to end: greedy text through the gateway equals the embedded
endpoint's (same model, same engine settings)."""

from __future__ import annotations

import json
from typing import Iterator

import httpx
import pytest

from testkit.servers import ServerProcess, served

pytestmark = pytest.mark.model

KEY = "structured-remote-key"
SMOL = "smollm2-135m"
ENGINE = "context = 512\nparallel = 2\nthreads = 1\n"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "rank"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}}
KINDS = {"remote-openai": "openai", "remote-vllm": "vllm", "remote-llama": "llama-server",
         "remote-modelyard": "modelyard", "remote-ollama": "ollama"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    up_cfg = f'[[endpoints]]\nname = "{SMOL}"\n{ENGINE}'
    with served(tmp_path_factory.mktemp("so-up"), up_cfg, name="upstream") as up:
        remotes = "".join(f'\n[[endpoints]]\nname = "{name}"\nengine = "openai"\nurls = ["{up.base}/v1"]\n'
                          f'upstream_model = "{SMOL}"\nupstream_server = "{kind}"\n' for name, kind in KINDS.items())
        cfg = f'[server]\napi_keys = ["{KEY}"]\n\n[[endpoints]]\nname = "{SMOL}"\n{ENGINE}{remotes}'
        with served(tmp_path_factory.mktemp("so-gw"), cfg, name="gateway", key=KEY) as gw:
            yield gw.base + "/v1"


def ask(api: str, path: str, model: str, **body) -> httpx.Response:
    return httpx.post(f"{api}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                      json={"model": model, "max_tokens": 40, **body})


CASES = [  # (fields, the remote endpoints that take them)
    ({"json_schema": SCHEMA}, ("remote-openai", "remote-vllm", "remote-llama", "remote-modelyard", "remote-ollama")),
    ({"response_format": {"type": "json_object"}},
     ("remote-openai", "remote-vllm", "remote-llama", "remote-modelyard", "remote-ollama")),
    ({"guided_regex": "[A-Z][a-z]{2,8}"}, ("remote-vllm", "remote-modelyard")),
    ({"guided_choice": ["Oslo", "Lima", "Rome"]}, ("remote-vllm", "remote-llama", "remote-modelyard")),
    ({"grammar": 'root ::= "No. " [1-9]'}, ("remote-vllm", "remote-llama", "remote-modelyard")),
]


@pytest.mark.parametrize("fields, takers", CASES, ids=[next(iter(f)) for f, _ in CASES])
def test_each_upstream_dialect_gets_the_constraint_or_a_400(gateway, fields, takers):
    prompt = "A city and its rank, as JSON:"
    local = ask(gateway, "/completions", SMOL, prompt=prompt, **fields)
    assert local.status_code == 200, local.text
    expected = local.json()["choices"][0]
    for name in KINDS:
        r = ask(gateway, "/completions", name, prompt=prompt, **fields)
        if name in takers:
            assert r.status_code == 200, (name, r.text)
            got = r.json()["choices"][0]
            assert (got["text"], got["finish_reason"]) == (expected["text"], expected["finish_reason"]), name
        else:
            assert r.status_code == 400, (name, r.text)
            err = r.json()["error"]
            assert err["param"] == next(iter(fields)) and KINDS[name] in err["message"], err


def test_tools_go_upstream_as_sent_and_its_calls_come_back(gateway):
    """The upstream (a modelyard: its embedded engine constrains the call) makes the call; the
    gateway relays its tool_calls, whole and streamed, whatever the upstream's dialect."""
    messages = [{"role": "user", "content": "Look up Oslo."}]
    calls = {}
    for name in (SMOL, "remote-vllm", "remote-openai"):
        r = ask(gateway, "/chat/completions", name, messages=messages, tools=[TOOL], tool_choice="required")
        assert r.status_code == 200, (name, r.text)
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, (name, choice)
        (call,) = choice["message"]["tool_calls"]
        assert call["id"].startswith("call_") and call["type"] == "function"
        calls[name] = (call["function"]["name"], json.loads(call["function"]["arguments"]))
    assert calls["remote-vllm"] == calls[SMOL] == calls["remote-openai"]
    with httpx.stream("POST", f"{gateway}/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120, json={"model": "remote-openai", "max_tokens": 40, "messages": messages,
                                         "tools": [TOOL], "tool_choice": "required", "stream": True}) as r:
        assert r.status_code == 200
        data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    parts = [tc for d in data for c in d["choices"] for tc in c["delta"].get("tool_calls") or []]
    assert len(parts) == 1 and parts[0]["index"] == 0
    assert (parts[0]["function"]["name"], json.loads(parts[0]["function"]["arguments"])) == calls[SMOL]
    assert data[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # "auto" goes upstream too: this upstream's embedded engine refuses it, and says why
    r = ask(gateway, "/chat/completions", "remote-vllm", messages=messages, tools=[TOOL])
    assert r.status_code == 400 and "tool_choice" in r.json()["error"]["message"], r.text
