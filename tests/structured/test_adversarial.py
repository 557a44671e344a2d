"""Adversarial constraints over real HTTP: deep oneOf/anyOf nesting, recursive and cyclic
$refs, a ~1 MB schema, a body past the limit, lookaround and backreference regexes, keywords
the grammar cannot enforce with strict on. Each is a 400 naming the field (413 for the body
past the limit) or a 200 bounded by max_tokens: never a 5xx, never a hang (the client's
timeout would fail the test), and the server answers normally afterwards."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.model

MAX_TOKENS = 12


def nested(key: str, depth: int) -> dict:
    s: dict = {"type": "integer"}
    for i in range(depth):
        s = {key: [s, {"type": "string", "const": f"level{i}"}]}
    return s


LINKED = {"$defs": {"node": {"type": "object", "properties": {"value": {"type": "integer"},
                                                          "next": {"$ref": "#/$defs/node"}},
                             "required": ["value"]}}, "$ref": "#/$defs/node"}
CYCLE = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
SELF = {"$ref": "#"}
# ~1 MB: 12,000 properties, each an enum of 8 strings
BIG = {"type": "object", "properties": {f"field_{i}": {"enum": [f"v{i}_{j}" for j in range(8)]}
                                        for i in range(12_000)}}
UNIMPLEMENTED = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
CONDITIONAL = {"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}
LOOKAHEAD = {"type": "object", "properties": {"id": {"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]+$"}},
             "required": ["id"]}


def json_schema(schema: dict, strict: bool = True) -> dict:
    return {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "adversarial", "schema": schema, "strict": strict}}}


CASES = {
    "oneOf nested 300 deep, strict": (json_schema(nested("oneOf", 300)), "response_format"),
    "oneOf nested 300 deep, lenient": (json_schema(nested("oneOf", 300), strict=False), "response_format"),
    "anyOf nested 400 deep": (json_schema(nested("anyOf", 400)), "response_format"),
    "recursive $ref (a linked list)": (json_schema(LINKED), "response_format"),
    "cyclic $refs": (json_schema(CYCLE), "response_format"),
    "$ref to the root": (json_schema(SELF), "response_format"),
    "~1 MB schema": (json_schema(BIG), "response_format"),
    "uniqueItems, strict": (json_schema(UNIMPLEMENTED), "response_format"),
    "if/then, strict": (json_schema(CONDITIONAL), "response_format"),
    "lookahead in a pattern": (json_schema(LOOKAHEAD), "response_format"),
    "unknown keyword, strict": (json_schema({"type": "object", "x-made-up": {"deep": [1, 2]}}), "response_format"),
    "lookahead regex": ({"guided_regex": "(?=a)a+"}, "guided_regex"),
    "lookbehind regex": ({"structured_outputs": {"regex": "(?<!x)y+"}}, "structured_outputs.regex"),
    "backreference regex": ({"guided_regex": r"(a|b)\1"}, "guided_regex"),
    "huge repetition regex": ({"guided_regex": "a{1000000}"}, "guided_regex"),
    "nested quantifiers regex": ({"guided_regex": "(a*)*(b+)+c{2,50000}"}, "guided_regex"),
    "GBNF with an undefined rule": ({"grammar": "root ::= item\n"}, "grammar"),
    "GBNF with a rule twice": ({"guided_grammar": 'root ::= "a"\nroot ::= "b"\n'}, "guided_grammar"),
    "GBNF without a root": ({"structured_outputs": {"grammar": 'item ::= "a"\n'}}, "structured_outputs.grammar"),
    "a choice of 20,000 strings": ({"guided_choice": [f"option {i}" for i in range(20_000)]}, "guided_choice"),
}


@pytest.fixture(scope="module")
def http(structured_server):
    with httpx.Client(base_url=structured_server.api, headers=structured_server.headers, timeout=180) as c:
        yield c


def chat(http: httpx.Client, extra: dict) -> httpx.Response:
    return http.post("/chat/completions", json={
        "model": "smollm2-135m", "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": "Answer."}], **extra})


@pytest.mark.parametrize("case", list(CASES))
def test_adversarial_constraint_is_a_400_or_a_bounded_200(http, case: str) -> None:
    extra, field = CASES[case]
    r = chat(http, extra)
    assert r.status_code in (200, 400), (case, r.status_code, r.text[:500])
    if r.status_code == 400:
        error = r.json()["error"]
        assert field.split(".")[0] in error["message"] or field.split(".")[0] in str(error.get("param")), error
    else:
        body = r.json()
        choice = body["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] <= MAX_TOKENS
    # and the server still serves an ordinary request
    ok = chat(http, {})
    assert ok.status_code == 200, ok.text


def test_a_schema_nested_past_any_parser_is_not_a_5xx(http) -> None:
    # 5,000 levels of anyOf, written by hand: Python's json (client and server) recurses per level
    schema = '{"anyOf": [' * 5000 + '{"type": "integer"}' + ']}' * 5000
    body = ('{"model": "smollm2-135m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}], '
            '"response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": '
            + schema + '}}}')
    r = http.post("/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422), (r.status_code, r.text[:300])
    assert chat(http, {}).status_code == 200


def test_strict_refuses_what_it_cannot_enforce(http) -> None:
    for schema in (UNIMPLEMENTED, CONDITIONAL):
        r = chat(http, json_schema(schema, strict=True))
        assert r.status_code == 400, r.text
        assert "response_format" in r.json()["error"]["message"]
        lenient = chat(http, json_schema(schema, strict=False))
        assert lenient.status_code == 200, lenient.text


def test_a_body_past_the_limit_is_a_413(http) -> None:
    big = json_schema({"type": "object", "description": "x" * 2_600_000})
    r = chat(http, big)
    assert r.status_code == 413, r.text[:300]
    assert chat(http, {}).status_code == 200


def test_the_engine_is_idle_and_serving_after_the_adversarial_requests(http, structured_server) -> None:
    ep = structured_server.wait_idle()
    assert ep["in_flight"] == 0 and ep["slots_used"] == 0
    r = chat(http, json_schema({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                "required": ["ok"], "additionalProperties": False}))
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert set(json.loads(choice["message"]["content"])) == {"ok"}
