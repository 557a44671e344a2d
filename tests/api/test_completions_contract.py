"""POST /completions against a real `modelyard serve` over HTTP: one test per contract line.

Every test talks to the session's server (tests/conftest.py) running the default model,
so each assertion is about behaviour a client would see. Generations stay short (<= 16
tokens) except the disconnect test, which must be cut short by the server itself.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.model

MODEL = "smollm2-135m"
PARIS = "The capital of France is"          # greedy: " Paris.\n\nThe United States has ..."
CJK = "Translate to Chinese: hello ->"      # greedy continuation holds CJK characters
EMOJI = "Here are some emoji: 😀 😃 😄"      # greedy continuation holds emoji
# A token-id prompt that the model continues by copying its pattern: A B A B ... A -> B.
COPY_IDS = [330, 331] * 4 + [330]
FORCED_ID = 2000                              # any ordinary token id


# -- helpers ---------------------------------------------------------------------------

def complete(client: httpx.Client, **body) -> dict:
    r = client.post("/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def texts(body: dict) -> list[str]:
    return [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]


def stream(client: httpx.Client, **body) -> list[dict]:
    """The parsed chunks of a streamed completion; checks the SSE framing on the way."""
    with client.stream("POST", "/completions", json={"model": MODEL, **body, "stream": True}) as r:
        assert r.status_code == 200, r.read().decode()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.strip()]
    assert lines, "empty stream"
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]", lines[-1]
    assert lines.count("data: [DONE]") == 1
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    for c in chunks:
        assert "error" not in c, c
    return chunks


def stream_texts(chunks: list[dict]) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in chunks:
        for ch in c["choices"]:
            out[ch["index"]] = out.get(ch["index"], "") + ch["text"]
    return out


def assert_422(r: httpx.Response, field: str | None) -> list[dict]:
    assert r.status_code == 422, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    for d in detail:
        assert isinstance(d["loc"], list) and d["loc"][0] == "body", d
        assert isinstance(d["msg"], str) and d["msg"]
        assert isinstance(d["type"], str) and d["type"]
    if field is not None:
        assert any(d["loc"][:2] == ["body", field] for d in detail), detail
    return detail


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


BUSY = ("slots_used", "in_flight", "running", "queue_depth")   # all 0: nothing runs, waits or holds a slot


@pytest.fixture(autouse=True)
def no_leaks(server):
    """After every test the endpoint must be idle again: no slot, request or queue entry left."""
    yield
    st = server.wait_idle(timeout=10, fields=BUSY)
    assert (st["slots_used"], st["in_flight"], st["running"], st["queue_depth"]) == (0, 0, 0, 0), \
        f"the endpoint is not idle after this test: {st}"


@pytest.fixture(scope="module")
def paris(client) -> dict:
    """The greedy 16-token reference completion of PARIS, with logprobs (token boundaries)."""
    body = complete(client, prompt=PARIS, max_tokens=16, logprobs=0)
    ch = body["choices"][0]
    assert ch["finish_reason"] == "length" and len(ch["text"]) > 30, body
    return {**ch, "prompt_tokens": body["usage"]["prompt_tokens"]}


# -- request fields --------------------------------------------------------------------

def test_prompt_string(client, paris):
    body = complete(client, prompt=PARIS, max_tokens=16)
    assert texts(body) == [paris["text"]]


def test_prompt_one_element_list_is_the_string(client, paris):
    body = complete(client, prompt=[PARIS], max_tokens=16)
    assert texts(body) == [paris["text"]]


def test_prompt_list_of_strings_indexes_choices_prompt_times_n_plus_j(client):
    one = texts(complete(client, prompt=PARIS, max_tokens=4))[0]
    two = texts(complete(client, prompt="Hello", max_tokens=4))[0]
    body = complete(client, prompt=[PARIS, "Hello"], n=2, max_tokens=4)
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2, 3]
    assert texts(body) == [one, one, two, two]
    assert body["usage"]["completion_tokens"] == 16


def test_prompt_token_ids(client):
    ids = [330, 331, 332, 333, 334]
    body = complete(client, prompt=ids, max_tokens=3)
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == 3
    # Echo shows the ids decoded: one token per id.
    echoed = complete(client, prompt=ids, max_tokens=1, echo=True, logprobs=0)["choices"][0]
    assert len(echoed["logprobs"]["tokens"]) == len(ids) + 1
    assert echoed["text"].startswith("".join(echoed["logprobs"]["tokens"][:len(ids)]))


def test_prompt_list_of_token_id_lists(client):
    a, b = [330, 331, 332], [1000, 2000]
    ta = texts(complete(client, prompt=a, max_tokens=3))[0]
    tb = texts(complete(client, prompt=b, max_tokens=3))[0]
    body = complete(client, prompt=[a, b], max_tokens=3)
    assert texts(body) == [ta, tb]
    assert body["usage"]["prompt_tokens"] == len(a) + len(b)


def test_temperature_defaults_to_zero(client, paris):
    first = texts(complete(client, prompt=PARIS, max_tokens=16))
    second = texts(complete(client, prompt=PARIS, max_tokens=16))
    assert first == second == [paris["text"]]
    assert texts(complete(client, prompt=PARIS, max_tokens=16, temperature=0)) == first


def test_n_gives_n_choices(client, paris):
    body = complete(client, prompt=PARIS, n=3, max_tokens=5)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    # greedy: every choice is the same continuation
    assert len(set(texts(body))) == 1 and paris["text"].startswith(texts(body)[0])
    assert body["usage"]["completion_tokens"] == 15
    assert body["usage"]["prompt_tokens"] == paris["prompt_tokens"]     # the prompt counts once


def test_stop_as_string(client, paris):
    text = paris["text"]
    stop = "."
    assert stop in text
    ch = complete(client, prompt=PARIS, max_tokens=16, stop=stop)["choices"][0]
    assert ch["text"] == text[:text.index(stop)]
    assert ch["finish_reason"] == "stop"


def test_stop_as_list_first_match_wins(client, paris):
    text = paris["text"]
    stops = ["United", "\n", "never-in-the-text"]
    body = complete(client, prompt=PARIS, max_tokens=16, stop=stops)
    ch = body["choices"][0]
    assert ch["text"] == text[:text.index("\n")]
    assert ch["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 16


def test_max_tokens_defaults_to_16(client):
    body = complete(client, prompt=PARIS)
    ch = body["choices"][0]
    if ch["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 16
    else:
        assert body["usage"]["completion_tokens"] < 16


@pytest.mark.parametrize("k", [0, 2, 5])
def test_logprobs(client, k):
    body = complete(client, prompt=PARIS, max_tokens=6, logprobs=k)
    ch = body["choices"][0]
    lp = ch["logprobs"]
    assert lp is not None
    n = len(lp["tokens"])
    assert n == body["usage"]["completion_tokens"] == 6
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert "".join(lp["tokens"]) == ch["text"]
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"] == sorted(lp["text_offset"])
    for i, tok in enumerate(lp["tokens"]):
        assert ch["text"][lp["text_offset"][i]:].startswith(tok)
        assert isinstance(lp["token_logprobs"][i], float) and lp["token_logprobs"][i] <= 0
        top = lp["top_logprobs"][i]
        if k == 0:   # no alternatives, but the sampled token's own entry (OpenAI, vLLM)
            assert top == {tok: lp["token_logprobs"][i]}
        else:
            assert isinstance(top, dict) and 1 <= len(top) <= k + 1, top
            assert all(v <= 0 for v in top.values())
            # greedy: the chosen token is the most likely one
            assert lp["token_logprobs"][i] == pytest.approx(max(top.values()), abs=1e-6)
            assert top.get(tok) == pytest.approx(lp["token_logprobs"][i], abs=1e-6)


def test_streamed_logprobs_match_non_streamed(client):
    whole = complete(client, prompt=PARIS, max_tokens=8, logprobs=2)["choices"][0]["logprobs"]
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in stream(client, prompt=PARIS, max_tokens=8, logprobs=2):
        for ch in c["choices"]:
            if ch["logprobs"]:
                for key in merged:
                    merged[key] += ch["logprobs"][key]
    assert merged["tokens"] == whole["tokens"]
    assert merged["text_offset"] == whole["text_offset"]
    assert merged["token_logprobs"] == pytest.approx(whole["token_logprobs"])


def test_echo(client, paris):
    ch = complete(client, prompt=PARIS, max_tokens=4, echo=True)["choices"][0]
    assert ch["text"].startswith(PARIS)
    assert paris["text"].startswith(ch["text"][len(PARIS):])
    assert len(ch["text"]) > len(PARIS)


def test_echo_with_logprobs_scores_the_prompt(client):
    body = complete(client, prompt=PARIS, max_tokens=3, echo=True, logprobs=1)
    ch = body["choices"][0]
    lp = ch["logprobs"]
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == prompt_tokens + 3
    assert lp["token_logprobs"][0] is None
    assert all(isinstance(v, float) for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == ch["text"]
    assert "".join(lp["tokens"][:prompt_tokens]) == PARIS
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for tok, off in zip(lp["tokens"], lp["text_offset"]):
        assert ch["text"][off:].startswith(tok)


def test_top_p_tiny_keeps_only_the_most_likely_token(client, paris):
    # temperature 2 alone wanders off; top_p that keeps one token is greedy again.
    hot = texts(complete(client, prompt=PARIS, max_tokens=12, temperature=2, seed=1))[0]
    kept = texts(complete(client, prompt=PARIS, max_tokens=12, temperature=2, seed=1, top_p=0.001))[0]
    greedy = texts(complete(client, prompt=PARIS, max_tokens=12))[0]
    assert kept == greedy
    assert hot != greedy


def test_frequency_penalty_changes_repetitive_output(client):
    prompt = "1, 1, 1, 1, 1, 1,"
    plain = texts(complete(client, prompt=prompt, max_tokens=12))[0]
    penalised = texts(complete(client, prompt=prompt, max_tokens=12, frequency_penalty=2))[0]
    assert plain.count("1") > penalised.count("1"), (plain, penalised)


def test_presence_penalty_changes_repetitive_output(client):
    plain = texts(complete(client, prompt=EMOJI, max_tokens=12))[0]
    penalised = texts(complete(client, prompt=EMOJI, max_tokens=12, presence_penalty=2))[0]
    assert plain != penalised
    assert len(set(plain.split())) < len(set(penalised.split())), (plain, penalised)


def test_logit_bias_forces_a_token(client):
    forced = complete(client, prompt=[FORCED_ID], max_tokens=1, echo=True, logprobs=0)
    piece = forced["choices"][0]["logprobs"]["tokens"][0]       # the text of token FORCED_ID
    plain = texts(complete(client, prompt=COPY_IDS, max_tokens=4))[0]
    biased = texts(complete(client, prompt=COPY_IDS, max_tokens=4, logit_bias={str(FORCED_ID): 100}))[0]
    assert biased == piece * 4
    assert plain != biased


def test_logit_bias_bans_a_token(client):
    piece = complete(client, prompt=[COPY_IDS[1]], max_tokens=1, echo=True,
                     logprobs=0)["choices"][0]["logprobs"]["tokens"][0]
    plain = complete(client, prompt=COPY_IDS, max_tokens=2, logprobs=0)["choices"][0]
    assert plain["logprobs"]["tokens"][0] == piece, "precondition: the model copies the pattern"
    banned = complete(client, prompt=COPY_IDS, max_tokens=2, logprobs=0,
                      logit_bias={str(COPY_IDS[1]): -100})["choices"][0]
    assert banned["logprobs"]["tokens"][0] != piece


def test_user_is_accepted(client, paris):
    assert texts(complete(client, prompt=PARIS, max_tokens=16, user="someone@example.com")) == [paris["text"]]


def test_best_of_equal_to_n_works(client):
    body = complete(client, prompt=PARIS, max_tokens=2, n=2, best_of=2)
    assert len(body["choices"]) == 2


@pytest.mark.parametrize("extra", [{"best_of": 2}, {"best_of": 3, "n": 2}])
def test_best_of_other_than_n_is_422(client, extra):
    r = client.post("/completions", json={"model": MODEL, "prompt": PARIS, "max_tokens": 1, **extra})
    detail = assert_422(r, "best_of")
    assert any("best_of" in d["msg"] for d in detail)


def test_suffix_is_422(client):
    r = client.post("/completions", json={"model": MODEL, "prompt": PARIS, "max_tokens": 1, "suffix": "end"})
    assert_422(r, "suffix")


def test_unknown_fields_are_ignored(client, paris):
    body = complete(client, prompt=PARIS, max_tokens=16, frobnicate=True, extra={"a": [1, 2]},
                    stream_options_typo=1)
    assert texts(body) == [paris["text"]]


def test_null_optional_fields_mean_absent(client, paris):
    nulls = {k: None for k in ("seed", "logprobs", "stop", "n", "temperature", "max_tokens", "stream",
                               "stream_options", "echo", "top_p", "presence_penalty", "frequency_penalty",
                               "logit_bias", "user", "best_of", "suffix")}
    body = complete(client, prompt=PARIS, **nulls)
    ch = body["choices"][0]
    assert ch["text"] == paris["text"]                       # temperature 0, max_tokens 16, no stop
    assert ch["logprobs"] is None and len(body["choices"]) == 1
    assert body["usage"]["completion_tokens"] == 16


def test_stream_options_null_with_stream_false(client):
    body = complete(client, prompt=PARIS, max_tokens=1, stream=False, stream_options=None)
    assert len(body["choices"]) == 1


# -- invalid input: FastAPI's 422 -----------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("temperature", 3), ("temperature", -0.1), ("temperature", "hot"),
    ("n", 0), ("n", 1.5), ("n", "two"),
    ("max_tokens", 0), ("max_tokens", "many"),
    ("stop", []), ("stop", 5), ("stop", [1]),
    ("logprobs", 6), ("logprobs", -1),
    ("top_p", 0), ("top_p", 1.5),
    ("presence_penalty", 3), ("frequency_penalty", -3),
    ("logit_bias", {"x": 1}), ("logit_bias", {"5": 200}),
    ("seed", "abc"), ("stream", [1]), ("echo", {"a": 1}),
    ("prompt", 5), ("prompt", []), ("prompt", {}), ("prompt", [[]]), ("prompt", [-1]),
    ("model", 5), ("model", ""),
])
def test_invalid_field_is_422(client, field, value):
    body = {"model": MODEL, "prompt": PARIS, "max_tokens": 1, field: value}
    r = client.post("/completions", json=body)
    assert_422(r, field)


def test_stream_options_without_stream_is_422(client):
    r = client.post("/completions", json={"model": MODEL, "prompt": PARIS, "max_tokens": 1,
                                          "stream_options": {"include_usage": True}})
    assert_422(r, "stream_options")
    r = client.post("/completions", json={"model": MODEL, "prompt": PARIS, "max_tokens": 1, "stream": False,
                                          "stream_options": {"include_usage": True}})
    assert_422(r, "stream_options")


def test_malformed_json_is_422(client):
    r = client.post("/completions", content=b'{"model": "smollm2-135m", "prompt": ',
                    headers={"Content-Type": "application/json"})
    detail = assert_422(r, None)
    assert detail[0]["type"] == "json_invalid"


def test_non_object_body_is_422(client):
    r = client.post("/completions", json=["model", "prompt"])
    assert_422(r, None)


@pytest.mark.parametrize("missing", ["model", "prompt"])
def test_missing_required_field_is_422(client, missing):
    body = {"model": MODEL, "prompt": PARIS}
    del body[missing]
    detail = assert_422(client.post("/completions", json=body), missing)
    assert any(d["type"] == "missing" for d in detail)


# -- routing errors ----------------------------------------------------------------------------

def test_unknown_model_is_404(client):
    r = client.post("/completions", json={"model": "no-such-model", "prompt": PARIS})
    err = assert_openai_error(r, 404)
    assert "no-such-model" in err["message"]
    assert err["param"] == "model"


def test_failed_endpoint_is_400_with_the_reason(client):
    r = client.post("/completions", json={"model": "broken", "prompt": PARIS, "max_tokens": 1})
    err = assert_openai_error(r, 400)
    assert "broken" in err["message"]
    assert "/nonexistent/x.gguf" in err["message"]
    assert "not found" in err["message"] or "failed" in err["message"]


# -- auth --------------------------------------------------------------------------------------

def test_no_key_is_401(server):
    r = httpx.post(f"{server.api}/completions", json={"model": MODEL, "prompt": PARIS, "max_tokens": 1})
    err = assert_openai_error(r, 401)
    assert err["type"] == "authentication_error"


@pytest.mark.parametrize("header", ["Bearer wrong-key", "Basic test-key", "Bearer", "test-key",
                                    "Bearer test-key-but-longer"])
def test_wrong_key_is_401(server, header):
    r = httpx.post(f"{server.api}/completions", headers={"Authorization": header},
                   json={"model": MODEL, "prompt": PARIS, "max_tokens": 1})
    assert_openai_error(r, 401)


def test_auth_is_checked_before_validation(server):
    r = httpx.post(f"{server.api}/completions", json={"model": MODEL, "temperature": 9})
    assert_openai_error(r, 401)


def test_right_key_works(server):
    r = httpx.post(f"{server.api}/completions", headers={"Authorization": f"Bearer {server.key}"},
                   json={"model": MODEL, "prompt": PARIS, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200, r.text


def test_health_is_open(server):
    r = httpx.get(f"{server.base}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


# -- the 200 body ------------------------------------------------------------------------------

def test_response_shape(client):
    before = int(time.time())
    body = complete(client, prompt=PARIS, max_tokens=5)
    assert body["id"].startswith("cmpl-") and len(body["id"]) > 5
    assert body["object"] == "text_completion"
    assert isinstance(body["created"], int) and before - 5 <= body["created"] <= time.time() + 5
    assert body["model"] == MODEL
    [ch] = body["choices"]
    assert isinstance(ch["text"], str) and ch["index"] == 0 and ch["logprobs"] is None
    assert ch["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["prompt_tokens"] > 0
    assert u["prompt_tokens"] + u["completion_tokens"] == u["total_tokens"]
    if ch["finish_reason"] == "length":
        assert u["completion_tokens"] == 5
    assert complete(client, prompt=PARIS, max_tokens=1)["id"] != body["id"]


def test_usage_counts_token_id_prompts_exactly(client):
    ids = list(range(300, 337))
    u = complete(client, prompt=ids, max_tokens=2)["usage"]
    assert u["prompt_tokens"] == len(ids)
    assert u["total_tokens"] == len(ids) + u["completion_tokens"]


# -- streaming ---------------------------------------------------------------------------------

def test_stream_framing_and_finish(client):
    chunks = stream(client, prompt=[PARIS, "Hello"], n=2, max_tokens=5)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert {c["model"] for c in chunks} == {MODEL}
    assert all(isinstance(c["created"], int) for c in chunks)
    last: dict[int, dict] = {}
    finishes: dict[int, int] = {}
    for c in chunks:
        assert c.get("usage") is None, "no usage chunk without include_usage"
        assert len(c["choices"]) == 1
        ch = c["choices"][0]
        assert not finishes.get(ch["index"]), f"choice {ch['index']} got a chunk after its finish_reason"
        last[ch["index"]] = ch
        if ch["finish_reason"] is not None:
            assert ch["finish_reason"] in ("stop", "length")
            finishes[ch["index"]] = 1
    assert sorted(last) == [0, 1, 2, 3]
    assert all(ch["finish_reason"] is not None for ch in last.values())
    assert all(finishes[i] == 1 for i in last)


def test_stream_include_usage(client):
    chunks = stream(client, prompt=[PARIS, "Hello"], n=2, max_tokens=4,
                    stream_options={"include_usage": True})
    usage_chunks = [c for c in chunks if c.get("usage") is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert chunks[-1]["choices"] == []
    for c in chunks[:-1]:
        assert "usage" in c and c["usage"] is None and len(c["choices"]) == 1
    whole = complete(client, prompt=[PARIS, "Hello"], n=2, max_tokens=4)
    # the same counts (what the prefix cache held differs: the second request found the first's)
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [chunks[-1]["usage"][k] for k in counts] == [whole["usage"][k] for k in counts]
    assert set(chunks[-1]["usage"]["prompt_tokens_details"]) == {"cached_tokens"}


def test_stream_include_usage_false(client):
    chunks = stream(client, prompt=PARIS, max_tokens=3, stream_options={"include_usage": False})
    assert all(c.get("usage") is None and c["choices"] for c in chunks)


@pytest.mark.parametrize("extra", [{}, {"n": 2}, {"stop": "United"}, {"n": 2, "stop": ["\n\n", "zzz"]}])
def test_streamed_text_equals_non_streamed(client, extra):
    whole = complete(client, prompt=PARIS, max_tokens=16, **extra)
    chunks = stream(client, prompt=PARIS, max_tokens=16, **extra)
    got = stream_texts(chunks)
    assert [got[i] for i in sorted(got)] == texts(whole)
    finish = {ch["index"]: ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]}
    assert finish == {ch["index"]: ch["finish_reason"] for ch in whole["choices"]}


# -- stop strings never leak -------------------------------------------------------------------

def _boundary_stop(paris: dict) -> tuple[str, int]:
    """A stop string spanning a token boundary in the middle of the reference text."""
    text, lp = paris["text"], paris["logprobs"]
    toks, offs = lp["tokens"], lp["text_offset"]
    for i in range(len(toks) // 2, len(toks)):
        a, b = toks[i - 1], toks[i]
        if len(a) >= 2 and len(b) >= 2:
            stop = a[-2:] + b[:2]
            at = text.find(stop)
            if at == offs[i] - 2:
                return stop, at
    raise AssertionError(f"no usable token boundary in {toks}")


def test_stop_spanning_tokens_is_cut_and_never_leaks(client, paris):
    stop, at = _boundary_stop(paris)
    expected = paris["text"][:at]
    whole = complete(client, prompt=PARIS, max_tokens=16, stop=stop)["choices"][0]
    assert whole["text"] == expected and whole["finish_reason"] == "stop"
    chunks = stream(client, prompt=PARIS, max_tokens=16, stop=stop)
    pieces = [ch["text"] for c in chunks for ch in c["choices"]]
    assert "".join(pieces) == expected
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"]][-1] == "stop"
    # No chunk ends with a prefix of the stop whose rest follows: the server held it back.
    sent = ""
    for piece in pieces:
        sent += piece
        assert stop not in sent
        for k in range(1, len(stop)):
            if sent.endswith(stop[:k]):
                assert not paris["text"][len(sent):].startswith(stop[k:]), \
                    f"sent {sent!r}, a prefix of the stop {stop!r} that the output then completes"


def test_logprobs_with_a_stop_cover_the_text_sent(client, paris):
    # Tokens wholly inside the stop string are dropped; one the cut falls inside is kept.
    stop, at = _boundary_stop(paris)
    whole = complete(client, prompt=PARIS, max_tokens=16, stop=stop, logprobs=1)["choices"][0]
    lp = whole["logprobs"]
    joined = "".join(lp["tokens"])
    assert joined.startswith(whole["text"]) and paris["text"].startswith(joined)
    assert stop not in joined and len(joined) - len(whole["text"]) < len(stop)
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    merged = [t for c in stream(client, prompt=PARIS, max_tokens=16, stop=stop, logprobs=1)
              for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    assert merged == lp["tokens"]


def test_partial_stop_match_is_released(client, paris):
    # A stop sharing a prefix with the text but never completed: everything comes out.
    text = paris["text"]
    word = next(w for w in text.split() if len(w) >= 4 and w.isalpha())
    stop = word[:3] + "\u00e6\u00e6"
    assert stop not in text
    whole = complete(client, prompt=PARIS, max_tokens=16, stop=stop)["choices"][0]
    assert whole["text"] == text and whole["finish_reason"] == "length"
    assert stream_texts(stream(client, prompt=PARIS, max_tokens=16, stop=stop)) == {0: text}


# -- UTF-8 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [CJK, EMOJI])
def test_utf8_chunks_are_whole_characters(client, prompt):
    whole = texts(complete(client, prompt=prompt, max_tokens=16))[0]
    assert any(ord(c) > 0x2E80 for c in whole), f"precondition: non-ASCII output, got {whole!r}"
    chunks = stream(client, prompt=prompt, max_tokens=16)
    pieces = [ch["text"] for c in chunks for ch in c["choices"]]
    for p in pieces:
        p.encode("utf-8")                      # raises on a lone surrogate
        assert "\ufffd" not in p or "\ufffd" in whole
    assert "".join(pieces) == whole


# -- determinism and seeds ---------------------------------------------------------------------

def test_temperature_zero_is_deterministic_across_concurrent_load(client, paris):
    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=str(client.base_url), headers=dict(client.headers),
                                     timeout=60) as ac:
            rs = await asyncio.gather(*(ac.post("/completions", json={
                "model": MODEL, "prompt": p, "max_tokens": 16, "temperature": 0})
                for p in (PARIS, "Hello", PARIS, CJK)))
        return [r.json()["choices"][0]["text"] for r in rs]
    out = asyncio.run(run())
    assert out[0] == out[2] == paris["text"]


def test_same_seed_same_text(client):
    outs = [texts(complete(client, prompt=PARIS, max_tokens=10, temperature=1, seed=1234))[0]
            for _ in range(3)]
    assert outs[0] == outs[1] == outs[2]


def test_n_with_seed_differs_and_reproduces(client):
    req = dict(prompt=PARIS, max_tokens=10, temperature=1, seed=42, n=3)
    first = texts(complete(client, **req))
    assert len(set(first)) == 3, first
    assert texts(complete(client, **req)) == first
    # choice i samples with seed + i: the same as an n=1 request with that seed
    for i in (1, 2):
        assert texts(complete(client, prompt=PARIS, max_tokens=10, temperature=1, seed=42 + i)) == [first[i]]


@pytest.mark.parametrize("seed", [-1, 2**64 - 1])
def test_any_int64_or_uint64_seed_works(client, seed):
    req = dict(prompt=PARIS, max_tokens=3, temperature=1, seed=seed, n=2)
    first = texts(complete(client, **req))
    assert texts(complete(client, **req)) == first


# -- context -----------------------------------------------------------------------------------

SLOTS = 4                 # the session server's parallel
PRIMER = [331] * 3        # shares no prefix with the prompts below


def uniform_caches(server, client: httpx.Client) -> dict:
    """One request with n = SLOTS takes every slot and leaves the same PRIMER tokens in each, so
    the endpoint's cached_tokens then says exactly what a later request left in its slot."""
    complete(client, prompt=PRIMER, max_tokens=1, n=SLOTS)
    status = server.wait_idle(timeout=10, fields=BUSY)
    assert status["cached_tokens"] % SLOTS == 0, status
    return status


@pytest.mark.parametrize("n_ids,max_tokens", [(500, 16), (7, 509)])
def test_context_overflow_is_400_before_any_work(server, client, n_ids, max_tokens):
    before = uniform_caches(server, client)
    r = client.post("/completions", json={"model": MODEL, "prompt": [330] * n_ids, "max_tokens": max_tokens})
    err = assert_openai_error(r, 400)
    assert f"{n_ids} tokens" in err["message"] and str(max_tokens) in err["message"], err
    assert "512" in err["message"]
    # Nothing was queued, admitted or prefilled: a slot that took even one chunk of the prompt
    # would hold other tokens than PRIMER now.
    # (last_used: when a request last named the endpoint, refused ones too; it keeps it loaded)
    assert {k: v for k, v in server.endpoint().items() if k != "last_used"} == \
        {k: v for k, v in before.items() if k != "last_used"}


def test_context_exactly_full_is_allowed(client):
    # 2 + 510 == 512 fits; start it and leave after the first chunk (no need to run it all).
    with client.stream("POST", "/completions", json={"model": MODEL, "prompt": [330] * 2,
                                                     "max_tokens": 510, "stream": True}) as r:
        assert r.status_code == 200, r.read().decode()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    r = client.post("/completions", json={"model": MODEL, "prompt": [330] * 3, "max_tokens": 510})
    assert_openai_error(r, 400)


def test_context_overflow_in_any_prompt_of_a_list_refuses_all(client):
    r = client.post("/completions", json={"model": MODEL, "prompt": [[330] * 5, [330] * 500],
                                          "max_tokens": 16})
    err = assert_openai_error(r, 400)
    assert "500 tokens" in err["message"]


def test_token_outside_the_vocabulary_is_400(client):
    r = client.post("/completions", json={"model": MODEL, "prompt": [330, 10**7], "max_tokens": 1})
    err = assert_openai_error(r, 400)
    assert str(10**7) in err["message"] and err["param"] == "prompt"
    r = client.post("/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1,
                                          "logit_bias": {str(10**7): 1}})
    err = assert_openai_error(r, 400)
    assert str(10**7) in err["message"] and err["param"] == "logit_bias"


def test_n_above_the_endpoint_parallelism_is_400(client):
    r = client.post("/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1, "n": 5})
    err = assert_openai_error(r, 400)
    assert err["param"] == "n" and "5" in err["message"]


# -- client disconnect -------------------------------------------------------------------------

def test_disconnect_mid_stream_stops_generation(server, client):
    """A client that leaves after two chunks of a 480-token generation frees its slot (and its
    in-flight entry) long before the generation could have ended: the slot's cache, which keeps
    every token decoded into it, holds far fewer than 480 generated tokens."""
    before = uniform_caches(server, client)
    primer = before["cached_tokens"] // SLOTS
    no_eog = {"0": -100, "2": -100}          # so that, left alone, it would run all 480 tokens
    with httpx.Client(base_url=server.api, headers=server.headers, timeout=60) as c:
        with c.stream("POST", "/completions", json={"model": MODEL, "prompt": COPY_IDS, "logit_bias": no_eog,
                                                    "max_tokens": 480, "stream": True}) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got += 1
                    if got == 2:
                        busy = server.endpoint()
                        assert busy["slots_used"] >= 1 and busy["in_flight"] >= 1, busy
                        break       # leaving iter_lines early closes the connection (httpx)
            r.close()
    status = server.wait_idle(timeout=30, fields=BUSY)
    assert status["slots_used"] == 0 and status["in_flight"] == 0, status
    # One slot now holds the prompt and what was decoded before the abort; the others PRIMER.
    decoded = status["cached_tokens"] - (SLOTS - 1) * primer - len(COPY_IDS)
    assert 1 <= decoded < 240, (decoded, status)


# -- clients -----------------------------------------------------------------------------------

def test_openai_client_sync_and_stream(server, paris):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=server.api, api_key=server.key, max_retries=0)
    r = oc.completions.create(model=MODEL, prompt=PARIS, max_tokens=16)
    assert r.choices[0].text == paris["text"] and r.model == MODEL and r.usage.completion_tokens == 16
    parts = [c.choices[0].text for c in oc.completions.create(model=MODEL, prompt=PARIS, max_tokens=16,
                                                              stream=True) if c.choices]
    assert "".join(parts) == paris["text"]
    with pytest.raises(openai.NotFoundError):
        oc.completions.create(model="no-such-model", prompt=PARIS, max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        oc.completions.create(model="broken", prompt=PARIS, max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.api, api_key="nope", max_retries=0).completions.create(
            model=MODEL, prompt=PARIS, max_tokens=1)


def test_openai_client_async_with_usage(server, paris):
    openai = pytest.importorskip("openai")

    async def run():
        oc = openai.AsyncOpenAI(base_url=server.api, api_key=server.key, max_retries=0)
        r = await oc.completions.create(model=MODEL, prompt=PARIS, max_tokens=16)
        parts, usage = [], None
        async for c in await oc.completions.create(model=MODEL, prompt=PARIS, max_tokens=16, stream=True,
                                                   stream_options={"include_usage": True}):
            parts += [ch.text for ch in c.choices]
            usage = c.usage or usage
        await oc.close()
        return r, "".join(parts), usage
    r, streamed, usage = asyncio.run(run())
    assert r.choices[0].text == streamed == paris["text"]
    assert usage is not None and usage.completion_tokens == 16


def test_v1_alias(server, paris):
    r = httpx.post(f"{server.base}/v1/completions", headers=server.headers, timeout=60,
                   json={"model": MODEL, "prompt": PARIS, "max_tokens": 16})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == paris["text"]
    anonymous = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL, "prompt": PARIS})
    assert anonymous.status_code == 401
