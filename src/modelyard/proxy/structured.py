"""A structured-output Constraint -> the request fields a remote upstream takes.

Upstreams speak different dialects, so the endpoint says which one (`upstream_server`); a constraint
its upstream cannot take is a 400 naming the field, never a request sent without it (which would
come back as unconstrained text with a 200).

  upstream_server json_schema                   regex        choice               lark / gbnf
  openai, ollama  response_format               -            -                    -
  vllm, modelyard structured_outputs.json       .regex       .choice              .grammar
  sglang          response_format               regex        regex (alternation)  ebnf (gbnf only)
  llama-server    json_schema                   -            grammar (GBNF)       grammar (gbnf only)

(Ollama's native `format` belongs to its /api routes; its OpenAI-compatible /v1, which this
gateway calls, takes response_format.)
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..engine.types import Constraint
from ..errors import InvalidRequest

OBJECT = '{"type":"object"}'      # json_object's canonical schema (api/openai/structured)


def constraint_fields(kind: str, endpoint: str, c: Constraint) -> dict[str, Any]:
    if c.kind == "json_schema":
        schema = json.loads(c.source)
        if kind in ("vllm", "modelyard"):
            return {"structured_outputs": {"json": schema}}
        if kind == "llama-server":
            return {"json_schema": schema}
        if c.source == OBJECT:
            return {"response_format": {"type": "json_object"}}
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "output", "schema": schema, "strict": c.strict}}}
    if kind in ("vllm", "modelyard"):
        key = {"regex": "regex", "choice": "choice", "lark": "grammar", "gbnf": "grammar"}[c.kind]
        return {"structured_outputs": {key: json.loads(c.source) if c.kind == "choice" else c.source}}
    if kind == "sglang":
        if c.kind == "regex":
            return {"regex": c.source}
        if c.kind == "choice":
            return {"regex": "|".join(re.escape(choice) for choice in json.loads(c.source))}
        if c.kind == "gbnf":
            return {"ebnf": c.source}
    if kind == "llama-server":
        if c.kind == "choice":
            return {"grammar": "root ::= " + " | ".join(json.dumps(choice) for choice in json.loads(c.source))}
        if c.kind == "gbnf":
            return {"grammar": c.source}
    raise InvalidRequest(f"{c.field}: endpoint {endpoint!r} forwards to a {kind} upstream, which takes no "
                         f"{c.kind} constraint (set upstream_server if the upstream is vLLM, SGLang, llama-server "
                         "or modelyard)", param=c.field)
