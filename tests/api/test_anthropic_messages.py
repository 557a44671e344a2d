"""Anthropic's Messages API, driven by Anthropic's official `anthropic` client over real HTTP: a
gateway serving smollm2-135m embedded and "remote-smol", an openai-engine endpoint over a
second modelyard process serving smollm2-135m. Greedy (temperature 0), small max_tokens, one
engine thread each; both processes are stopped by PID."""

from __future__ import annotations

import json
from typing import Iterator

import anthropic
import httpx
import pytest

from testkit.servers import ServerProcess, served

pytestmark = pytest.mark.model

KEY, UPSTREAM_KEY = "anthropic-key", "anthropic-upstream-key"
SMOL, REMOTE = "smollm2-135m", "remote-smol"
ENGINE = "context = 1024\nparallel = 2\nthreads = 1\n"
ASK = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0}     # the current client sends no sampling fields; the API still takes them
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def fed(msg) -> int:
    """The input tokens the model was fed: Anthropic counts those read from the cache apart."""
    return msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("anthropic-up"),
                f'[server]\napi_keys = ["{UPSTREAM_KEY}"]\n\n[[endpoints]]\nname = "{SMOL}"\n{ENGINE}',
                name="upstream", key=UPSTREAM_KEY) as p:
        yield p


@pytest.fixture(scope="module")
def gateway(upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = (f'[server]\napi_keys = ["{KEY}"]\n\n[[endpoints]]\nname = "{SMOL}"\n{ENGINE}\n'
              f'[[endpoints]]\nname = "{REMOTE}"\nengine = "openai"\nurls = ["{upstream.api}"]\n'
              f'upstream_model = "{SMOL}"\napi_key = "{UPSTREAM_KEY}"\ncontext = 1024\n')
    with served(tmp_path_factory.mktemp("anthropic-gw"), config, name="gateway", key=KEY,
                endpoints=(SMOL, REMOTE)) as p:
        yield p


@pytest.fixture(scope="module")
def client(gateway: ServerProcess) -> Iterator[anthropic.Anthropic]:
    # the client sends its key as x-api-key and appends /v1/messages to the base URL
    with anthropic.Anthropic(base_url=gateway.base, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.mark.parametrize("model", [SMOL, REMOTE])
def test_create_answers_what_chat_answers_in_anthropic_s_shape(client, gateway, model):
    msg = client.messages.create(model=model, max_tokens=12, extra_body=GREEDY, messages=ASK,
                                 system="You are terse.")
    assert msg.type == "message" and msg.role == "assistant" and msg.model == model and msg.id.startswith("msg_")
    [block] = msg.content
    assert block.type == "text" and block.text
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None
    assert 0 < msg.usage.output_tokens <= 12 and msg.usage.input_tokens > 0
    chat = httpx.post(f"{gateway.api}/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                      json={"model": model, "max_tokens": 12, "temperature": 0,
                            "messages": [{"role": "system", "content": "You are terse."}, *ASK]}).json()
    assert chat["choices"][0]["message"]["content"] == block.text           # one pipeline, two shapes
    fed = msg.usage.input_tokens + msg.usage.cache_read_input_tokens      # Anthropic counts cache reads apart
    assert (chat["usage"]["prompt_tokens"], chat["usage"]["completion_tokens"]) == (fed, msg.usage.output_tokens)


@pytest.mark.parametrize("model", [SMOL, REMOTE])
def test_stream_events_rebuild_the_same_message(client, model):
    whole = client.messages.create(model=model, max_tokens=16, extra_body=GREEDY, messages=ASK)
    with client.messages.stream(model=model, max_tokens=16, extra_body=GREEDY, messages=ASK) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert final.content[0].text == whole.content[0].text
    assert (final.stop_reason, fed(final), final.usage.output_tokens) == (
        whole.stop_reason, fed(whole), whole.usage.output_tokens)


def test_a_stop_sequence_is_named_as_the_stop_reason(client):
    text = client.messages.create(model=SMOL, max_tokens=24, extra_body=GREEDY, messages=ASK).content[0].text
    stop = text.split()[1]                          # a word the greedy answer writes
    msg = client.messages.create(model=SMOL, max_tokens=24, extra_body=GREEDY, messages=ASK, stop_sequences=[stop])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert stop not in msg.content[0].text and text.startswith(msg.content[0].text)


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_use_and_its_tool_result_turn(client, stream):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = {"type": "tool", "name": "get_weather"}
    if stream:
        with client.messages.stream(model=SMOL, max_tokens=48, extra_body=GREEDY, messages=ask, tools=[WEATHER],
                                    tool_choice=forced) as s:
            msg = s.get_final_message()
    else:
        msg = client.messages.create(model=SMOL, max_tokens=48, extra_body=GREEDY, messages=ask, tools=[WEATHER],
                                     tool_choice=forced)
    [use] = msg.content
    assert use.type == "tool_use" and use.name == "get_weather" and isinstance(use.input.get("city"), str)
    assert msg.stop_reason == "tool_use" and use.id.startswith("toolu_")
    turn = ask + [{"role": "assistant", "content": [use.model_dump()]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": "Sunny, 24 degrees"}]}]
    answer = client.messages.create(model=SMOL, max_tokens=8, extra_body=GREEDY, messages=turn, tools=[WEATHER],
                                    tool_choice={"type": "none"})
    assert answer.content[0].type == "text" and answer.content[0].text
    # the call and its result reached the model: more input than the same turns without them
    bare = client.messages.count_tokens(model=SMOL, messages=ask + [{"role": "assistant", "content": "ok"},
                                                                   {"role": "user", "content": "go on"}],
                                        tools=[WEATHER])
    assert fed(answer) > bare.input_tokens


def test_count_tokens_is_what_create_is_fed(client):
    counted = client.messages.count_tokens(model=SMOL, messages=ASK, system="You are terse.")
    msg = client.messages.create(model=SMOL, max_tokens=1, extra_body=GREEDY, messages=ASK, system="You are terse.")
    assert counted.input_tokens == fed(msg) > 0
    with pytest.raises(anthropic.BadRequestError) as err:        # a remote endpoint's tokenizer is the upstream's
        client.messages.count_tokens(model=REMOTE, messages=ASK)
    assert err.value.body["error"]["type"] == "invalid_request_error" and "remote" in err.value.body["error"]["message"]


def test_errors_come_in_anthropic_s_shape(gateway, client):
    with pytest.raises(anthropic.AuthenticationError) as err:
        with anthropic.Anthropic(base_url=gateway.base, api_key="wrong", max_retries=0) as other:
            other.messages.create(model=SMOL, max_tokens=4, messages=ASK)
    assert err.value.body == {"type": "error", "error": {"type": "authentication_error", "message": "invalid API key"}}
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="nope", max_tokens=4, messages=ASK)
    assert err.value.body["error"]["type"] == "not_found_error"
    r = httpx.post(f"{gateway.base}/v1/messages", headers={"x-api-key": KEY}, timeout=30,
                   json={"model": SMOL, "messages": ASK})                           # no max_tokens
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{gateway.base}/v1/messages", headers={"x-api-key": KEY}, timeout=30,
                   json={"model": SMOL, "max_tokens": 4, "messages": ASK, "thinking": {"type": "enabled"}})
    assert r.status_code == 400 and "thinking" in r.json()["error"]["message"], r.text     # refused, not ignored


def test_the_compatibility_prefix_serves_it_too(gateway):
    with anthropic.Anthropic(base_url=gateway.base + "/api/v1/compatibility/anthropic", api_key=KEY,
                             max_retries=0, timeout=120) as c:
        msg = c.messages.create(model=SMOL, max_tokens=4, extra_body=GREEDY, messages=ASK)
    assert msg.content[0].text
    r = httpx.post(f"{gateway.base}/api/v1/compatibility/anthropic/v1/messages", timeout=120,
                   headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": SMOL, "max_tokens": 4, "temperature": 0, "messages": ASK, "stream": True})
    events = [line[len("event: "):] for line in r.text.splitlines() if line.startswith("event: ")]
    assert events[:2] == ["message_start", "ping"] and events[-1] == "message_stop" and "content_block_delta" in events
    data = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-2]["type"] == "message_delta" and data[-2]["usage"]["output_tokens"] > 0


def test_output_config_format_constrains_the_answer_and_effort_is_refused(client):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}},
              "required": ["colour"], "additionalProperties": False}
    msg = client.messages.create(model=SMOL, max_tokens=40, extra_body=GREEDY, messages=ASK,
                                 output_config={"format": {"type": "json_schema", "schema": schema}})
    assert msg.stop_reason == "end_turn"
    assert set(json.loads(msg.content[0].text)) == {"colour"}
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=SMOL, max_tokens=4, messages=ASK, output_config={"effort": "high"})
    assert "effort" in err.value.body["error"]["message"]
