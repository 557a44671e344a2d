"""Inputs built to make the server work hard for nothing (issue 19), against the session's real
server: each is refused before any work with an answer that names the field, the limit and the
value, and echoes none of the input in full. (That /health keeps answering under such input
meanwhile is bench/hostile.py's to measure.)"""

from __future__ import annotations

import time

import httpx
import pytest

from modelyard.settings import MAX_NAME

pytestmark = pytest.mark.model

# a.a.a.…: the shape that made the old URL-credential pattern backtrack quadratically (a 40 kB
# model name held the event loop for 4.4 s; 800 kB would have taken most of an hour)
HOSTILE_NAME = "a." * 400_000     # 800 kB: under the default body limit (1 MB)


def _bodies(name: str) -> list[tuple[str, dict]]:
    return [("/completions", {"model": name, "prompt": "x"}),
            ("/chat/completions", {"model": name, "messages": [{"role": "user", "content": "x"}]}),
            ("/embeddings", {"model": name, "input": "x"})]


@pytest.mark.parametrize("route, body", _bodies(HOSTILE_NAME), ids=lambda x: x if isinstance(x, str) else "")
def test_a_megabyte_model_name_is_a_422_naming_the_limit_and_the_length(server, client, route, body):
    r = client.post(route, json=body)
    assert r.status_code == 422, r.text[:300]
    [detail] = r.json()["detail"]
    assert detail["loc"] == ["body", "model"] and detail["type"] == "string_too_long"
    assert f"at most {MAX_NAME} characters" in detail["msg"] and f"got {len(HOSTILE_NAME)}" in detail["msg"]
    assert detail["ctx"] == {"max_length": MAX_NAME}
    # the value is echoed in part, with its length; the answer is small whatever was sent
    assert detail["input"].endswith(f"... ({len(HOSTILE_NAME)} characters)")
    assert len(r.content) < 2_000
    assert httpx.get(server.base + "/health", timeout=5).status_code == 200


def test_tokenize_bounds_the_model_name_too(server):
    r = httpx.post(server.base + "/tokenize", json={"model": HOSTILE_NAME, "prompt": "x"},
                   headers=server.headers, timeout=30)
    assert r.status_code == 422
    assert {d["type"] for d in r.json()["detail"] if d["loc"][-1] == "model"} == {"string_too_long"}
    assert len(r.content) < 2_000


def test_an_unknown_name_in_a_path_is_echoed_in_part(server):
    name = "a." * 4_000       # a path segment is bounded only by the request line's limit
    r = httpx.get(f"{server.base}/api/v1/endpoints/{name}", headers=server.headers, timeout=30)
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert f"({len(name)} characters)" in message and len(message) < 400


def test_a_name_at_the_limit_is_an_ordinary_404(client):
    r = client.post("/completions", json={"model": "m" * MAX_NAME, "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_many_bad_items_are_reported_in_part(client):
    """A list of 5,000 wrong-typed prompts: at most 20 errors and a count of the rest, not 5,000
    echoed entries."""
    r = client.post("/completions", json={"model": "smollm2-135m", "prompt": [{"x": i} for i in range(5_000)]})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert len(detail) == 21 and len(r.content) < 20_000
    assert detail[-1]["type"] == "too_many_errors" and "more errors not shown" in detail[-1]["msg"]


def test_lark_detection_answers_as_llguidance_does_in_linear_time():
    """api/openai/structured.is_lark against llguidance's is_lark_syntax on 20,000 random grammars built
    from the pieces that matter (line breaks, horizontal and other whitespace, the two markers),
    then on the shapes that made the original quadratic (whole megabytes of blank lines)."""
    import random

    from llguidance.gbnf_to_lark import is_lark_syntax

    from modelyard.api.openai.structured import is_lark

    rng = random.Random(19)
    pieces = ["start", ":", " ", "\n", "\t", "\r", "\x0b", "\u3000", "%llguidance", "x", "_", "root ::=", "é"]
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert is_lark(text) == is_lark_syntax(text), repr(text)
    for text in ("\n" * 1_000_000, " \n" * 500_000, "start\n" * 200_000):
        assert is_lark(text) is False
    assert is_lark("\n" * 1_000_000 + "start: x")


def test_a_grammar_of_blank_lines_is_refused_as_gbnf(client):
    r = client.post("/completions", json={"model": "smollm2-135m", "prompt": "a", "max_tokens": 1,
                                          "grammar": "\n" * 90_000})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == "grammar"


@pytest.mark.parametrize("field", ["grammar", "guided_regex", "guided_grammar"])
def test_a_grammar_text_has_a_maximum(client, field):
    r = client.post("/completions", json={"model": "smollm2-135m", "prompt": "a", "max_tokens": 1,
                                          field: "\n" * 400_000})
    assert r.status_code == 422, r.text[:300]
    assert "400000 characters, above the limit of 100000" in r.text


@pytest.mark.parametrize("field, count, limit", [("messages", 2049, 2048), ("tools", 129, 128)])
def test_a_chat_request_has_at_most_so_many_messages_and_tools(client, field, count, limit):
    body = {"model": "smollm2-135m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    body[field] = ([{"role": "user", "content": "x"}] * count if field == "messages" else
                   [{"type": "function", "function": {"name": f"f{i}"}} for i in range(count)])
    r = client.post("/chat/completions", json=body)
    assert r.status_code == 422
    [detail] = r.json()["detail"]
    assert detail["loc"] == ["body", field] and detail["type"] == "too_long"
    assert f"at most {limit} items" in detail["msg"] and f"not {count}" in detail["msg"]


def test_slow_grammar_compiles_do_not_hold_up_tokenizing(server, client):
    """Eight requests whose grammar takes seconds to compile (a choice of 50,000 strings each,
    all different; 900 kB bodies) wait for the endpoint's compilers as coroutines: while not one of their
    compiles has finished, /tokenize is answered. They used to wait on threads of the event
    loop's default pool (6 on 2 cores), and tokenizing, templating and the control plane's
    database calls queued behind them."""
    import concurrent.futures

    def status() -> dict:
        return server.endpoint()

    def done(ep: dict) -> int:
        return ep["grammar_compiled"] + ep["grammar_failed"]

    before = status()

    def slow(i: int) -> int:
        body = {"model": "smollm2-135m", "prompt": "Pick:", "max_tokens": 1,
                "guided_choice": [f"option {i}-{j}" for j in range(50_000)]}
        return httpx.post(server.api + "/completions", json=body, headers=server.headers, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = [pool.submit(slow, i) for i in range(8)]
        for _ in range(600):                 # until all eight are waiting for their compiles
            ep = status()
            if ep["grammar_requests"] - before["grammar_requests"] >= 8:
                break
            time.sleep(0.01)
        assert ep["grammar_requests"] - before["grammar_requests"] >= 8, ep
        r = httpx.post(server.base + "/tokenize", json={"model": "smollm2-135m", "prompt": "hello there"},
                       headers=server.headers, timeout=60)
        after_tokenize = status()
        assert r.status_code == 200 and r.json()["count"] == 2
        assert done(after_tokenize) == done(before), (before, after_tokenize)
        codes = [f.result() for f in statuses]
    # each a 200, or a 400 past its own compile time bound, or a 503 when no compiler freed up
    assert set(codes) <= {200, 400, 503} and len(codes) == 8, codes


@pytest.mark.parametrize("extra, loc, words", [
    ({"user": "u" * 257}, ["body", "user"], "at most 256 characters"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, ["body", "logit_bias"], "at most 1024 items"),
])
def test_every_field_has_a_maximum(client, extra, loc, words):
    r = client.post("/completions", json={"model": "smollm2-135m", "prompt": "x", "max_tokens": 1, **extra})
    assert r.status_code == 422, r.text[:300]
    found = [d for d in r.json()["detail"] if d["loc"] == loc]
    assert found and words in found[0]["msg"], r.json()["detail"]
