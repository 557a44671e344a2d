"""Chat completions: the prompt each default model's chat template renders, and
POST /chat/completions over HTTP on a gateway serving

    smollm2-135m   embedded; its GGUF carries a Jinja chat template (ChatML)
    gemma3-270m    embedded; its GGUF has none, so llama.cpp's built-in "gemma" format is used
    remote-smol    engine "openai" over a second modelyard process serving smollm2-135m (with an
                   API key of its own), so chat passes through to the upstream's /chat/completions

Greedy unless said otherwise, small max_tokens, one engine thread each (the machine is shared),
loopback only; both processes are stopped by PID.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import httpx
import pytest

from testkit.servers import OPENAI_PREFIX, ServerProcess, served, side_by_side_config
from testkit.until import until

from modelyard import settings as settings_mod
from modelyard.local.chat_template import ChatTemplate
from modelyard.local.ffi import LlamaModel
from modelyard.store import ModelStore

pytestmark = pytest.mark.model

KEY = "chat-key"
UPSTREAM_KEY = "chat-upstream-key"
SMOL, GEMMA, REMOTE = "smollm2-135m", "gemma3-270m", "remote-smol"

SYSTEM_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
MULTI_TURN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "How are you?"}]
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

EXPECTED = {
    SMOL: {
        "system_user": ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                        "<|im_start|>user\nHi there<|im_end|>\n"
                        "<|im_start|>assistant\n"),
        "user": (f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n"
                 "<|im_start|>user\nHi there<|im_end|>\n"
                 "<|im_start|>assistant\n"),
        "multi_turn": (f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n"
                       "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                       "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"),
    },
    GEMMA: {
        # llama.cpp's gemma format has no system turn: the system text opens the first user turn.
        "system_user": ("<start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
                        "<start_of_turn>model\n"),
        "user": "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
        "multi_turn": ("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                       "<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\n"),
    },
}
CONVERSATIONS = {"system_user": SYSTEM_USER, "user": SYSTEM_USER[1:], "multi_turn": MULTI_TURN}


# -- the templates (no server) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def models() -> Iterator[dict[str, LlamaModel]]:
    store = ModelStore(settings_mod.load(env=os.environ).store_dir, progress=False)
    loaded = {name: LlamaModel(store.resolve(name)) for name in (SMOL, GEMMA)}
    try:
        yield loaded
    finally:
        for m in loaded.values():
            m.close()


def prompt_tokens(model: LlamaModel, text: str) -> int:
    """What the embedded engine feeds llama.cpp for a rendered chat (see prepare.prompt_ids)."""
    bos = model.bos_text
    return len(model.tokenize(text, add_special=not (bos and text.startswith(bos))))


def test_smollm2_renders_its_ggufs_jinja_template(models):
    model = models[SMOL]
    source = model.chat_template()
    assert source and "<|im_start|>" in source          # the GGUF ships a Jinja template
    tpl = ChatTemplate(model)
    assert tpl.available and tpl.builtin is None
    for name, messages in CONVERSATIONS.items():
        assert tpl.render(messages) == EXPECTED[SMOL][name], name


def test_gemma3_has_no_template_and_uses_llamacpps_gemma_format(models):
    model = models[GEMMA]
    assert not model.chat_template()
    assert model.meta("general.architecture") == "gemma3"
    tpl = ChatTemplate(model)
    assert tpl.available and tpl.builtin == "gemma"
    for name, messages in CONVERSATIONS.items():
        assert tpl.render(messages) == EXPECTED[GEMMA][name], name


# -- over HTTP ------------------------------------------------------------------------------------

ENGINE = "context = 512\nparallel = 2\nthreads = 1\n"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("chat-up"),
                f'[server]\napi_keys = ["{UPSTREAM_KEY}"]\nlog_level = "info"\n\n'
                f'[[endpoints]]\nname = "{SMOL}"\nmodel = "{SMOL}"\n{ENGINE}',
                name="upstream", key=UPSTREAM_KEY) as p:
        yield p


@pytest.fixture(scope="module")
def gateway(upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("chat-gw"), side_by_side_config(KEY, upstream.api, UPSTREAM_KEY),
                name="gateway", key=KEY) as p:
        yield p


@pytest.fixture(scope="module")
def api(gateway: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.api, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as c:
        yield c


def chat(api: httpx.Client, model: str, messages=SYSTEM_USER, **body) -> dict:
    r = api.post("/chat/completions", json={"model": model, "messages": messages, "max_tokens": 12,
                                            "temperature": 0, **body})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == model and out["id"].startswith("chatcmpl-")
    return out


def chat_stream(api: httpx.Client, model: str, messages=SYSTEM_USER, **body) -> list[dict]:
    """Every SSE event's JSON, in order; the stream must end with [DONE]."""
    events, done = [], False
    with api.stream("POST", "/chat/completions",
                    json={"model": model, "messages": messages, "max_tokens": 12, "temperature": 0,
                          "stream": True, **body}) as r:
        assert r.status_code == 200, r.read().decode()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            assert not done, "data after [DONE]"
            if line == "data: [DONE]":
                done = True
                continue
            events.append(json.loads(line[6:]))
    assert done, "the stream did not end with [DONE]"
    assert all("error" not in e for e in events), events
    return events


def counts(usage: dict) -> dict:
    """A usage's token counts (what the prefix cache held, cached_tokens, depends on what ran before)."""
    return {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def deltas_by_choice(events: list[dict]) -> dict[int, list[dict]]:
    by: dict[int, list[dict]] = {}
    for e in events:
        for c in e["choices"]:
            by.setdefault(c["index"], []).append(c)
    return by


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_http_prompt_is_the_rendered_template(api, models, name):
    """usage.prompt_tokens is exactly the token count of the template's rendering."""
    for key, messages in CONVERSATIONS.items():
        out = chat(api, name, messages, max_tokens=1)
        assert out["usage"]["prompt_tokens"] == prompt_tokens(models[name], EXPECTED[name][key]), key


@pytest.mark.parametrize("name", [SMOL, GEMMA, REMOTE])
def test_streamed_deltas_equal_the_message(api, name):
    whole = chat(api, name)
    choice = whole["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert content and choice["finish_reason"] in ("length", "stop")

    events = chat_stream(api, name, stream_options={"include_usage": True})
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert {e["model"] for e in events} == {name} and len({e["id"] for e in events}) == 1
    deltas = deltas_by_choice(events)[0]
    assert deltas[0]["delta"]["role"] == "assistant"
    assert all("role" not in d["delta"] for d in deltas[1:])
    assert "".join(d["delta"].get("content") or "" for d in deltas) == content
    assert [d["finish_reason"] for d in deltas if d["finish_reason"]] == [choice["finish_reason"]]
    assert events[-1]["choices"] == [] and counts(events[-1]["usage"]) == counts(whole["usage"])


def test_openai_client_streams_chat(gateway):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=gateway.api, api_key=KEY, max_retries=0, timeout=60) as client:
        whole = client.chat.completions.create(model=SMOL, messages=SYSTEM_USER, max_tokens=8, temperature=0)
        chunks = list(client.chat.completions.create(model=SMOL, messages=SYSTEM_USER, max_tokens=8,
                                                     temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.choices[0].message.content


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_n2_with_seed_is_reproducible(api, name):
    body = {"n": 2, "seed": 1234, "temperature": 0.9, "max_tokens": 8}
    first = chat(api, name, **body)
    again = chat(api, name, **body)
    assert [c["index"] for c in first["choices"]] == [0, 1]
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert all(c["message"]["role"] == "assistant" for c in first["choices"])
    assert first["usage"]["completion_tokens"] <= 16 and counts(first["usage"]) == counts(again["usage"])
    # streamed: both choices, each opening with the role, each the same text as above
    by = deltas_by_choice(chat_stream(api, name, **body))
    assert sorted(by) == [0, 1]
    for i, deltas in by.items():
        assert deltas[0]["delta"]["role"] == "assistant"
        assert "".join(d["delta"].get("content") or "" for d in deltas) == texts[i]


@pytest.mark.parametrize("name", [SMOL, REMOTE])
def test_stop_ends_before_the_stop_string(api, name):
    full = chat(api, name, max_tokens=16)["choices"][0]["message"]["content"]
    assert len(full) > 8, full
    stop = full[5:8]                                # three characters from inside the greedy text
    cut = full[:full.index(stop)]
    out = chat(api, name, max_tokens=16, stop=[stop, "\u2603never"])
    choice = out["choices"][0]
    assert choice["message"]["content"] == cut and choice["finish_reason"] == "stop"
    events = chat_stream(api, name, max_tokens=16, stop=stop)
    assert "".join(d["delta"].get("content") or "" for d in deltas_by_choice(events)[0]) == cut


@pytest.mark.parametrize("name", [SMOL, GEMMA, REMOTE])
def test_logprobs_have_openais_chat_shape(api, name):
    out = chat(api, name, max_tokens=4, logprobs=True, top_logprobs=2)
    choice = out["choices"][0]
    items = choice["logprobs"]["content"]
    assert len(items) == out["usage"]["completion_tokens"] == 4
    for item in items:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert isinstance(item["token"], str) and isinstance(item["logprob"], float) and item["logprob"] <= 0
        assert item["bytes"] == list(item["token"].encode())
        assert len(item["top_logprobs"]) == 2
        for alt in item["top_logprobs"]:
            assert set(alt) == {"token", "logprob", "bytes"} and alt["bytes"] == list(alt["token"].encode())
        assert item["top_logprobs"][0]["token"] == item["token"]          # greedy takes the top one
        assert item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][1]["logprob"]
    assert "".join(i["token"] for i in items) == choice["message"]["content"]
    # without logprobs: null
    assert chat(api, name, max_tokens=2)["choices"][0]["logprobs"] is None
    # streamed: each content chunk carries its tokens' logprobs
    deltas = deltas_by_choice(chat_stream(api, name, max_tokens=4, logprobs=True, top_logprobs=2))[0]
    streamed = [i for d in deltas if d["logprobs"] for i in d["logprobs"]["content"]]
    assert [i["token"] for i in streamed] == [i["token"] for i in items]


@pytest.mark.parametrize("name", [SMOL, GEMMA, REMOTE])
def test_max_completion_tokens_caps_the_completion(api, name):
    out = chat(api, name, max_tokens=10, max_completion_tokens=3)    # the newer field wins
    assert out["usage"]["completion_tokens"] == 3 and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 3
    assert chat(api, name, max_tokens=2)["usage"]["completion_tokens"] == 2


def _chat_lines(upstream: ServerProcess) -> int:
    """Chat completions the upstream logged as answered."""
    return upstream.log.read_text(errors="replace").count(
        f'"route": "{OPENAI_PREFIX}/chat/completions", "status": 200')


def test_remote_chat_passes_through_to_the_upstream(api, upstream):
    before = _chat_lines(upstream)
    out = chat(api, REMOTE, max_tokens=10)
    # the upstream's own answer to the same conversation, asked directly
    direct = httpx.post(f"{upstream.api}/chat/completions", timeout=60,
                        headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
                        json={"model": SMOL, "messages": SYSTEM_USER, "max_tokens": 10, "temperature": 0})
    assert direct.status_code == 200, direct.text
    assert out["model"] == REMOTE and direct.json()["model"] == SMOL
    assert out["choices"][0]["message"] == direct.json()["choices"][0]["message"]
    assert counts(out["usage"]) == counts(direct.json()["usage"])      # the upstream's own counts, passed on
    # the upstream served both on /chat/completions (not a /completions of a prompt we rendered)
    until(lambda: _chat_lines(upstream) >= before + 2, 5, "both in the upstream's log")
    assert _chat_lines(upstream) == before + 2


def test_remote_greedy_chat_equals_embedded(api):
    """Same model, same engine settings, same template: the same greedy reply either way."""
    assert chat(api, REMOTE)["choices"][0]["message"] == chat(api, SMOL)["choices"][0]["message"]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


@pytest.mark.parametrize("name", [SMOL, REMOTE])
def test_an_agent_loop_sends_its_calls_and_their_results_back(api, models, name):
    """The turn after a tool call carries the assistant's tool_calls and a tool message with
    the result: the model sees both (they used to be dropped, the message read as content only),
    embedded (SmolLM2's ChatML writes no calls: they go in as the turn's text) and remote."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    called = chat(api, name, ask, tools=[WEATHER],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40)
    [call] = called["choices"][0]["message"]["tool_calls"]
    history = ask + [called["choices"][0]["message"],
                     {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 24 degrees"}]
    answered = chat(api, name, history, tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert answered["choices"][0]["message"]["content"]
    without_call = chat(api, name, ask + [{"role": "assistant", "content": ""}, history[-1]], tools=[WEATHER],
                        tool_choice="none", max_tokens=1)
    assert answered["usage"]["prompt_tokens"] > without_call["usage"]["prompt_tokens"]
    if name == SMOL:       # exactly the template's rendering of the call, written as the turn's text
        text = json.dumps({"name": "get_weather", "arguments": json.loads(call["function"]["arguments"])},
                          ensure_ascii=False)
        tpl = models[SMOL]
        expected = ChatTemplate(tpl).render(ask + [{"role": "assistant", "content": text}, history[-1]], [WEATHER])
        assert answered["usage"]["prompt_tokens"] == prompt_tokens(tpl, expected)


def test_tool_fields_on_the_wrong_role_are_422(api):
    r = api.post("/chat/completions", json={"model": SMOL, "messages": [
        {"role": "user", "content": "x", "tool_calls": [{"id": "c", "type": "function",
                                                        "function": {"name": "f", "arguments": "{}"}}]}]})
    assert r.status_code == 422 and "tool_calls belong to assistant messages" in r.text, r.text
