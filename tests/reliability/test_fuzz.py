"""Property-based fuzzing of the whole HTTP API with schemathesis, from the server's own
/openapi.json, against a live `modelyard serve` (parallel 2, context 256, max_queue 4, default
limits; minilm-l6-v2 beside it for /embeddings). Bodies are random, valid and invalid: whatever
arrives, the server answers with

- no 5xx, except 503 with Retry-After and the OpenAI error body (a full queue);
- 422 with FastAPI's {"detail": [{"loc", "msg", "type"}]}; every other 4xx with OpenAI's
  {"error": {"message", "type", "param", "code"}};
- a 200 event stream that ends with [DONE], after a finish_reason or an error event that is
  not an internal error.

The run is bounded: FUZZ_EXAMPLES per operation, and FUZZ_BUDGET seconds for all of them (past
it the remaining examples are skipped cheaply; at least one example per operation always runs).
Context 256 turns most random max_tokens into an instant 400; the valid rest generate at most
255 tokens. Three bodies in four get the served model's name, so that they reach the engine
rather than stop at the 404 for an unknown endpoint.
"""

from __future__ import annotations

import os
import time

import pytest
import schemathesis                   # a dev extra (pyproject.toml)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from helpers import check_response, config, live_server

pytestmark = pytest.mark.model

FUZZ_EXAMPLES = int(os.environ.get("MODELYARD_FUZZ_EXAMPLES", "30"))
FUZZ_BUDGET = float(os.environ.get("MODELYARD_FUZZ_BUDGET", "150"))
REQUEST_TIMEOUT = 60.0
MAX_STREAM_EVENTS = 4 * 256
EMBEDDER = "minilm-l6-v2"           # /embeddings bodies are routed to it, the rest to the default model

_started: float | None = None
_seen: dict[str, int] = {}          # operation -> examples actually sent
_statuses: dict[int, int] = {}      # status -> count, for the summary


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    embedder = f'[[endpoints]]\nname = "{EMBEDDER}"\nmodel = "{EMBEDDER}"\nthreads = 1\nmax_queue = 4\n'
    with live_server(tmp_path_factory.mktemp("fuzz"), config(parallel=2, context=256, max_queue=4,
                                                              extra=embedder)) as srv:
        yield srv
        # the fuzzing left the endpoint alive and idle
        ep = srv.wait_idle()
        assert ep["state"] == "ready" and ep["in_flight"] == 0 and ep["slots_used"] == 0, ep
        srv.model = EMBEDDER
        ep = srv.wait_idle(fields=("in_flight", "queue_depth", "running"))
        assert ep["state"] == "ready" and (ep["in_flight"], ep["queue_depth"], ep["running"]) == (0, 0, 0), ep
    print(f"\nfuzz: examples per operation {_seen}; statuses {dict(sorted(_statuses.items()))}")


def _document() -> dict:
    """The app's OpenAPI document, built in process (no model loaded)."""
    from modelyard.api.app import create_app
    from modelyard.settings import EndpointSpec, Settings
    return create_app(Settings(endpoints=(EndpointSpec(name="x"),))).openapi()


def _documented_operations() -> list[tuple[str, str, bool]]:
    """The app's own operations."""
    return [(method.upper(), path, "requestBody" in op)
            for path, item in _document()["paths"].items() for method, op in item.items()]


# (method, path, mode): every operation with valid data; those with a body also with invalid data
# (a path parameter that takes any string, or no input at all, has no invalid value to make).
DOCUMENTED = _documented_operations()
OPERATIONS = [(m, p) for m, p, _ in DOCUMENTED]
CASES = [(m, p, mode) for m, p, inputs in DOCUMENTED for mode in ("positive", "negative")
         if mode == "positive" or inputs]


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    """The live server's /openapi.json, loaded by schemathesis; it documents the same operations."""
    loaded = schemathesis.openapi.from_url(f"{fuzz_server.base}/openapi.json")
    # schemathesis stops reading a stream after 20 events and calls it cut short; a chat without
    # max_tokens runs to the end of the 256-token context: read every event n <= 2 choices make.
    loaded.config.max_stream_events = MAX_STREAM_EVENTS
    live = sorted((op.ok().method.upper(), op.ok().path) for op in loaded.get_all_operations())
    assert live == sorted(OPERATIONS)
    return loaded


@pytest.mark.parametrize("body", ["CompletionRequest", "ChatRequest"])
def test_the_schema_leads_the_fuzzer_to_real_token_ids(body):
    """Keys without a pattern are random strings: the fuzzer never sent a token id nor a key
    like "²" that str.isdigit accepts and int() rejects (a 500 it did not find)."""
    import re

    bias = _document()["components"]["schemas"][body]["properties"]["logit_bias"]
    obj = next(s for s in bias.get("anyOf", [bias]) if s.get("type") == "object")
    pattern = obj["propertyNames"]["pattern"]
    assert re.fullmatch(pattern, "0") and re.fullmatch(pattern, "49151")
    assert not any(re.fullmatch(pattern, k) for k in ("²", "-1", "1.5", "", "x", "01"))
    assert obj["additionalProperties"] == {"type": "number", "minimum": -100, "maximum": 100}


def test_every_operation_is_fuzzed():
    assert {m for m, _ in OPERATIONS} >= {"GET", "POST"}
    assert any(p.endswith("/completions") and not p.endswith("/chat/completions") for _, p in OPERATIONS)
    assert any(p.endswith("/chat/completions") for _, p in OPERATIONS)


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{mode} {m} {p}" for m, p, mode in CASES])
def test_api_holds_under_random_input(method, path, mode, api_schema, fuzz_server):
    global _started
    if _started is None:
        _started = time.monotonic()
    operation = api_schema[path][method]
    label = f"{mode} {method} {path}"
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=strategy, routed=st.sampled_from([True, True, True, False]))
    def run(case, routed: bool) -> None:
        if routed and isinstance(case.body, dict) and "model" in case.body:
            # reach the engine, not just the 404 (or the wrong kind's 400)
            case.body["model"] = EMBEDDER if path.endswith("/embeddings") else fuzz_server.model
        if _seen.get(label) and time.monotonic() - _started > FUZZ_BUDGET:
            return                      # over the time budget: skip the rest cheaply
        _seen[label] = _seen.get(label, 0) + 1
        response = case.call(base_url=fuzz_server.base, headers=fuzz_server.headers, timeout=REQUEST_TIMEOUT)
        _statuses[response.status_code] = _statuses.get(response.status_code, 0) + 1
        check_response(response)

    run()
