"""Structured-output request fields -> one engine Constraint, whichever dialect asked.

Accepted, on /completions and /chat/completions:
  OpenAI        response_format: {"type": "json_object"} | {"type": "json_schema", "json_schema":
                {"name", "schema", "strict"}} ({"type": "text"}: none)
  vLLM          structured_outputs: {"json" | "regex" | "choice" | "grammar" | "json_object"}, and
                the older guided_json, guided_regex, guided_choice, guided_grammar
  llama-server  json_schema, grammar (GBNF)
  chat tools    tool_choice "required" or a named function: a call of an allowed tool with
                arguments valid against its `parameters` (see tool_call_constraint)

At most one may be given: two constraints are a 422 naming both, never one silently winning.
Grammars in Lark syntax are taken as Lark, anything else as GBNF (llama.cpp's format).
`strict` (response_format only; OpenAI's default false): unsupported schema keywords are then
ignored with a warning in the log; every other field refuses them (400), as strict does.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ...engine.types import Constraint

Schema = Union[dict[str, Any], str]
# A grammar or regex as text: real ones are a few kB. Converting GBNF to Lark is pure Python (the
# GIL held): 900 kB of blank lines took about a second a request, and slowed every other
# request on the process. JSON schemas are bounded by the body limit and llguidance's own.
MAX_GRAMMAR_CHARS = 100_000


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's StructuredOutputsParams: exactly one of these."""
    model_config = ConfigDict(extra="ignore")
    json_: Schema | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None


class StructuredFields(BaseModel):
    """The structured-output fields of a generation request (mixed into its body model)."""
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Schema | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    json_schema: dict[str, Any] | None = None        # llama-server
    grammar: str | None = None                       # llama-server (GBNF)

    def constraints(self) -> list[Constraint]:
        found: list[Constraint] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(json_constraint({"type": "object"}, "response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise ValueError("response_format: type json_schema needs json_schema: {name, schema}")
            schema = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else {}
            found.append(json_constraint(schema, "response_format.json_schema.schema",
                                         strict=bool(rf.json_schema.strict)))
        so = self.structured_outputs
        if so is not None:
            given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(so, k)]
            if len(given) != 1:
                raise ValueError(f"structured_outputs takes exactly one of json, regex, choice, grammar, "
                                 f"json_object; got {[k.rstrip('_') for k in given] or 'none'}")
            key = given[0]
            field = f"structured_outputs.{key.rstrip('_')}"
            if key == "json_":
                found.append(json_constraint(so.json_, field))
            elif key == "json_object":
                found.append(json_constraint({"type": "object"}, field))
            else:
                found.append(other_constraint(key, getattr(so, key), field))
        for key in ("guided_json", "json_schema"):
            if getattr(self, key) is not None:
                found.append(json_constraint(getattr(self, key), key))
        for key, kind in (("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar"), ("grammar", "grammar")):
            if getattr(self, key) is not None:
                found.append(other_constraint(kind, getattr(self, key), key))
        return found

    def constraint(self) -> Constraint | None:
        found = self.constraints()
        if len(found) > 1:
            raise ValueError("structured output asked for twice: " + " and ".join(c.field for c in found)
                             + "; send one")
        return found[0] if found else None


def json_constraint(schema: Schema | None, field: str, strict: bool = True) -> Constraint:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ValueError(f"{field} is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{field} must be a JSON schema (an object), got {type(schema).__name__}")
    # Key order is kept: properties are generated in the schema's order, as OpenAI does.
    return Constraint("json_schema", json.dumps(schema, separators=(",", ":")), field, strict)


def other_constraint(kind: str, value: Any, field: str) -> Constraint:
    if kind == "choice":
        return Constraint("choice", json.dumps(list(value), separators=(",", ":")), field)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty string")
    if len(value) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"{field} has {len(value)} characters, above the limit of {MAX_GRAMMAR_CHARS}")
    if kind == "grammar":
        kind = "lark" if is_lark(value) else "gbnf"
    return Constraint(kind, value, field)


# Lark rather than GBNF: a line opening with `%llguidance` or a `start:` rule. llguidance's own
# test (gbnf_to_lark.is_lark_syntax) is `(?m)^\s*(...)`, whose `\s*` runs across newlines from
# every line start: 16,000 newlines held the event loop for 1.2 s while the body was validated.
# Here the leading run is horizontal whitespace only, so each character is looked at a bounded
# number of times; a line start preceded by blank lines is still found at its own line.
_LARK = re.compile(r"(?m)^[^\S\n]*(?:%llguidance\b|start\s*:)")


def is_lark(text: str) -> bool:
    """Whether a grammar is in Lark syntax (is_lark_syntax's answer, in linear time)."""
    return _LARK.search(text) is not None


# -- chat tool calls ----------------------------------------------------------------------------

def tool_call_schema(tools: list[dict], choice: str | dict) -> tuple[dict, list[str]] | None:
    """The JSON schema of one call of an allowed tool, {"name": ..., "arguments": {...}}, and the
    allowed names; None when tool_choice lets the model answer in text ("none")."""
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if choice == "none":
        return None
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name")
        if name not in by_name:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools "
                             f"({', '.join(sorted(by_name)) or 'none'})")
        names = [name]
    else:
        names = list(by_name)
    # `parameters` is a document of its own: its "#/$defs/..." refs (pydantic writes them for any
    # nested model) are rebased to where it now sits, or they would point at nothing (a 400).
    at = ["/properties/arguments"] if len(names) == 1 else [f"/anyOf/{i}/properties/arguments"
                                                            for i in range(len(names))]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": name},
                             "arguments": _embedded(by_name[name].get("parameters") or {"type": "object"}, pointer)}}
             for name, pointer in zip(names, at)]
    return (calls[0] if len(calls) == 1 else {"anyOf": calls}), names


_VALUES = ("const", "enum", "default", "examples")     # instances, not schemas: refs there are data


def _embedded(schema: dict, pointer: str) -> dict:
    """A whole schema document moved to `pointer` inside another: refs rebased, and its own
    $id/$schema dropped (an $id there would make "#" mean the moved document again)."""
    return _rebased({k: v for k, v in schema.items() if k not in ("$id", "$schema")}, pointer)


def _rebased(schema: Any, pointer: str) -> Any:
    """`schema` with each local $ref ("#...") prefixed by `pointer`, its new place in a document."""
    if isinstance(schema, dict):
        return {k: (f"#{pointer}{v[1:]}" if k == "$ref" and isinstance(v, str) and v.startswith("#")
                    else v if k in _VALUES else _rebased(v, pointer))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebased(v, pointer) for v in schema]
    return schema
