"""OpenAI's published API description (../shared/spec/openai/openapi.yaml, MIT) as a validator:
what an OpenAI-compatible route sends (a body, a stream chunk or event, an error) checked
against the document's own schema for it, with JSON Schema 2020-12."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
PLACES = [ROOT.parent / "shared/spec/openai/openapi.yaml", ROOT / "shared/spec/openai/openapi.yaml"]


@lru_cache(maxsize=1)
def document() -> dict:
    found = next((p for p in PLACES if p.exists()), None)
    assert found is not None, f"OpenAI's published document is not here ({', '.join(map(str, PLACES))})"
    return _nullable(yaml.load(found.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def _nullable(node):
    """OpenAPI 3.0's `nullable: true` (which JSON Schema does not know) as JSON Schema says it:
    null among the allowed types (an `enum` gets null too)."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items()}
    if out.pop("nullable", False) is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        elif isinstance(out.get("type"), list) and "null" not in out["type"]:
            out["type"] = [*out["type"], "null"]
        elif "type" not in out:
            out = {"anyOf": [out, {"type": "null"}]}
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out


def conforms(name: str, instance: dict) -> None:
    """`instance` against components/schemas/`name`; a Responses stream event against the one
    event schema of its type (the union's own error says nothing useful)."""
    spec = document()
    schemas = spec["components"]["schemas"]
    if name == "ResponseStreamEvent":
        refs = [a["$ref"].rsplit("/", 1)[-1] for a in schemas[name]["anyOf"]]
        [name] = [r for r in refs if instance["type"] in schemas[r]["properties"]["type"].get("enum", ())]
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)
