"""OpenAI's Responses API, driven by the official `openai` client over real HTTP: a gateway with
its control plane on (an admin token, so usage rows can be read) serving smollm2-135m embedded
and "remote-smol", an openai-engine endpoint over a second modelyard process serving
smollm2-135m; and, for kill -9, a server whose control plane is off (responses are stored in its
database all the same). Greedy (temperature 0), small max_output_tokens, one engine thread each;
every process is stopped by PID. Bodies and stream events are validated against OpenAI's
published document (../shared/spec/openai/openapi.yaml) with jsonschema.
"""

from __future__ import annotations

import json
import time
from typing import Iterator

import httpx
import openai
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from testkit.openai_document import conforms as check, document
from testkit.servers import ServerProcess, served, wait_ready

pytestmark = pytest.mark.model

KEY, OTHER, UPSTREAM_KEY, ADMIN = "responses-key", "responses-other", "responses-upstream", "responses-admin"
SMOL, REMOTE = "smollm2-135m", "remote-smol"
ENGINE = "context = 1024\nparallel = 2\nthreads = 1\n"
ASK = "Name three colours."
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def spec() -> dict:
    return document()


def conforms(spec: dict, name: str, instance: dict) -> None:
    """testkit's check against OpenAI's document (`spec`, the fixture, loads it once)."""
    check(name, instance)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("responses-up"),
                f'[server]\napi_keys = ["{UPSTREAM_KEY}"]\n\n[[endpoints]]\nname = "{SMOL}"\n{ENGINE}',
                name="upstream", key=UPSTREAM_KEY) as p:
        yield p


@pytest.fixture(scope="module")
def gateway(upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = (f'[server]\napi_keys = ["{KEY}", "{OTHER}"]\nusage_flush_interval = 0.2\n\n'
              f'[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
              f'[[endpoints]]\nname = "{SMOL}"\n{ENGINE}\n'
              f'[[endpoints]]\nname = "{REMOTE}"\nengine = "openai"\nurls = ["{upstream.api}"]\n'
              f'upstream_model = "{SMOL}"\napi_key = "{UPSTREAM_KEY}"\ncontext = 1024\n')
    with served(tmp_path_factory.mktemp("responses-gw"), config, name="gateway", key=KEY,
                endpoints=(SMOL, REMOTE)) as p:
        yield p


def client_for(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(gateway: ServerProcess) -> Iterator[openai.OpenAI]:
    with client_for(gateway, KEY) as c:
        yield c


def test_create_answers_what_chat_answers_and_is_stored(client, gateway, spec):
    for model in (SMOL, REMOTE):
        r = client.responses.create(model=model, input=ASK, instructions="You are terse.", max_output_tokens=12,
                                    temperature=0, metadata={"case": "basic"})
        raw = client.responses.with_raw_response.retrieve(r.id).http_response.json()
        conforms(spec, "Response", raw)
        openai.types.responses.Response.model_validate(raw, strict=True)
        assert r.id.startswith("resp_") and r.object == "response" and r.model == model and r.store
        assert r.status in ("completed", "incomplete") and r.metadata == {"case": "basic"}
        [message] = r.output
        assert message.type == "message" and message.role == "assistant" and r.output_text
        assert 0 < r.usage.output_tokens <= 12 and r.usage.input_tokens > 0
        assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
        chat = httpx.post(f"{gateway.api}/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                          json={"model": model, "max_tokens": 12, "temperature": 0,
                                "messages": [{"role": "system", "content": "You are terse."},
                                             {"role": "user", "content": ASK}]}).json()
        assert chat["choices"][0]["message"]["content"] == r.output_text        # one pipeline, two shapes
        assert chat["usage"]["prompt_tokens"] == r.usage.input_tokens
        assert client.responses.retrieve(r.id).model_dump() == r.model_dump()
        [item] = client.responses.input_items.list(r.id).data
        assert item.type == "message" and item.role == "user" and item.content[0].text == ASK


def test_stream_events_rebuild_the_stored_response(client, spec):
    for model in (SMOL, REMOTE):
        events = list(client.responses.create(model=model, input=ASK, max_output_tokens=12, temperature=0,
                                              stream=True))
        kinds = [e.type for e in events]
        assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added"], kinds
        assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                              events[-1].type] and events[-1].type in ("response.completed", "response.incomplete")
        assert [e.sequence_number for e in events] == list(range(len(events)))
        for e in events:
            conforms(spec, "ResponseStreamEvent", e.model_dump(mode="json", exclude_unset=True))
        final = events[-1].response
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert final.output_text == text and text
        assert client.responses.retrieve(final.id).model_dump() == final.model_dump()
        whole = client.responses.create(model=model, input=ASK, max_output_tokens=12, temperature=0)
        # the same counts (what the prefix cache held differs: the second found the first's prompt)
        assert whole.output_text == text and whole.usage.model_dump(exclude={"input_tokens_details"}) == \
            final.usage.model_dump(exclude={"input_tokens_details"})


def test_max_output_tokens_cuts_an_incomplete_response(client):
    r = client.responses.create(model=SMOL, input="Tell a long story about a dragon.", max_output_tokens=3,
                                temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_turn_three_sees_turn_one_through_previous_response_id(client):
    first = client.responses.create(model=SMOL, temperature=0, max_output_tokens=8,
                                    input="My secret number is 4721. Say OK.")
    second = client.responses.create(model=SMOL, temperature=0, max_output_tokens=8, previous_response_id=first.id,
                                     input="What colour is the sky?")
    third = client.responses.create(model=SMOL, temperature=0, max_output_tokens=12, previous_response_id=second.id,
                                    input="What is my secret number?")
    assert third.previous_response_id == second.id
    assert "4721" in third.output_text, third.output_text
    items = client.responses.input_items.list(third.id, order="asc").data
    texts = [(i.type, getattr(i, "role", None), i.content[0].text) for i in items]
    assert texts == [("message", "user", "My secret number is 4721. Say OK."),
                     ("message", "assistant", first.output_text),
                     ("message", "user", "What colour is the sky?"),
                     ("message", "assistant", second.output_text),
                     ("message", "user", "What is my secret number?")]
    assert items[1].id == first.output[0].id          # the earlier output items, as they were answered
    # the same chain, without turn 1: the number is not there to repeat
    alone = client.responses.create(model=SMOL, temperature=0, max_output_tokens=12,
                                    input=[{"role": "user", "content": "What colour is the sky?"},
                                           {"role": "assistant", "content": second.output_text},
                                           {"role": "user", "content": "What is my secret number?"}])
    assert "4721" not in alone.output_text
    assert third.usage.input_tokens > alone.usage.input_tokens
    page = client.responses.input_items.list(third.id, limit=2)           # newest first, as OpenAI
    assert [i.id for i in page.data] == [items[4].id, items[3].id] and page.has_more


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_function_call_and_its_output_turn(client, stream):
    ask = "What is the weather in Paris?"
    forced = {"type": "function", "name": "get_weather"}
    if stream:
        with client.responses.stream(model=SMOL, input=ask, tools=[WEATHER], tool_choice=forced, temperature=0,
                                     max_output_tokens=48) as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert "response.function_call_arguments.done" in kinds and "response.output_text.delta" not in kinds
    else:
        r = client.responses.create(model=SMOL, input=ask, tools=[WEATHER], tool_choice=forced, temperature=0,
                                    max_output_tokens=48)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert isinstance(json.loads(call.arguments).get("city"), str)
    assert client.responses.retrieve(r.id).output[0].call_id == call.call_id
    answer = client.responses.create(model=SMOL, previous_response_id=r.id, temperature=0, max_output_tokens=8,
                                     tools=[WEATHER], tool_choice="none",
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "Sunny, 24 degrees"}])
    assert answer.output[0].type == "message" and answer.output_text
    kinds = [i.type for i in client.responses.input_items.list(answer.id, order="asc").data]
    assert kinds == ["message", "function_call", "function_call_output"]
    # an output that answers no call is refused, naming the input
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=SMOL, input=[{"type": "function_call_output", "call_id": "nope",
                                                    "output": "x"}], tool_choice="none", tools=[WEATHER])
    assert err.value.body["param"] == "input"


def test_another_key_gets_404_on_every_route(client, gateway):
    r = client.responses.create(model=SMOL, input=ASK, max_output_tokens=4, temperature=0)
    with client_for(gateway, OTHER) as other:
        for call in (lambda: other.responses.retrieve(r.id), lambda: other.responses.delete(r.id),
                     lambda: other.responses.input_items.list(r.id),
                     lambda: other.responses.create(model=SMOL, input="Go on", previous_response_id=r.id,
                                                    max_output_tokens=4)):
            with pytest.raises(openai.NotFoundError):
                call()
    assert client.responses.retrieve(r.id).id == r.id          # untouched
    deleted = client.responses.delete(r.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    raw = httpx.delete(f"{gateway.api}/responses/{r.id}", headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_store_false_keeps_nothing_and_cannot_be_continued(client):
    r = client.responses.create(model=SMOL, input=ASK, max_output_tokens=4, temperature=0, store=False)
    assert r.store is False and r.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=SMOL, input="Go on", previous_response_id=r.id, max_output_tokens=4)
    assert err.value.body["param"] == "previous_response_id"


def test_fields_not_implemented_are_refused(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=SMOL, input=ASK, max_output_tokens=4, extra_body={"reasoning": {"effort": "low"}})
    assert err.value.code == "unknown_parameter" and err.value.body["param"] == "reasoning"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=SMOL, input=ASK, max_output_tokens=4, include=["message.output_text.logprobs"])
    assert err.value.body["param"] == "include" and "not implemented" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:          # an embedded endpoint cannot choose: as chat
        client.responses.create(model=SMOL, input=ASK, max_output_tokens=4, tools=[WEATHER])
    with pytest.raises(openai.UnprocessableEntityError):
        client.responses.create(model=SMOL, input=ASK, metadata={f"k{i}": "v" for i in range(17)})


def test_input_tokens_and_truncation(client):
    counted = client.responses.input_tokens.count(model=SMOL, input=ASK, instructions="You are terse.")
    r = client.responses.create(model=SMOL, input=ASK, instructions="You are terse.", max_output_tokens=1)
    assert counted.input_tokens == r.usage.input_tokens > 0
    with pytest.raises(openai.BadRequestError):               # the upstream's tokenizer: not counted here
        client.responses.input_tokens.count(model=REMOTE, input=ASK)
    long = [{"role": "user", "content": "word " * 1100}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": ASK}]
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=SMOL, input=long, max_output_tokens=4)
    assert "1024" in err.value.message
    cut = client.responses.create(model=SMOL, input=long, max_output_tokens=4, truncation="auto")
    assert cut.truncation == "auto" and cut.usage.input_tokens < 1024
    kept = [i.content[0].text for i in client.responses.input_items.list(cut.id, order="asc").data]
    assert kept == ["ok", ASK]


def test_a_response_s_tokens_are_in_usage_once(gateway):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    made = httpx.post(f"{gateway.base}/api/v1/control/api-keys", headers=admin, json={"name": "usage"}).json()
    with client_for(gateway, made["secret"]) as c:
        whole = c.responses.create(model=SMOL, input=ASK, max_output_tokens=6, temperature=0)
        streamed = list(c.responses.create(model=SMOL, input=ASK, max_output_tokens=6, temperature=0, stream=True))
        c.responses.retrieve(whole.id)                     # reads count nothing
    total = whole.usage.total_tokens + streamed[-1].response.usage.total_tokens
    deadline = time.monotonic() + 20
    while True:
        rows = httpx.get(f"{gateway.base}/api/v1/control/usage", headers=admin,
                         params={"granularity": "day", "key_id": made["id"]}).json()["data"]
        if sum(r["requests"] for r in rows) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sum(r["requests"] for r in rows) == 2
    assert sum(r["total_tokens"] for r in rows) == total


def test_a_stored_response_survives_kill_9(tmp_path):
    config = f'[server]\napi_keys = ["{KEY}"]\n\n[[endpoints]]\nname = "{SMOL}"\n{ENGINE}'
    with served(tmp_path, config, name="plain", key=KEY) as srv:        # no control plane
        with client_for(srv, KEY) as c:
            r = c.responses.create(model=SMOL, input=ASK, max_output_tokens=6, temperature=0)
            items = c.responses.input_items.list(r.id).model_dump()
            running = c.responses.create(model=SMOL, input="Write a very long story about dragons.",
                                         max_output_tokens=900, temperature=0, background=True)
        srv.kill()
        srv.start()
        wait_ready(srv, "plain, restarted")
        with client_for(srv, KEY) as c:
            assert c.responses.retrieve(r.id).model_dump() == r.model_dump()
            assert c.responses.input_items.list(r.id).model_dump() == items
            again = c.responses.create(model=SMOL, input="Go on", previous_response_id=r.id, max_output_tokens=4)
            assert again.previous_response_id == r.id
            # the background response its killed run left: failed once its lease (30 s) has passed
            dead = poll(c, running.id, timeout=45)
            assert dead.status == "failed" and dead.error.code == "server_error"


def test_text_format_constrains_the_answer_as_chat_does(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}}
    r = client.responses.create(model=SMOL, input="Name a city and its country.", text=fmt, temperature=0,
                                max_output_tokens=40)
    assert r.status == "completed" and set(json.loads(r.output_text)) == {"city", "country"}
    assert r.text.format.type == "json_schema" and r.text.format.name == "place"
    with pytest.raises(openai.BadRequestError) as err:       # two constraints: refused, not one winning
        client.responses.create(model=SMOL, input="Weather?", text=fmt, tools=[WEATHER],
                                tool_choice={"type": "function", "name": "get_weather"})
    assert err.value.body["param"] == "text.format"


def test_a_conversation_keeps_every_turn(client, gateway):
    conv = client.conversations.create(metadata={"topic": "numbers"},
                                       items=[{"role": "user", "content": "My secret number is 4721. Say OK."}])
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "numbers"}
    first = client.responses.create(model=SMOL, temperature=0, max_output_tokens=8, conversation=conv.id,
                                    input="Say OK.")
    client.responses.create(model=SMOL, temperature=0, max_output_tokens=8, conversation={"id": conv.id},
                            input="What colour is the sky?")
    third = client.responses.create(model=SMOL, temperature=0, max_output_tokens=24, conversation=conv.id,
                                    input="What is my secret number?", store=False)
    assert third.conversation.id == conv.id and "4721" in third.output_text, third.output_text
    items = client.conversations.items.list(conv.id, order="asc", limit=100).data
    assert [i.content[0].text for i in items] == [
        "My secret number is 4721. Say OK.", "Say OK.", first.output_text, "What colour is the sky?",
        items[4].content[0].text, "What is my secret number?", third.output_text]
    assert [i.role for i in items] == ["user", "user", "assistant", "user", "assistant", "user", "assistant"]
    added = client.conversations.items.create(conv.id, items=[{"type": "message", "role": "user",
                                                                "content": [{"type": "input_text", "text": "More"}]}])
    [new] = added.data
    assert client.conversations.items.retrieve(new.id, conversation_id=conv.id).content[0].text == "More"
    client.conversations.items.delete(new.id, conversation_id=conv.id)
    assert client.conversations.update(conv.id, metadata={"topic": "done"}).metadata == {"topic": "done"}
    with client_for(gateway, OTHER) as other:             # another key: 404 everywhere
        for call in (lambda: other.conversations.retrieve(conv.id), lambda: other.conversations.delete(conv.id),
                     lambda: other.conversations.items.list(conv.id),
                     lambda: other.conversations.items.retrieve(items[0].id, conversation_id=conv.id),
                     lambda: other.conversations.update(conv.id, metadata={}),
                     lambda: other.responses.create(model=SMOL, input="Go on", conversation=conv.id,
                                                    max_output_tokens=4)):
            with pytest.raises(openai.NotFoundError):
                call()
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=SMOL, input="x", conversation=conv.id, previous_response_id=first.id)
    assert err.value.body["param"] == "conversation"
    assert client.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.list(conv.id)


def poll(client: openai.OpenAI, rid: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        r = client.responses.retrieve(rid)
        if r.status not in ("queued", "in_progress") or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_a_background_response_runs_detached_and_can_be_cancelled(client, gateway):
    started = client.responses.create(model=SMOL, input=ASK, max_output_tokens=12, temperature=0, background=True)
    assert started.background and started.status == "in_progress" and not started.output
    done = poll(client, started.id)
    whole = client.responses.create(model=SMOL, input=ASK, max_output_tokens=12, temperature=0)
    assert done.status == whole.status and done.output_text == whole.output_text
    assert done.usage.total_tokens == whole.usage.total_tokens
    long = client.responses.create(model=SMOL, input="Write a very long story about dragons.", temperature=0,
                                   max_output_tokens=900, background=True)
    with client_for(gateway, OTHER) as other, pytest.raises(openai.NotFoundError):
        other.responses.cancel(long.id)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and client.responses.retrieve(long.id).status == "cancelled"
    assert gateway.wait_idle(key=KEY)["in_flight"] == 0          # the generation stopped with it
    assert client.responses.cancel(done.id).status == done.status         # an ended one, as it is
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.cancel(whole.id)
    assert err.value.body["param"] == "response_id"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=SMOL, input=ASK, background=True, store=False)
    assert err.value.body["param"] == "store"


def test_a_failure_mid_stream_is_an_error_event_then_response_failed(gateway, spec):
    events = []
    with httpx.stream("POST", f"{gateway.api}/responses", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "X-Request-Timeout": "0.5"},
                      json={"model": SMOL, "input": "Write a very long story about dragons.", "temperature": 0,
                            "max_output_tokens": 900, "stream": True}) as r:
        assert r.status_code == 200
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == name
                events.append(event)
    for event in events:                # as sent, against the document and the SDK's types in strict mode
        conforms(spec, "ResponseStreamEvent", event)
        STREAM_EVENT.validate_python(event, strict=True)
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "response.output_text.delta" in [e["type"] for e in events]       # it failed under way
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"] == events[-2]["message"]


def test_an_admin_lists_and_deletes_any_key_s_responses(client, gateway):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = client.responses.create(model=SMOL, input=ASK, max_output_tokens=4, temperature=0)
    listed, after = [], None
    while True:
        page = httpx.get(f"{gateway.base}/api/v1/control/responses", headers=admin,
                         params={"limit": 5, **({"after": after} if after else {})}).json()
        listed += page["data"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    [mine] = [x for x in listed if x["id"] == r.id]
    assert mine["model"] == SMOL and mine["status"] == r.status and "output" not in mine     # never the content
    owned = httpx.get(f"{gateway.base}/api/v1/control/responses", headers=admin,
                      params={"key_id": mine["key_id"], "limit": 1000}).json()["data"]
    assert r.id in [x["id"] for x in owned] and {x["key_id"] for x in owned} == {mine["key_id"]}
    gone = httpx.delete(f"{gateway.base}/api/v1/control/responses/{r.id}", headers=admin)
    assert gone.status_code == 200 and gone.json()["deleted"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    audit = httpx.get(f"{gateway.base}/api/v1/control/audit-log", headers=admin).json()["data"]
    assert any(a["action"] == "response.delete" and a["object_id"] == r.id for a in audit)
    refused = httpx.get(f"{gateway.base}/api/v1/control/responses", headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 403                                   # an inference key is no admin


def test_an_openai_agents_run_calls_its_tool_and_finishes_through_responses(gateway):
    """OpenAI's Agents SDK: a named tool_choice makes the small model call the tool, the SDK runs
    it, and a hook asks the next turn for text (tool_choice "none": after a tool, the SDK would
    drop tool_choice, and an embedded endpoint cannot choose for itself: "auto" is a 400)."""
    agents = pytest.importorskip("agents", reason="openai-agents is a dev extra (pyproject.toml)")
    import asyncio
    import dataclasses
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"Sunny, 24 degrees in {city}"

    class AnswerAfterTheTool(agents.RunHooks):
        async def on_tool_end(self, context, agent, tool, result):
            agent.model_settings = dataclasses.replace(agent.model_settings, tool_choice="none")

    agents.set_tracing_disabled(True)
    model = agents.OpenAIResponsesModel(model=SMOL, openai_client=openai.AsyncOpenAI(
        base_url=gateway.api, api_key=KEY, max_retries=0, timeout=120))
    agent = agents.Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather], model=model,
                         model_settings=agents.ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=48),
                         reset_tool_choice=False)
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4,
                                           hooks=AnswerAfterTheTool()))
    assert calls and isinstance(calls[0], str)
    assert [type(i).__name__ for i in result.new_items] == ["ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"]
    assert result.final_output and len(result.raw_responses) == 2
