"""tool_call_schema embeds each tool's `parameters` document in the call's schema: its local
$refs (pydantic writes "#/$defs/..." for every nested model) must still resolve there. Before
the rebasing they pointed at the wrapper's root, and any such tool was a 400."""

from __future__ import annotations

import json

import jsonschema
import llguidance
import pytest

from modelyard.api.openai.structured import tool_call_schema
from modelyard.local.grammar import JSON_OPTIONS

PARAMS = {"$id": "https://example.com/order", "$schema": "https://json-schema.org/draft/2020-12/schema",
          "type": "object", "required": ["item", "next"],
          "properties": {"item": {"$ref": "#/$defs/Item"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
                         "note": {"const": {"$ref": "#/not-a-ref"}}},
          "$defs": {"Item": {"type": "object", "required": ["sku"], "properties": {"sku": {"type": "string"}}}}}
OTHER = {"type": "object", "properties": {"q": {"$ref": "#/$defs/Q"}}, "$defs": {"Q": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "order", "parameters": PARAMS}},
         {"type": "function", "function": {"name": "query", "parameters": OTHER}}]
CALL = {"name": "order", "arguments": {"item": {"sku": "a1"}, "next": {"item": {"sku": "b2"}, "next": None}}}


NO_ID = {k: v for k, v in PARAMS.items() if k not in ("$id", "$schema")}


@pytest.mark.parametrize("params", [PARAMS, NO_ID], ids=["with $id", "without $id"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "order"}}],
                         ids=["required", "named"])
def test_embedded_parameters_keep_their_refs(choice, params) -> None:
    tools = [{"type": "function", "function": {"name": "order", "parameters": params}}, TOOLS[1]]
    schema, names = tool_call_schema(tools, choice)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    assert llguidance.LLMatcher.validate_grammar_with_warnings(grammar) == (False, [])
    check = jsonschema.Draft202012Validator(schema)
    assert check.is_valid(CALL)
    assert not check.is_valid({**CALL, "arguments": {"item": {"sku": 1}, "next": None}})
    # instances are left alone: a const that looks like a ref is data
    note = schema if names == ["order"] else schema["anyOf"][0]
    assert note["properties"]["arguments"]["properties"]["note"] == {"const": {"$ref": "#/not-a-ref"}}


def test_each_of_several_tools_resolves_in_its_own_place() -> None:
    schema, names = tool_call_schema(TOOLS, "required")
    assert names == ["order", "query"]
    check = jsonschema.Draft202012Validator(schema)
    assert check.is_valid({"name": "query", "arguments": {"q": 3}})
    assert not check.is_valid({"name": "query", "arguments": {"q": "three"}})
