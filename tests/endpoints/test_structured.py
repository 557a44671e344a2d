"""Structured output and tool calls over real HTTP on the default model (the session server):
every dialect's fields constrain the answer, bad constraints are 400s naming the field, two are
a 422, a cut answer is "length" with its partial text, tool calls come back as OpenAI's
tool_calls, streamed too, and a constrained request gives the same tokens alone and among
mixed neighbours."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
from openai.types.chat import ChatCompletionChunk

from testkit.servers import MODEL

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.model

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}}}
ASK = [{"role": "user", "content": "Describe a person called Ann as JSON."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                           "unit": {"enum": ["C", "F"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.api, api_key=server.key, max_retries=0, timeout=120) as c:
        yield c


def post(client: httpx.Client, path: str, **body) -> dict:
    r = client.post(path, json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_response_format_json_schema_with_the_openai_client(oai):
    r = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=120, temperature=0,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "person", "schema": PERSON}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    data = json.loads(choice.message.content)
    jsonschema.validate(data, PERSON, format_checker=jsonschema.FormatChecker())
    assert list(data) == ["name", "age", "tags"]          # the schema's order


def test_json_object(client):
    ask = [{"role": "user", "content": 'Give the JSON object {"city": "Paris"}.'}]
    body = post(client, "/chat/completions", messages=ask, max_tokens=80, response_format={"type": "json_object"})
    assert body["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)


DIALECTS = [
    ({"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
    ({"guided_regex": r"(red|green|blue)!"}, lambda t: t in ("red!", "green!", "blue!")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"guided_choice": ["Paris", "Rome", "Madrid, Spain"]}, lambda t: t in ("Paris", "Rome", "Madrid, Spain")),
    ({"grammar": 'root ::= "The answer is " [0-9] "."'}, lambda t: re.fullmatch(r"The answer is [0-9]\.", t)),
    ({"guided_grammar": 'start: "x" NUM\nNUM: /[0-9]{2}/'}, lambda t: re.fullmatch(r"x[0-9]{2}", t)),
    ({"structured_outputs": {"json": PERSON}}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ({"guided_json": json.dumps(PERSON)}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ({"json_schema": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
]


@pytest.mark.parametrize("fields, ok", DIALECTS, ids=lambda v: next(iter(v)) if isinstance(v, dict) else "")
def test_each_dialect_constrains_completions(client, fields, ok):
    body = post(client, "/completions", prompt="Answer:", max_tokens=80, **fields)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and ok(choice["text"]), choice


@pytest.mark.parametrize("fields, param, words", [
    ({"guided_regex": "(a"}, "guided_regex", "unclosed group"),
    ({"guided_regex": "(?=a)b"}, "guided_regex", "look-around"),
    ({"json_schema": {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}},
     "json_schema", "Unimplemented keys"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                          "schema": {"type": "object", "dependentSchemas": {"a": {}}}}}},
     "response_format.json_schema.schema", "dependentSchemas"),
    ({"grammar": "root ::= undefined_rule"}, "grammar", "undefined_rule"),
])
def test_a_constraint_that_cannot_be_used_is_a_400_naming_the_field(client, fields, param, words):
    r = client.post("/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4, **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words.lower() in err["message"].lower(), err


def test_without_strict_unsupported_keywords_are_ignored_and_logged(client, server):
    # no other properties: the test is about the ignored keys, not about how long a model rambles
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False, "if": {"required": ["a"]}, "then": {"required": ["a"]}}
    body = post(client, "/completions", prompt="JSON:", max_tokens=30,
                response_format={"type": "json_schema", "json_schema": {"name": "lenient", "schema": schema}})
    assert isinstance(json.loads(body["choices"][0]["text"])["a"], int)
    assert "Unimplemented keys" in server.log_text()


def test_two_constraints_are_a_422_naming_both(client):
    r = client.post("/completions", json={"model": MODEL, "prompt": "x", "guided_regex": "a+",
                                          "response_format": {"type": "json_object"}})
    assert r.status_code == 422
    msg = json.dumps(r.json()["detail"])
    assert "response_format" in msg and "guided_regex" in msg


def test_cut_by_max_tokens_is_length_with_the_partial_text(client):
    body = post(client, "/completions", prompt="JSON:", max_tokens=5, json_schema=PERSON)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"].startswith('{"name": ')
    with pytest.raises(ValueError):
        json.loads(choice["text"])


def test_logprobs_come_from_the_constrained_distribution(client):
    body = post(client, "/completions", prompt="Is water wet? Answer:", max_tokens=3, logprobs=5,
                guided_choice=["yes", "no"])
    lp = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"] in ("yes", "no")
    first = lp["top_logprobs"][0]
    assert first and all("yes".startswith(t) or "no".startswith(t) for t in first), first
    # only allowed tokens carry the mass: the alternatives' probabilities add up to one
    assert sum(2.718281828 ** v for v in first.values()) == pytest.approx(1.0, abs=1e-3)


def test_tool_choice_required_returns_a_call_with_valid_arguments(oai):
    r = oai.chat.completions.create(model=MODEL, max_tokens=60, temperature=0, tools=[WEATHER, TIME],
                                    tool_choice="required",
                                    messages=[{"role": "user", "content": "What's the weather in Oslo?"}])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])


def test_a_named_tool_is_the_one_called_streamed_as_openai_streams_tool_calls(client):
    body = {"model": MODEL, "max_tokens": 60, "tools": [WEATHER, TIME], "stream": True,
            "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            "messages": [{"role": "user", "content": "What time is it in Tokyo?"}]}
    with client.stream("POST", "/chat/completions", json=body) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(d), strict=True) for d in data[:-1]]
    calls = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_time"
    jsonschema.validate(json.loads(calls[0].function.arguments), TIME["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("fields, param", [
    ({"tools": [WEATHER]}, "tool_choice"),                                    # auto, the default
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
])
def test_tool_choice_auto_is_a_400_saying_what_works(client, fields, param):
    r = client.post("/chat/completions", json={"model": MODEL, "messages": ASK, **fields})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "required" in r.json()["error"]["message"]


@pytest.mark.parametrize("fields", [
    {"tool_choice": "required"},                                              # no tools
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
])
def test_inconsistent_tool_fields_are_422(client, fields):
    r = client.post("/chat/completions", json={"model": MODEL, "messages": ASK, **fields})
    assert r.status_code == 422, r.text


def test_tool_choice_none_answers_in_text(client):
    body = post(client, "/chat/completions", messages=ASK, max_tokens=5, tools=[WEATHER], tool_choice="none")
    assert body["choices"][0]["message"]["content"] and body["choices"][0]["finish_reason"] == "length"


def test_same_tokens_alone_and_among_mixed_neighbours(client, server):
    """A constrained request alone, then with 15 constrained and unconstrained neighbours at
    once (queued on 4 slots): its tokens and logprobs do not change, nor do an unconstrained one's."""
    constrained = {"prompt": "A person:", "max_tokens": 40, "json_schema": PERSON, "logprobs": 1}
    plain = {"prompt": "Once upon a time", "max_tokens": 12, "logprobs": 1}
    alone = [post(client, "/completions", **b)["choices"][0] for b in (constrained, plain)]
    others = [{"prompt": f"Item {k}:", "max_tokens": 10 + k % 7, **({"guided_regex": "[a-z ]{3,12}"} if k % 2 else {})}
              for k in range(14)]
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(post, client, "/completions", **b) for b in [constrained, plain, *others]]
        results = [f.result() for f in futures]
    for before, after in zip(alone, results[:2]):
        after = after["choices"][0]
        assert after["text"] == before["text"] and after["logprobs"] == before["logprobs"]
    status = server.endpoint()
    assert status["grammar_masks"] > 0 and status["grammar_cache_hits"] >= 1
    metrics = httpx.get(server.base + "/metrics", headers=server.headers, timeout=10).text
    requests = [line for line in metrics.splitlines() if line.startswith("modelyard_grammar_requests_total{")]
    assert requests and float(requests[0].split()[-1]) == status["grammar_requests"] >= 9, requests
